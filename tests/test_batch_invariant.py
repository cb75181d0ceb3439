"""``batch_invariant=True`` (``--batch-invariant``): the fast kernels made batch-invariant.

With ``kernels="fast"`` a request's logits normally depend on its batch neighbours at the ~1e-5 level (the product
measured fastest for 16 rows is not the one for 1 row). The option runs decodelab's ``panels`` GEMM at every row count
and decodelab's attention kernel in every decode step (pooled slot or cache of its own), so that ``generate_many``
returns exactly what ``generate`` returns alone: ids, scores, finish reasons, traces; greedy, beam search with a
repetition penalty, seeded sampling with several samples, stop strings, prompts joining decode steps. Where those
kernels cannot run, the option is a one-line ``ConfigError``, never a silent fallback.
"""

from __future__ import annotations

import pytest
import torch
from test_continuous_batching import REQUESTS, check_same, clone, prefill
from typer.testing import CliRunner

import decodelab
from decodelab import cli
from decodelab.engine import Engine
from decodelab.errors import ConfigError
from decodelab.fastpath import kernel_choice, native

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler / AVX2 here")


def invariant_lm(loaded) -> decodelab.LM:
    return decodelab.LM(loaded.model, loaded.tokenizer, loaded.name,
                        engine=Engine(loaded.model, batch_invariant=True))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_generate_many_equals_generate_alone_with_fast_kernels(fixture, request, monkeypatch):
    def no_measuring(*args, **kwargs):
        raise AssertionError("batch_invariant takes no measured choice")

    monkeypatch.setattr(kernel_choice, "choices", no_measuring)
    lm = invariant_lm(request.getfixturevalue(fixture))
    assert (lm.engine.kernels, lm.engine.config.batch_invariant) == ("fast", True)
    summary = lm.engine.fast.kernel_summary()
    assert summary.count("1-16 panels") == len(summary.split("; "))  # every shape, every row count
    scheduler = check_same(lm, REQUESTS)
    assert scheduler.max_rows > 1 and scheduler.rows_stepped > scheduler.steps  # really batched
    assert scheduler.joined > 0  # and some prompts joined a decode step (one pass with the running rows)


def test_step_many_equals_each_request_alone_bit_for_bit(tiny_qwen2):
    """Engine level, requests with their own caches (1, 2 left-padded and 3 rows) in one decode step: each gets
    the logits of its step alone, difference 0.0. The same with another product for one row than for several (as a
    measured choice has) differs: so this test would notice a batch-dependent kernel."""
    tok, pad = tiny_qwen2.tokenizer, tiny_qwen2.tokenizer.pad_token_id
    ids = lambda text: tok(text).input_ids  # noqa: E731
    prompts = [([ids("It was a dark and stormy")], 1), ([ids("The capital of France is"), ids("Hi")], 1),
               ([ids("Once upon a time there was")], 3), ([ids("def fib(n):")], 1)]
    engine = Engine(tiny_qwen2.model, batch_invariant=True)
    projections = [p for layer in engine.fast.layers for p in layer.projections().values()] + [engine.fast.lm_head]

    def worst_difference() -> float:
        states = [prefill(engine, p, pad, rows_each=n) for p, n in prompts]
        alone = [clone(s) for s in states]
        gen = torch.Generator().manual_seed(0)
        worst = 0.0
        for _ in range(3):
            tokens = [torch.randint(0, 1000, (s.positions.shape[0],), generator=gen) for s in states]
            together = engine.step_many(states, tokens)
            for s, t, got in zip(alone, tokens, together):
                worst = max(worst, float((engine.step(s, t) - got).abs().max()))
        return worst

    assert worst_difference() == 0.0
    for proj in projections:
        proj.choice = {**proj.choice, 1: "linear"}
    assert worst_difference() > 0.0


@pytest.mark.slow
def test_generate_many_equals_generate_alone_embedded(embedded):
    lm = invariant_lm(embedded)
    scheduler = check_same(lm, REQUESTS)
    assert scheduler.max_rows >= 4


def test_without_the_c_kernels_it_is_a_config_error_not_a_fallback(tiny_llama, monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    with pytest.raises(ConfigError) as info:
        Engine(tiny_llama.model, batch_invariant=True)
    assert info.value.param == "batch_invariant"
    assert str(info.value).startswith("batch_invariant=True: this model cannot run batch-invariant here; it needs "
                                      "decodelab's attention kernel, built on an x86-64 CPU with AVX2")
    assert Engine(tiny_llama.model, kernels="fast").kernels == "fast"  # the measured fast path still runs


def test_cli_refuses_it_with_bfloat16_in_one_line():
    result = CliRunner().invoke(cli.app, ["generate", "Hello", "--batch-invariant", "--dtype", "bfloat16"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: batch_invariant=True with kernels='fast' runs decodelab's own float32 CPU "
                                     "kernels; it cannot be combined with dtype='bfloat16'")
