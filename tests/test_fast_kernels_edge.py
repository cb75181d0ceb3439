"""Edge cases of ``kernels="fast"`` (fused q/k/v and gate/up rebinding the model's parameters, weight-major
products, float32 activations for 16-bit models): grad / inference modes, float16 models, the layout of the logits,
odd model geometries, several engines on one model. Tiny seeded models with a small vocabulary built here (each test
builds its own: the fused engines rebind the model's parameters, so the session fixtures are left alone).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import decodelab
from decodelab.engine import Engine
from decodelab.engine_config import EngineConfig
from decodelab.fastpath.projections import MeasuredDense
from tiny_models import run_steps


def build(arch: str = "llama", *, vocab: int = 1000, hidden: int = 64, heads: int = 4, kv: int = 2, inter: int = 64,
          tie: bool = True, head_dim: int | None = None, seed: int = 0):
    """A seeded tiny random Llama / Qwen2 (float32, eval), Qwen2's q/k/v biases made non-zero."""
    cfg = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
               num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512,
               tie_word_embeddings=tie, initializer_range=0.1)
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    config, cls = (Qwen2Config(**cfg), Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig(**cfg), LlamaForCausalLM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).to(torch.float32).eval()
        if arch == "qwen2":
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0, 0.1)
    return model


def left_padded(vocab: int, lengths: list[int], seed: int = 1):
    """(B, T) ids and mask of random prompts of the given lengths, left-padded to the longest."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, vocab, (n,), generator=gen)
        mask[row, width - n:] = 1
    return ids, mask


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _model_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_engine_built_in_inference_mode_leaves_the_model_usable_with_autograd():
    """Building a fused engine inside ``torch.inference_mode()`` used to rebind q/k/v/gate/up to inference tensors:
    the model's own forward then failed under autograd ("Inference tensors cannot be saved for backward")."""
    model = build("qwen2")
    ids, mask = left_padded(1000, [7, 2, 11])
    with torch.inference_mode():
        fast = Engine(model, kernels="fast")
    proj = model.model.layers[0].self_attn.q_proj
    assert not proj.weight.is_inference() and not proj.bias.is_inference() and proj.weight.requires_grad
    loss = model(input_ids=ids).logits.float().pow(2).mean()  # grad mode
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.shape == proj.weight.shape
    a, _ = run_steps(fast, ids, mask, 4)
    b, _ = run_steps(Engine(model, fast=False), ids, mask, 4)
    assert max_diff(a, b) < 1e-4


def test_fused_engine_on_a_model_created_in_inference_mode_keeps_its_forward_working():
    """A model created inside ``torch.inference_mode()`` has inference parameters: rebinding them to normal tensors
    (an engine built outside inference mode) used to break the model's own forward ("Inference tensors do not track
    version counter")."""
    ids = torch.tensor([[5, 17, 42, 8, 9]])
    with torch.inference_mode():
        model = build("llama")
        ref = model(input_ids=ids).logits
    fast = Engine(model, kernels="fast")
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, ref)
        with_engine_inside = Engine(model, kernels="fast")
        assert torch.equal(model(input_ids=ids).logits, ref)
    for engine in (fast, with_engine_inside):
        torch.testing.assert_close(engine.full_logits(ids), ref, rtol=1e-4, atol=1e-4)


def test_float16_model_runs_with_fast_kernels():
    """``kernels="fast"`` on a float16 model used to prepack every projection for oneDNN, which raises on CPUs
    without AVX512-FP16 / AVX-NE-CONVERT (``decodelab generate --dtype float16 --kernels fast`` crashed with a
    traceback). The weight-major products now fall back to ``F.linear`` there; float32 activations keep the logits
    at least as close to the float32 model's as transformers' own float16 forward."""
    base = build("llama")
    model16 = build("llama").to(torch.float16)
    fast = Engine(model16, kernels="fast")
    qkv = fast.fast.layers[0].qkv
    assert isinstance(qkv, MeasuredDense) and fast.fast.act32
    if not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        assert "onednn" not in qkv.packs
    ids, mask = left_padded(1000, [9, 1, 4, 6, 3])  # 5 rows: bucket 8's product
    a, state = run_steps(fast, ids, mask, 5)
    assert state.cache.keys[0].dtype == torch.float32
    ref, _ = run_steps(Engine(base, fast=False), ids, mask, 5)
    plain16, _ = run_steps(Engine(model16, fast=False), ids, mask, 5)
    assert max_diff(a, ref) <= 1.5 * max_diff(plain16, ref) + 1e-3
    assert all(torch.equal(x.argmax(-1), y.argmax(-1)) for x, y in zip(a, ref))
    one, _ = run_steps(fast, ids[1:2, -1:], mask[1:2, -1:], 3)  # 1 row: bmm of halves / mm in float16
    assert all(torch.isfinite(x).all() for x in one)
    quantized = Engine(model16, kernels="fast", quantize="int8")  # also built without a oneDNN float16 reorder
    assert torch.isfinite(run_steps(quantized, ids, mask, 2)[0][-1]).all()


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_fast_engine_returns_contiguous_logits(rows):
    """2-3 rows run weight-first (``mm(W, x.T).T``): the (B, V) logits came back transposed in memory (stride
    (1, B)), unlike every other path, so ``logits.view(-1)`` raised."""
    engine = Engine(build("qwen2"), kernels="fast")
    ids, mask = left_padded(1000, [3] * rows)
    logits, state = engine.prefill(ids, mask)
    step = engine.step(state, logits.argmax(-1))
    full = engine.full_logits(ids[:, :2])
    for t in (logits, step, full):
        assert t.is_contiguous() and t.dtype == torch.float32
    assert logits.view(-1).shape == (rows * 1000,) and step.view(-1).shape == (rows * 1000,)


