"""The fast path with sliding attention windows: Gemma 3 text (alternating sliding / full layers) and Mistral / Phi-3
with a window shorter than the sequence, bit for bit the plain path (transformers with a DynamicCache).

Tiny random models (norm weights randomised, so that Gemma's ``1 + w`` and the per-head norms are exercised). Prompts
and decode runs are longer than the window, so every sliding layer trims its keys: prefill and >= 16 decode-step
float32 logits ``torch.equal`` to ``Engine(model, fast=False)``'s, batch 1 and a left-padded batch of 3; greedy and
beam (repetition penalty) ids equal ``model.generate``'s; ``kernels="fast"`` within float32 rounding; continuous
batching gives each request its answer alone; the compiled step (its row plan run eagerly, and compiled) stays
close.
"""

from __future__ import annotations

import pytest
import torch

import decodelab
from decodelab.engine import Engine
from decodelab.fastpath import unsupported_reason
from decodelab.fastpath.static import StaticStep
from tiny_models import run_steps

STEPS = 18
PATTERN = ["sliding_attention", "sliding_attention", "full_attention"] * 2


def _randomize_norms(model, seed: int, center: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + center)


def tiny_gemma3(window: int = 4, n_kv: int = 2, softcap: float | None = 30.0):
    """A seeded tiny random Gemma3ForCausalLM: 6 layers S,S,F,S,S,F, GQA 4/2, head_dim 16, query_pre_attn_scalar 24,
    linear rope scaling on the full layers, final logit soft-capping."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=n_kv, head_dim=16, sliding_window=window, max_position_embeddings=256,
        query_pre_attn_scalar=24, final_logit_softcapping=softcap, layer_types=list(PATTERN),
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}},
        pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.1, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        model = Gemma3ForCausalLM(cfg).float().eval()
        _randomize_norms(model, 7, 0.0)
    return model


def tiny_windowed(arch: str, window: int = 4):
    """A seeded tiny random Mistral or Phi-3 (Llama's layer; Phi-3 with stacked q/k/v and gate/up) whose sliding window
    of ``window`` positions binds: 2 layers, GQA 4/2, randomised norm weights."""
    import transformers

    config_cls, model_cls, seed = {"mistral": ("MistralConfig", "MistralForCausalLM", 4),
                                   "phi3": ("Phi3Config", "Phi3ForCausalLM", 5)}[arch]
    cfg = getattr(transformers, config_cls)(
        vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=window, initializer_range=0.1,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_cls)(cfg).eval()
        _randomize_norms(model, seed + 4, 1.0)
    return model


MODELS = {"gemma3": tiny_gemma3, "gemma3_w8_mha": lambda: tiny_gemma3(window=8, n_kv=4, softcap=None),
          "mistral": lambda: tiny_windowed("mistral"), "phi3": lambda: tiny_windowed("phi3")}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def prompts(lengths: list[int], seed: int = 0):
    """Left-padded (B, max(lengths)) ids (pad 0) and mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, 1000, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, width - n:] = 1
        ids[r, : width - n] = 0
    return ids, mask


BATCHES = [[3], [9], [12, 7, 3], [6, 2, 5], [8, 8, 1]]


def test_windowed_models_take_the_fast_path_bit_exactly(model):
    """Prefill and 18 decode steps (the window binds from the 4th / 8th position on): logits bit for bit the plain
    path's, batch 1 (prompt shorter / longer than the window) and left-padded batches of 3."""
    assert unsupported_reason(model) is None
    fast, plain = Engine(model), Engine(model, fast=False)
    assert fast.fast is not None and plain.fast is None
    assert any(layer.window is not None for layer in fast.fast.layers)
    for lengths in BATCHES:
        ids, mask = prompts(lengths, seed=len(lengths) * 10 + max(lengths))
        a, b = run_steps(fast, ids, mask, STEPS, STEPS)[0], run_steps(plain, ids, mask, STEPS, STEPS)[0]
        for step, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), (lengths, step, float((x - y).abs().max()))


def test_windowed_beam_reorders_match_plain(model):
    """Rows swapped / duplicated before steps (``StaticKVCache.select``), as beam search does: still bit for bit."""
    fast, plain = Engine(model), Engine(model, fast=False)
    ids, mask = prompts([7, 3], seed=3)

    def reorder(step, rows):
        return torch.tensor([1, 1] if step % 3 == 0 else [1, 0])

    fast_steps, plain_steps = run_steps(fast, ids, mask, STEPS, STEPS, reorder)[0], run_steps(plain, ids, mask, STEPS,
                                                                                             STEPS, reorder)[0]
    for x, y in zip(fast_steps, plain_steps):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=20),
                                dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, repetition_penalty=2.0)])
