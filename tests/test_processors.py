"""Logits processors: properties on synthetic scores (hypothesis), exact agreement with transformers' own processor
classes, and ``model.generate`` parity (exact ids) for every deterministic processor combination, greedy and beam,
on a tiny random Llama and (few, short cases) on the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.generation import logits_process as hf

import decodelab
from decodelab.config import GenerationConfig
from decodelab.processors import (
    Context,
    EpsilonCutoff,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    SequenceBias,
    SuppressTokens,
    Temperature,
    TopK,
    TopP,
    TypicalP,
    build_processors,
)

NEG_INF = -math.inf
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- synthetic inputs ----------------------------------------------------------------------------------------------


@st.composite
def batches(draw, min_v: int = 2, max_v: int = 12, allow_inf: bool = True):
    """(input_ids (B, T), scores (B, V), Context) with T = prompt + generated, some scores maybe -inf (as after an
    earlier processor), at least one finite score per row, and left padding on some rows."""
    B = draw(st.integers(1, 3))
    V = draw(st.integers(min_v, max_v))
    T0 = draw(st.integers(1, 5))
    gen_len = draw(st.integers(0, 4))
    value = st.floats(-30, 30, allow_nan=False, width=32)
    if allow_inf:
        value = st.one_of(value, value, value, st.just(NEG_INF))
    rows = []
    for _ in range(B):
        row = draw(st.lists(value, min_size=V, max_size=V))
        if all(x == NEG_INF for x in row):
            row[draw(st.integers(0, V - 1))] = draw(st.floats(-30, 30, width=32))
        rows.append(row)
    scores = torch.tensor(rows, dtype=torch.float32)
    ids = torch.tensor(draw(st.lists(st.lists(st.integers(0, V - 1), min_size=T0 + gen_len, max_size=T0 + gen_len),
                                     min_size=B, max_size=B)), dtype=torch.long)
    pads = torch.tensor([draw(st.integers(0, T0 - 1)) for _ in range(B)], dtype=torch.long)
    eos = torch.tensor(draw(st.lists(st.integers(0, V - 1), max_size=2, unique=True)), dtype=torch.long)
    return ids, scores, Context(T0, pads, eos)


def seen(ids: torch.Tensor, start, V: int) -> torch.Tensor:
    """Reference (B, V) mask: ids occurring in ids[b, start[b]:]."""
    out = torch.zeros((ids.shape[0], V), dtype=torch.bool)
    for b in range(ids.shape[0]):
        s = int(start[b]) if torch.is_tensor(start) else start
        for t in ids[b, s:].tolist():
            out[b, t] = True
    return out


def run_unchanged(proc, ids, scores):
    """Apply ``proc`` and check it did not modify its inputs."""
    before_scores, before_ids = scores.clone(), ids.clone()
    out = proc(ids, scores)
    assert torch.equal(scores, before_scores), f"{proc.name} modified the scores in place"
    assert torch.equal(ids, before_ids)
    assert out.shape == scores.shape and out.dtype == scores.dtype
    return out


def survivors(out: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(out).sum(dim=-1)


# --- properties per processor ---------------------------------------------------------------------------------------


@PROPS
@given(batches(), st.floats(1.0, 5.0))
def test_repetition_penalty_lowers_only_seen_tokens(data, penalty):
    ids, scores, ctx = data
    out = run_unchanged(RepetitionPenalty(penalty, ctx), ids, scores)
    mask = seen(ids, ctx.pad_lengths, scores.shape[-1])
    assert torch.all(out[mask] <= scores[mask])  # divided when positive, multiplied when negative
    assert torch.equal(out[~mask], scores[~mask])  # unseen tokens (and padding) untouched
    pos = mask & (scores > 0)
    assert torch.allclose(out[pos], scores[pos] / penalty)
    assert torch.equal(survivors(out), survivors(scores))


@PROPS
@given(batches(), st.floats(0.0, 2.0), st.floats(0.0, 2.0))
def test_presence_frequency_penalise_generated_tokens_only(data, presence, frequency):
    ids, scores, ctx = data
    out = run_unchanged(PresenceFrequencyPenalty(presence, frequency, ctx), ids, scores)
    V = scores.shape[-1]
    generated = ids[:, ctx.prompt_len :]
    for b in range(ids.shape[0]):
        counts = torch.bincount(generated[b], minlength=V).float()
        expected = scores[b] - counts * frequency - (counts > 0).float() * presence
        assert torch.allclose(out[b], expected, equal_nan=False)
        assert torch.all(out[b][counts == 0] == scores[b][counts == 0])  # prompt-only tokens untouched
        assert torch.all(out[b] <= scores[b])


@PROPS
@given(batches(allow_inf=False), st.integers(1, 3))
def test_no_repeat_ngram_bans_exactly_the_repeating_completions(data, n):
    ids, scores, ctx = data
    out = run_unchanged(NoRepeatNGram(n, ctx), ids, scores)
    for b in range(ids.shape[0]):
        toks = ids[b, int(ctx.pad_lengths[b]) :].tolist()
        banned = set()
        if len(toks) + 1 >= n:
            tail = tuple(toks[len(toks) - n + 1 :]) if n > 1 else ()
            banned = {toks[i + n - 1] for i in range(len(toks) - n + 1) if tuple(toks[i : i + n - 1]) == tail}
        removed = {j for j in range(scores.shape[-1]) if out[b, j] == NEG_INF}
        assert removed == banned
        assert torch.equal(out[b][list(set(range(scores.shape[-1])) - banned)], scores[b][list(set(range(scores.shape[-1])) - banned)])


@PROPS
@given(batches(allow_inf=False), st.integers(0, 6))
def test_min_new_tokens_blocks_eos_until_reached(data, min_new):
    ids, scores, ctx = data
    out = run_unchanged(MinNewTokens(min_new, ctx), ids, scores)
    generated = ids.shape[1] - ctx.prompt_len
    for j in range(scores.shape[-1]):
        if j in ctx.eos_ids.tolist() and generated < min_new:
            assert torch.all(out[:, j] == NEG_INF)
        else:
            assert torch.equal(out[:, j], scores[:, j])


@PROPS
@given(batches(allow_inf=False), st.data())
def test_suppress_tokens_removes_exactly_the_listed_ids(data, extra):
    ids, scores, ctx = data
    V = scores.shape[-1]
    listed = extra.draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=V - 1, unique=True))
    out = run_unchanged(SuppressTokens(tuple(listed)), ids, scores)
    keep = [j for j in range(V) if j not in listed]
    assert torch.all(out[:, listed] == NEG_INF)
    assert torch.equal(out[:, keep], scores[:, keep])


@PROPS
@given(batches(), st.data())
def test_sequence_bias_matches_transformers(data, extra):
    ids, scores, _ = data
    V = scores.shape[-1]
    keys = extra.draw(st.lists(st.lists(st.integers(0, V - 1), min_size=1, max_size=3).map(tuple), min_size=1,
                               max_size=4, unique=True))
    bias = {k: extra.draw(st.floats(-5, 5, width=32)) for k in keys}
    out = run_unchanged(SequenceBias(bias), ids, scores)
    expected = hf.SequenceBiasLogitsProcessor(sequence_bias={k: float(v) for k, v in bias.items()})(ids, scores)
    assert torch.equal(out, expected)


@PROPS
@given(batches(), st.floats(0.05, 5.0))
def test_temperature_scales(data, t):
    ids, scores, _ = data
    out = run_unchanged(Temperature(t), ids, scores)
    assert torch.equal(out, scores / t)


@PROPS
@given(batches(), st.integers(1, 12), st.integers(1, 3))
def test_top_k_keeps_the_k_best(data, k, keep):
    ids, scores, _ = data
    out = run_unchanged(TopK(k, keep), ids, scores)
    V = scores.shape[-1]
    for b in range(scores.shape[0]):
        kth = torch.sort(scores[b], descending=True).values[min(max(k, keep), V) - 1]
        kept = out[b] != NEG_INF
        assert torch.equal(kept, (scores[b] >= kth) & (scores[b] != NEG_INF))
        assert torch.equal(out[b][kept], scores[b][kept])
    assert torch.all(survivors(out) >= 1)


def _probs(row: torch.Tensor) -> list[float]:
    return torch.softmax(row.double(), dim=-1).tolist()


@PROPS
@given(batches(), st.floats(0.0, 1.0), st.integers(1, 2))
def test_top_p_keeps_the_smallest_set_reaching_p(data, p, min_keep):
    ids, scores, _ = data
    out = run_unchanged(TopP(p, min_keep), ids, scores)
    for b in range(scores.shape[0]):
        probs = _probs(scores[b])
        kept = [j for j in range(len(probs)) if out[b, j] != NEG_INF]
        dropped = [j for j in range(len(probs)) if out[b, j] == NEG_INF and scores[b, j] != NEG_INF]
        assert kept, "top-p removed every token"
        assert all(probs[i] >= probs[j] for i in kept for j in dropped), "a dropped token beat a kept one"
        mass = sum(probs[j] for j in kept)
        assert mass >= p - 1e-5 or not dropped  # reaches p
        if len(kept) > min_keep:  # ... and is the smallest such set: without its least likely token it falls short
            assert mass - min(probs[j] for j in kept) < p + 1e-5


def test_top_p_example_from_the_issue():
    """Probabilities [0.5, 0.25, 0.25] at top_p=0.75 keep exactly the first two tokens."""
    scores = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    out = TopP(0.75)(torch.zeros((1, 1), dtype=torch.long), scores)
    assert torch.isfinite(out).tolist() == [[True, True, False]]
    assert torch.softmax(out, -1)[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])
    # tiny and zero top_p keep just the most likely token
    for p in (0.0, 1e-9, 0.4):
        assert torch.isfinite(TopP(p)(torch.zeros((1, 1), dtype=torch.long), scores)).tolist() == [[True, False, False]]


@PROPS
@given(batches(), st.floats(0.0, 1.0), st.integers(1, 2))
def test_min_p_drops_tokens_below_the_scaled_top_probability(data, min_p, keep):
    ids, scores, _ = data
    out = run_unchanged(MinP(min_p, keep), ids, scores)
    for b in range(scores.shape[0]):
        probs = torch.softmax(scores[b], -1)
        top = probs.max()
        kept = out[b] != NEG_INF
        assert kept.sum() >= min(keep, int(torch.isfinite(scores[b]).sum()))
        above = (probs >= min_p * top) & torch.isfinite(scores[b])
        assert torch.all(kept[above])  # every token at or above the threshold survives
        assert torch.equal(out[b][kept], scores[b][kept])


@PROPS
@given(batches(), st.floats(0.01, 0.99))
def test_typical_p_keeps_at_least_one_and_never_adds(data, mass):
    ids, scores, _ = data
    out = run_unchanged(TypicalP(mass), ids, scores)
    assert torch.all(survivors(out) >= 1)
    kept = out != NEG_INF
    assert torch.equal(out[kept], scores[kept])
    assert torch.all(torch.isfinite(scores)[kept])


@PROPS
@given(batches(), st.floats(1e-4, 0.9), st.booleans())
def test_epsilon_and_eta_drop_only_improbable_tokens(data, eps, eta):
    ids, scores, _ = data
    out = run_unchanged(EpsilonCutoff(eps, 1, eta=eta), ids, scores)
    assert torch.all(survivors(out) >= 1)
    probs = torch.softmax(scores, -1)
    removed = (out == NEG_INF) & (scores != NEG_INF)
    assert torch.all(probs[removed] < eps + 1e-7)  # eta's threshold is min(eps, ...) <= eps
    kept = out != NEG_INF
    assert torch.equal(out[kept], scores[kept])


# --- exact agreement with transformers' processor classes (continuous random scores: no ties) ----------------------


def _random_case(seed: int, B: int = 3, V: int = 50, T0: int = 6, gen: int = 5):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn((B, V), generator=g) * 3
    ids = torch.randint(0, V, (B, T0 + gen), generator=g)
    return ids, scores


def _hf_cases():
    eos = torch.tensor([3, 7])
    return [
        (RepetitionPenalty(1.7, Context(6, torch.tensor([0, 2, 1]), eos)),
         hf.RepetitionPenaltyLogitsProcessor(1.7, prompt_ignore_length=torch.tensor([0, 2, 1]))),
        (RepetitionPenalty(0.6, Context(6, torch.zeros(3, dtype=torch.long), eos)),
         hf.RepetitionPenaltyLogitsProcessor(0.6, prompt_ignore_length=torch.zeros(3, dtype=torch.long))),
        (NoRepeatNGram(2, Context(6, torch.zeros(3, dtype=torch.long), eos)), hf.NoRepeatNGramLogitsProcessor(2)),
        (NoRepeatNGram(1, Context(6, torch.zeros(3, dtype=torch.long), eos)), hf.NoRepeatNGramLogitsProcessor(1)),
        (MinNewTokens(8, Context(6, torch.zeros(3, dtype=torch.long), eos)),
         hf.MinNewTokensLengthLogitsProcessor(6, 8, eos)),
        (SuppressTokens((1, 4, 9)), hf.SuppressTokensLogitsProcessor([1, 4, 9])),
        (SequenceBias({(5,): -2.5, (1, 2): 4.0}), hf.SequenceBiasLogitsProcessor(sequence_bias={(5,): -2.5, (1, 2): 4.0})),
        (SequenceBias({(9,): NEG_INF, (4, 8): NEG_INF}, "bad_words_ids"),
         hf.NoBadWordsLogitsProcessor([[9], [4, 8]], eos_token_id=eos)),
        (Temperature(0.7), hf.TemperatureLogitsWarper(0.7)),
        (TopK(7), hf.TopKLogitsWarper(7)),
        (TopK(1, 3), hf.TopKLogitsWarper(1, min_tokens_to_keep=3)),
        (TopP(0.8), hf.TopPLogitsWarper(0.8)),
        (TopP(0.3, 3), hf.TopPLogitsWarper(0.3, min_tokens_to_keep=3)),
        (MinP(0.2), hf.MinPLogitsWarper(0.2)),
        (MinP(0.9, 3), hf.MinPLogitsWarper(0.9, min_tokens_to_keep=3)),
        (TypicalP(0.7), hf.TypicalLogitsWarper(0.7)),
        (TypicalP(0.2, 2), hf.TypicalLogitsWarper(0.2, min_tokens_to_keep=2)),
        (EpsilonCutoff(0.02), hf.EpsilonLogitsWarper(0.02)),
        (EpsilonCutoff(0.02, eta=True), hf.EtaLogitsWarper(0.02, device="cpu")),
    ]


@pytest.mark.parametrize("case", range(len(_hf_cases())))
def test_processor_equals_transformers_class(case):
    ours, theirs = _hf_cases()[case]
    for seed in range(8):
        ids, scores = _random_case(seed)
        for s in (scores, torch.log_softmax(scores, -1)):  # logits (greedy / sampling) and log-probs (beam search)
            expected = theirs(ids, s.clone())
            got = ours(ids, s)
            assert torch.equal(got, expected), f"{ours.name} differs from {type(theirs).__name__} (seed {seed})"


def test_build_processors_order_matches_transformers():
    cfg = GenerationConfig.from_kwargs(
        do_sample=True, sequence_bias={(1, 2): 1.0}, logit_bias={3: -1.0}, repetition_penalty=1.2,
        presence_penalty=0.5, no_repeat_ngram_size=3, bad_words_ids=[[4]], min_new_tokens=2, suppress_tokens=[5],
        temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.95, epsilon_cutoff=1e-4, eta_cutoff=1e-4,
    )
    ctx = Context(3, torch.zeros(1, dtype=torch.long), torch.tensor([0]))
    names = [p.name for p in build_processors(cfg, ctx)]
    assert names == ["sequence_bias", "logit_bias", "repetition_penalty", "presence_frequency_penalty",
                     "no_repeat_ngram_size", "bad_words_ids", "min_new_tokens", "suppress_tokens", "temperature",
                     "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"]
    greedy = build_processors(cfg.replace(do_sample=False), ctx)
    assert [p.name for p in greedy][-1] == "suppress_tokens"  # warpers only when sampling
    # bad words equal to an eos id are ignored (transformers' NoBadWordsLogitsProcessor)
    only_eos = build_processors(GenerationConfig.from_kwargs(bad_words_ids=[[0]]), ctx)
    assert only_eos == []


# --- generate parity with transformers: every deterministic combination --------------------------------------------


def hf_new_ids(loaded, prompt, **kw):
    tok = loaded.tokenizer
    enc = tok(prompt, return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = loaded.model.generate(**enc, pad_token_id=tok.pad_token_id, do_sample=False, **kw)
    width = enc.input_ids.shape[1]
    return [row[width:] for row in out.tolist()]


def assert_parity(loaded, prompt, **kw):
    lm = decodelab.LM(loaded.model, loaded.tokenizer, loaded.name)
    ours = lm.generate(prompt, **kw)
    theirs = hf_new_ids(loaded, prompt, **kw)
    assert len(ours.sequences) == len(theirs)
    for seq, row in zip(ours.sequences, theirs):
        assert row[: len(seq.new_ids)] == seq.new_ids
        assert all(t == lm.pad_id for t in row[len(seq.new_ids) :]), "transformers went on where we stopped"
    return ours


TINY_PROMPT = "It was a dark and stormy"

# The tiny model's greedy continuation of TINY_PROMPT is 28540 x3, 34468 x4, 44714 x5: the ids below make every
# processor change the result.
COMBINATIONS = [
    dict(repetition_penalty=1.8),
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=1, repetition_penalty=0.8),
    dict(bad_words_ids=[[34468], [28540, 28540]], suppress_tokens=[44714]),
    dict(sequence_bias={(28540,): -4.0, (34468, 34468): -3.0, (34468, 44714): 2.0}),
    dict(repetition_penalty=1.3, no_repeat_ngram_size=3, suppress_tokens=[44714]),
]


@pytest.mark.parametrize("kw", COMBINATIONS, ids=lambda kw: ",".join(kw))
@pytest.mark.parametrize("beams", [1, 3])
def test_tiny_parity_processor_combinations(tiny_llama, kw, beams):
    extra = dict(num_beams=beams, num_return_sequences=2) if beams > 1 else {}
    assert_parity(tiny_llama, TINY_PROMPT, max_new_tokens=10, **kw, **extra)


def _greedy_ids(loaded, prompt, n):
    lm = decodelab.LM(loaded.model, loaded.tokenizer, loaded.name)
    return lm.generate(prompt, max_new_tokens=n).sequences[0].new_ids


def test_tiny_parity_eos_sets_and_min_new_tokens(tiny_llama):
    greedy = _greedy_ids(tiny_llama, TINY_PROMPT, 8)
    eos = [greedy[3], 12345]  # an eos set whose first id the model emits at step 3
    gen = assert_parity(tiny_llama, TINY_PROMPT, max_new_tokens=10, eos_token_id=eos)
    assert gen.sequences[0].new_ids == greedy[:4] and gen.sequences[0].finish_reason == "eos"
    # min_new_tokens bans the eos ids for the first 6 tokens
    gen = assert_parity(tiny_llama, TINY_PROMPT, max_new_tokens=10, eos_token_id=eos, min_new_tokens=6)
    assert len(gen.sequences[0].new_ids) >= 6 and greedy[3] not in gen.sequences[0].new_ids[:6]
    assert_parity(tiny_llama, TINY_PROMPT, max_new_tokens=10, eos_token_id=eos, num_beams=3, num_return_sequences=3)
    assert_parity(tiny_llama, TINY_PROMPT, max_new_tokens=10, eos_token_id=eos, num_beams=3, min_new_tokens=5,
                  no_repeat_ngram_size=2)


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 2.5, -1.0])
def test_tiny_parity_beam_length_penalty_and_early_stopping(tiny_llama, early_stopping, length_penalty):
    greedy = _greedy_ids(tiny_llama, TINY_PROMPT, 6)
    # eos ids the beams actually reach, so that hypotheses finish at different lengths and the heuristics matter
    gen = assert_parity(tiny_llama, TINY_PROMPT, max_new_tokens=8, num_beams=4, num_return_sequences=4,
                        eos_token_id=[greedy[2], greedy[4]], length_penalty=length_penalty,
                        early_stopping=early_stopping)
    scores = [s.score for s in gen.sequences]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("kw", [
    dict(repetition_penalty=1.5, no_repeat_ngram_size=3, suppress_tokens=[28]),
    dict(num_beams=2, num_return_sequences=2, length_penalty=0.5, early_stopping=True, repetition_penalty=1.3,
         min_new_tokens=6, bad_words_ids=[[13]]),
], ids=["greedy", "beam"])
def test_embedded_parity_combinations(embedded, kw):
    assert_parity(embedded, "The capital of France is", max_new_tokens=8, **kw)


def test_logit_bias_equals_transformers_single_token_sequence_bias(tiny_llama):
    lm = decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.name)
    ours = lm.generate(TINY_PROMPT, max_new_tokens=8, logit_bias={"28540": -3.0, 34468: -100.0})
    theirs = hf_new_ids(tiny_llama, TINY_PROMPT, max_new_tokens=8, sequence_bias={(28540,): -3.0, (34468,): -100.0})
    assert ours.sequences[0].new_ids == theirs[0]
    assert 34468 not in ours.sequences[0].new_ids


def test_presence_and_frequency_penalties_against_a_reference_loop(tiny_llama):
    """Greedy with OpenAI penalties equals a plain loop: full forward pass, then
    ``logits - count * frequency - (count > 0) * presence`` over the generated tokens only."""
    lm = decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.name)
    presence, frequency, n = 0.7, 1.1, 8
    ours = lm.generate(TINY_PROMPT, max_new_tokens=n, presence_penalty=presence, frequency_penalty=frequency)
    ids = tiny_llama.tokenizer(TINY_PROMPT).input_ids
    prompt_len = len(ids)
    with torch.inference_mode():
        for _ in range(n):
            logits = tiny_llama.model(torch.tensor([ids])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(ids[prompt_len:], dtype=torch.long), minlength=logits.shape[0])
            ids.append(int(torch.argmax(logits - counts * frequency - (counts > 0).float() * presence)))
    assert ours.sequences[0].new_ids == ids[prompt_len:]
    plain = lm.generate(TINY_PROMPT, max_new_tokens=n).sequences[0].new_ids
    assert len(set(ours.sequences[0].new_ids)) > len(set(plain))  # the penalties do break the repetition
