"""Sampling: seeded parity with ``torch.manual_seed(s); model.generate(do_sample=True, ...)``, a chi-square test that
draws follow the processed distribution, seeds alone vs in a batch, degenerate settings, ``num_return_sequences``."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import decodelab
from decodelab.config import GenerationConfig
from decodelab.errors import ConfigError
from decodelab.processors import Context, build_processors
from decodelab.search.common import PromptBatch, SearchRequest, drain
from decodelab.search.sampling import row_generators, token_search
from decodelab.stopping import MaxLengthCriterion, StoppingCriteria

PROMPT = "It was a dark and stormy"


def make_lm(loaded) -> decodelab.LM:
    return decodelab.LM(loaded.model, loaded.tokenizer, loaded.name)


def hf_sample(loaded, prompt: str, seed: int, **kw) -> list[int]:
    tok = loaded.tokenizer
    enc = tok(prompt, return_tensors="pt")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        out = loaded.model.generate(**enc, pad_token_id=tok.pad_token_id, do_sample=True, **kw)
    return out[0, enc.input_ids.shape[1] :].tolist()


# top_k is passed explicitly everywhere: a model's generation_config may carry its own default.
SAMPLING_CASES = [
    dict(top_k=0),
    dict(top_k=20, temperature=0.7),
    dict(top_k=0, top_p=0.9),
    dict(top_k=0, min_p=0.05, temperature=1.3),
    dict(top_k=0, typical_p=0.8),
    dict(top_k=0, epsilon_cutoff=3e-4),
    dict(top_k=0, eta_cutoff=3e-4),
    dict(top_k=40, top_p=0.95, temperature=0.9, repetition_penalty=1.2, no_repeat_ngram_size=2),
]


@pytest.mark.parametrize("kw", SAMPLING_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_seeded_sampling_equals_transformers(tiny_llama, kw):
    lm = make_lm(tiny_llama)
    for seed in (0, 1234):
        ours = lm.generate(PROMPT, do_sample=True, seed=seed, max_new_tokens=10, **kw).sequences[0]
        assert ours.new_ids == hf_sample(tiny_llama, PROMPT, seed, max_new_tokens=10, **kw)


def test_seeded_sampling_equals_transformers_embedded(embedded):
    lm = make_lm(embedded)
    kw = dict(top_k=50, top_p=0.9, temperature=0.8, max_new_tokens=8)
    ours = lm.generate("Once upon a time", do_sample=True, seed=7, **kw).sequences[0]
    assert ours.new_ids == hf_sample(embedded, "Once upon a time", 7, **kw)


def test_seeded_beam_sampling_equals_transformers(tiny_llama):
    lm = make_lm(tiny_llama)
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, top_k=20, temperature=0.7)
    ours = lm.generate(PROMPT, do_sample=True, seed=5, **kw)
    tok = tiny_llama.tokenizer
    enc = tok(PROMPT, return_tensors="pt")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(5)
        out = tiny_llama.model.generate(**enc, pad_token_id=tok.pad_token_id, do_sample=True, **kw)
    theirs = [row[enc.input_ids.shape[1] :] for row in out.tolist()]
    for seq, row in zip(ours.sequences, theirs):
        assert row[: len(seq.new_ids)] == seq.new_ids
    assert ours.sequences[0].score >= ours.sequences[1].score
    again = lm.generate(PROMPT, do_sample=True, seed=5, **kw)
    assert [s.new_ids for s in again.sequences] == [s.new_ids for s in ours.sequences]
    other = lm.generate(PROMPT, do_sample=True, seed=6, **kw)
    assert [s.new_ids for s in other.sequences] != [s.new_ids for s in ours.sequences]


def test_sampling_never_touches_the_global_rng(tiny_llama):
    lm = make_lm(tiny_llama)
    state = torch.get_rng_state()
    lm.generate(PROMPT, do_sample=True, seed=3, max_new_tokens=4)
    lm.generate(PROMPT, do_sample=True, max_new_tokens=4)  # unseeded: a fresh random seed, still not the global RNG
    lm.generate(PROMPT, do_sample=True, num_beams=2, seed=3, max_new_tokens=4)
    assert torch.equal(torch.get_rng_state(), state)


# --- the draws follow the processed distribution --------------------------------------------------------------------


class FixedLogitsEngine:
    """A stand-in for :class:`decodelab.engine.Engine` whose every step returns the same (V,) logits per row."""

    device = torch.device("cpu")

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def prefill(self, ids, mask, *args, **kwargs):
        return self.logits.repeat(ids.shape[0], 1), None

    def step(self, state, tokens):
        return self.logits.repeat(tokens.shape[0], 1)

    def release(self, state):
        """The search loop's request is done (the real engine's scheduler stops waiting for it)."""


def chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0)


@pytest.mark.parametrize("kw,expected", [
    # temperature 0.5 squares the probabilities; top_k=3 then drops the least likely token
    (dict(temperature=0.5, top_k=3), [0.0, 4 / 29, 9 / 29, 16 / 29]),
    # top_p=0.6 keeps the smallest set reaching 0.6: {0.4, 0.3}
    (dict(top_k=0, top_p=0.6), [0.0, 0.0, 3 / 7, 4 / 7]),
    (dict(top_k=0), [0.1, 0.2, 0.3, 0.4]),
])
def test_draws_follow_the_processed_distribution(kw, expected):
    """Chi-square goodness of fit of 16,000 draws through token_search (the real sampling code path)."""
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])) + 2.0
    cfg = GenerationConfig.from_kwargs(do_sample=True, seed=2024, max_new_tokens=400, num_return_sequences=40,
                                       ignore_eos=True, **kw)
    batch = PromptBatch.from_lists([[0]], pad_id=0)
    ctx = Context(1, batch.repeat(40).pad_lengths, torch.tensor([], dtype=torch.long))
    procs = build_processors(cfg, ctx)
    req = SearchRequest(engine=FixedLogitsEngine(logits), config=cfg, batch=batch, processors=procs, context=ctx,
                        stopping=StoppingCriteria([MaxLengthCriterion(cfg.max_new_tokens)]), per_prompt=40,
                        generators=row_generators(cfg, 40, 40, "cpu"))
    raw = drain(token_search(req))
    draws = [t for r in raw for t in r.new_ids]
    assert len(draws) == 16_000
    counts = [draws.count(i) for i in range(4)]
    for c, p in zip(counts, expected):
        if p == 0:
            assert c == 0  # a removed token is never drawn
    df = sum(p > 0 for p in expected) - 1
    critical = {1: 10.83, 2: 13.82, 3: 16.27}[df]  # chi-square 0.999 quantiles
    stat = chi_square(counts, expected)
    assert stat < critical, (counts, stat)
    # and the recorded score is the sum of the processed log-probabilities of the drawn tokens
    first = raw[0]
    assert first.score == pytest.approx(sum(math.log(expected[t]) for t in first.new_ids), rel=1e-4)


def test_chi_square_detects_a_wrong_distribution():
    """The statistic above is able to fail: the same draws do not fit a slightly different distribution."""
    counts = [1600, 3200, 4800, 6400]
    assert chi_square(counts, [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.0)
    assert chi_square(counts, [0.12, 0.2, 0.28, 0.4]) > 16.27


# --- seeds: alone, in a batch, several samples ----------------------------------------------------------------------


def test_seeded_request_gives_the_same_text_alone_and_in_a_batch(tiny_llama):
    lm = make_lm(tiny_llama)
    kw = dict(do_sample=True, seed=42, max_new_tokens=10, top_k=0, temperature=1.2)
    alone = lm.generate(PROMPT, **kw).sequences[0]
    batch = lm.generate(["A much longer prompt that forces left padding of the other row", PROMPT, "Hi"], **kw)
    assert batch.sequences[1].new_ids == alone.new_ids
    assert batch.sequences[1].new_text == alone.new_text
    assert batch.sequences[1].prompt_index == 1
    # with several samples per prompt, sample j uses seed + j: the same alone and in a batch
    many = lm.generate(PROMPT, num_return_sequences=3, **kw)
    many_batch = lm.generate(["Hi", PROMPT], num_return_sequences=3, **kw)
    assert [s.new_ids for s in many_batch.sequences[3:]] == [s.new_ids for s in many.sequences]
    assert many.sequences[0].new_ids == alone.new_ids
    assert many.sequences[1].new_ids == lm.generate(PROMPT, **{**kw, "seed": 43}).sequences[0].new_ids
    assert len({tuple(s.new_ids) for s in many.sequences}) == 3


@pytest.mark.parametrize("n", [1, 2, 5])
def test_num_return_sequences_for_sampling_any_n(tiny_llama, n):
    lm = make_lm(tiny_llama)
    gen = lm.generate([PROMPT, "Hello"], do_sample=True, seed=5, num_return_sequences=n, max_new_tokens=4, top_k=0)
    assert len(gen.sequences) == 2 * n
    assert [s.prompt_index for s in gen.sequences] == [0] * n + [1] * n
    assert all(len(s.new_ids) == 4 and s.finish_reason == "length" for s in gen.sequences)


# --- degenerate values give the greedy result -----------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    dict(temperature=0.0),
    dict(temperature=1e-7),
    dict(top_k=1),
    dict(top_k=0, top_p=0.0),
    dict(top_k=0, top_p=1e-9),
    dict(top_k=0, min_p=1.0),
    dict(top_k=0, epsilon_cutoff=0.999),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_degenerate_sampling_settings_give_the_greedy_result(tiny_llama, kw):
    lm = make_lm(tiny_llama)
    greedy = lm.generate(PROMPT, max_new_tokens=8).sequences[0]
    for seed in (0, 99):
        seq = lm.generate(PROMPT, do_sample=True, seed=seed, max_new_tokens=8, trace=True, **kw).sequences[0]
        assert seq.new_ids == greedy.new_ids
        assert math.isfinite(seq.score)


def test_temperature_zero_is_greedy_in_the_config():
    cfg = GenerationConfig.from_kwargs(do_sample=True, temperature=0)
    assert cfg.do_sample is False
    assert GenerationConfig.from_kwargs(do_sample=True, temperature=1e-6).do_sample is False
    assert GenerationConfig.from_kwargs(do_sample=True, temperature=1e-4).do_sample is True


def test_removing_every_token_is_an_error_not_nan(tiny_llama):
    lm = make_lm(tiny_llama)
    with pytest.raises(ConfigError) as err:
        lm.generate(PROMPT, do_sample=True, seed=0, max_new_tokens=2, suppress_tokens=list(range(lm.vocab_size)))
    assert err.value.param == "suppress_tokens"
    with pytest.raises(ConfigError):
        lm.generate(PROMPT, max_new_tokens=2, suppress_tokens=list(range(lm.vocab_size)))


def test_the_step_arithmetic_on_the_host_equals_torch():
    """token_search's per-token arithmetic runs on NumPy views (host_scores): the greedy choice is torch.argmax's
    (first maximum, first NaN), the log-normaliser torch.logsumexp's to float32 rounding, with its edge rows
    (every token removed: -inf; +inf; NaN), and a row's numbers do not depend on the rows beside it."""
    import numpy as np

    from decodelab.search.sampling import host_scores, log_normalizers

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 49152, generator=gen) * 5
    scores[1] = float("-inf")
    scores[2, 7] = float("inf")
    scores[3, [11, 13]] = float("nan")
    scores[4, [5, 900]] = 1e4  # a tie: the first wins
    host = host_scores(scores)
    assert np.shares_memory(host, scores.numpy())  # a view, not a copy
    assert host.argmax(axis=-1).tolist() == torch.argmax(scores, dim=-1).tolist() == [
        int(torch.argmax(scores[0])), 0, 7, 11, 5, int(torch.argmax(scores[5]))]
    ours, ref = torch.from_numpy(log_normalizers(host)), torch.logsumexp(scores, dim=-1)
    assert ours[1] == float("-inf") and ours[2] == float("inf") and ours[3].isnan()
    assert torch.allclose(ours[[0, 4, 5]], ref[[0, 4, 5]], rtol=1e-6, atol=0)
    for r in (0, 4, 5):  # alone: the same bits as in the batch
        assert log_normalizers(host[r : r + 1])[0] == ours[r].item()
    assert host_scores(scores.to(torch.bfloat16)).dtype == np.float32  # no NumPy bfloat16: a float32 copy