def test_windowed_ids_equal_model_generate(model, tiny_llama, kw):
    """Greedy (20 tokens) and beam search with a repetition penalty: ``model.generate``'s ids (eos off)."""
    prompt = torch.tensor([[5, 17, 300, 42, 7, 9, 11]])
    with torch.inference_mode():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0,
                             eos_token_id=None, **kw)[:, 7:].tolist()
    lm = decodelab.LM(model, tiny_llama.tokenizer, "tiny-windowed")  # ids in, ids out: any tokenizer
    assert lm.engine.fast is not None
    ours = lm.generate(prompt[0].tolist(), ignore_eos=True, **kw).sequences
    assert [s.new_ids for s in ours] == ref[: len(ours)]


def test_windowed_fast_kernels_stay_within_rounding(model):
    """``kernels="fast"`` (fused products, measured kernels): close to the plain path, not bit for bit."""
    fused, plain = Engine(model, kernels="fast"), Engine(model, fast=False)
    assert fused.fast is not None and fused.fast.fused
    ids, mask = prompts([12, 7, 3], seed=1)
    for x, y in zip(run_steps(fused, ids, mask, STEPS, STEPS)[0], run_steps(plain, ids, mask, STEPS, STEPS)[0]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_static_rows_mask_the_window(model):
    """The compiled step's row plan (``StaticRows``: whole-capacity attention, positions older than the window
    masked), run eagerly: within float32 rounding of the eager fast path's decode steps."""
    engine = Engine(model)
    ids, mask = prompts([12, 7, 3], seed=2)
    logits, state = engine.prefill(ids, mask, STEPS)
    static = StaticStep(engine.fast)
    other = state.cache.clone()
    positions = state.positions.clone()
    for _ in range(STEPS):
        tokens = logits.argmax(-1)
        logits = engine.step(state, tokens)
        other.append_mask()
        positions = positions + 1
        index = torch.tensor([other.length])
        ref = static(tokens[:, None], positions, index, other.keys, other.values, other.pad)
        other.length += 1
        torch.testing.assert_close(ref.float(), logits, rtol=1e-4, atol=1e-4)


def test_two_gemma3_requests_batched_equal_alone(tiny_llama):
    """Continuous batching (``LM.generate_many``) of two Gemma 3 requests longer than the window: each gets the ids
    and scores it gets alone."""
    lm = decodelab.LM(tiny_gemma3(), tiny_llama.tokenizer, "tiny-gemma3")
    assert lm.engine.fast is not None
    requests = [{"prompt": [5, 17, 300, 42, 7, 9, 11], "max_new_tokens": 12, "ignore_eos": True},
                {"prompt": [8, 3], "max_new_tokens": 10, "ignore_eos": True, "num_beams": 2}]
    alone = [lm.generate(r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}) for r in requests]
    started = []
    real_start = lm.engine.start_batching
    lm.engine.start_batching = lambda *a, **k: started.append(real_start(*a, **k)) or started[-1]
    try:
        together = lm.generate_many(requests)
    finally:
        del lm.engine.start_batching
    assert started[0].max_rows > 1  # the requests really shared decode steps
    for a, b in zip(alone, together):
        assert [s.ids for s in a.sequences] == [s.ids for s in b.sequences]
        assert [s.score for s in a.sequences] == [s.score for s in b.sequences]


@pytest.mark.parametrize("model_type, extra", [("gemma", {}), ("gemma2", {"sliding_window": 4})])
def test_other_gemma_types_stay_on_the_plain_path(model_type, extra):
    import transformers

    config = transformers.AutoConfig.for_model(model_type, vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                               intermediate_size=32, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    engine = Engine(model)
    assert engine.fast is None and f"model_type {model_type!r} is not one of" in engine.fast_reason


def test_gemma3_bidirectional_attention_stays_on_the_plain_path():
    from transformers import Gemma3ForCausalLM

    model = tiny_gemma3()
    cfg = model.config
    cfg.use_bidirectional_attention = True
    assert unsupported_reason(Gemma3ForCausalLM(cfg).eval()) == "bidirectional attention (use_bidirectional_attention)"


def test_compiled_step_with_sliding_layers_matches_eager(tiny_llama, tmp_path, monkeypatch):
    """``compile=`` on Gemma 3 (AOTInductor, freezing, ~30 s): the exported step masks the positions older than the
    window over the whole cache; its first-use check against the eager step (the window already binds there) passes
    within rounding and the greedy ids are the eager fast path's."""
    monkeypatch.setenv("DECODELAB_CACHE_DIR", str(tmp_path))
    model = tiny_gemma3()
    compiled = decodelab.LM(model, tiny_llama.tokenizer, "tiny-gemma3")
    compiled.engine = Engine(model, compile={"freezing": True})
    compiled.engine.compiled.progress = lambda msg: None
    eager = decodelab.LM(model, tiny_llama.tokenizer, "tiny-gemma3")
    prompt = [5, 17, 300, 42, 7, 9, 11]
    a = compiled.generate(prompt, max_new_tokens=12, ignore_eos=True).sequences[0].new_ids
    assert a == eager.generate(prompt, max_new_tokens=12, ignore_eos=True).sequences[0].new_ids
    (stat,) = compiled.engine.compiled.stats.values()
    assert stat["ok"] and stat["max_rel_err"] < 1e-4