GEOMETRIES = {
    "llama-gqa": ("llama", dict()),
    "qwen2-no-gqa-untied": ("qwen2", dict(kv=4, tie=False, vocab=999)),
    "llama-odd-sizes": ("llama", dict(hidden=35, heads=5, kv=1, head_dim=8, inter=33, vocab=777)),
    "qwen2-odd-sizes": ("qwen2", dict(hidden=35, heads=5, kv=5, head_dim=4, inter=33, vocab=999, tie=False)),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_fast_kernels_track_the_plain_path_on_odd_geometries(name):
    """Odd hidden / intermediate / vocabulary sizes (no halves for the bmm), no GQA, untied output layer, Qwen2's
    biases: padded batches of very different lengths through every row-count branch (1, 2-3, > 3 rows), beam-like
    reorders that change the batch size, and a cache growing past its default headroom, all within 1e-4 of the
    plain transformers path."""
    arch, kw = GEOMETRIES[name]
    model = build(arch, **kw)
    vocab = model.config.vocab_size
    fast, plain = Engine(model, kernels="fast"), Engine(model, fast=False)
    for lengths in ([1], [2, 3], [40, 1, 7, 2, 13]):
        ids, mask = left_padded(vocab, lengths)
        a, _ = run_steps(fast, ids, mask, 6, hint=6)
        b, _ = run_steps(plain, ids, mask, 6, hint=6)
        assert max_diff(a, b) < 1e-4
    ids, mask = left_padded(vocab, [30, 3, 9])
    picks = [torch.tensor([0, 0, 2, 1]), torch.tensor([3, 1]), torch.tensor([1, 1, 0])]

    def reorder(step, batch):
        rows = picks[step % 3]
        return rows if int(rows.max()) < batch else torch.arange(batch)

    a, state = run_steps(fast, ids, mask, 70, reorder=reorder)  # no hint: grows past 30 + 64 positions
    b, _ = run_steps(plain, ids, mask, 70, reorder=reorder)
    assert state.cache.capacity > 30 + 64
    assert max_diff(a, b) < 1e-4


def test_several_engines_on_one_model():
    """fast, exact, fast, int8, fast on the same model: the model's own logits never change, the exact engines stay
    bit-for-bit the plain path (before and after later engines rebind the parameters) and the earlier fused engines
    keep working."""
    model = build("qwen2")
    ids, mask = left_padded(1000, [7, 3, 12, 1, 5])
    ref = _model_logits(model, ids)
    plain, _ = run_steps(Engine(model, fast=False), ids, mask, 5)
    first = Engine(model, kernels="fast")
    exact = Engine(model)
    second = Engine(model, kernels="fast")
    int8 = Engine(model, quantize="int8")
    third = Engine(model, kernels="fast")
    assert torch.equal(_model_logits(model, ids), ref)
    for engine in (exact, Engine(model)):
        out, _ = run_steps(engine, ids, mask, 5)
        assert all(torch.equal(x, y) for x, y in zip(out, plain))
    for engine in (first, second, third):
        out, _ = run_steps(engine, ids, mask, 5)
        assert max_diff(out, plain) < 1e-4
    assert torch.isfinite(run_steps(int8, ids, mask, 2)[0][-1]).all()


def test_kernels_values_are_normalised_or_rejected():
    assert [EngineConfig.from_kwargs(kernels=v).kernels for v in (None, "FAST", " fast ", "Exact")] == [
        "exact", "fast", "fast", "exact"]
    for bad in (1, True, "", "turbo", "fa st"):
        with pytest.raises(decodelab.ConfigError) as info:
            EngineConfig.from_kwargs(kernels=bad)
        assert info.value.param == "kernels" and "\n" not in str(info.value)
