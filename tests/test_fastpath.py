"""The fast path (preallocated KV cache, module-free forward) computes exactly what the plain path computes.

Bit-for-bit logits against the transformers model with a DynamicCache (prefill + decode steps, padded batches, beam
reorders), and identical generations (greedy, beam, seeded sampling) against the plain engine and ``model.generate``
on the real embedded SmolLM2-135M-Instruct and on tiny random Llama / Qwen2 models. No timings here: speed is
measured by bench/.
"""

from __future__ import annotations

import pytest
import torch

import decodelab
from decodelab.engine import DecodeState, Engine
from decodelab.fastpath import StaticKVCache, native, unsupported_reason
from tiny_models import run_steps


def lm_with(loaded, **engine_kw) -> decodelab.LM:
    lm = decodelab.LM(loaded.model, loaded.tokenizer, loaded.name)
    lm.engine = Engine(loaded.model, **engine_kw)
    return lm


def batch(loaded, texts):
    return loaded.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2", "embedded"])
def test_fast_logits_are_bitwise_equal_to_plain(which, request):
    loaded = request.getfixturevalue(which)
    fast, plain = Engine(loaded.model), Engine(loaded.model, fast=False)
    assert fast.fast is not None and plain.fast is None
    steps = 6 if which == "embedded" else 12
    for texts in (["The capital of France is"], ["Hello there my good friend, how", "Hi", "a b"]):
        enc = batch(loaded, texts)
        a, sa = run_steps(fast, enc.input_ids, enc.attention_mask, steps, hint=steps)
        b, sb = run_steps(plain, enc.input_ids, enc.attention_mask, steps, hint=steps)
        assert isinstance(sa.cache, StaticKVCache) and not isinstance(sb.cache, StaticKVCache)
        assert all(x.dtype == torch.float32 and x.shape == (len(texts), fast.vocab_size) for x in a)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        assert torch.equal(sa.positions, sb.positions)
        assert sa.cache.length == enc.input_ids.shape[1] + steps


def test_cache_grows_without_a_length_hint_and_reorders_like_plain(tiny_llama):
    fast, plain = Engine(tiny_llama.model), Engine(tiny_llama.model, fast=False)
    enc = batch(tiny_llama, ["one two three four", "five"])

    def reorder(step, rows):  # swap / duplicate rows like a beam search would
        return torch.tensor([1, 1] if step % 3 == 0 else [1, 0])

    a, sa = run_steps(fast, enc.input_ids, enc.attention_mask, 70, hint=None, reorder=reorder)
    b, _ = run_steps(plain, enc.input_ids, enc.attention_mask, 70, hint=None, reorder=reorder)
    assert sa.cache.capacity >= enc.input_ids.shape[1] + 70 > enc.input_ids.shape[1] + 64  # it had to grow
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_static_cache_select_repeats_rows():
    cache = StaticKVCache(n_layers=2, n_kv_heads=1, head_dim=2, batch=2, capacity=4, dtype=torch.float32,
                          device="cpu")
    cache.start(torch.tensor([[0, 1], [1, 1]]))
    for t in cache.keys + cache.values:
        t[0, :, :2] = 1.0
        t[1, :, :2] = 2.0
    cache.length = 2
    assert cache.padded
    cache.select(torch.tensor([1, 1, 0]))
    assert cache.batch == 3 and cache.capacity == 4
    for t in cache.keys + cache.values:
        assert t.shape == (3, 1, 4, 2)
        assert t[:2, :, :2].eq(2.0).all() and t[2, :, :2].eq(1.0).all() and t[:, :, 2:].eq(0.0).all()
    assert cache.pad[:, :2].tolist() == [[True, True], [True, True], [False, True]]
    cache.select(torch.tensor([0, 1]))
    assert not cache.padded  # the padded row was dropped


def test_full_logits_match_the_model(tiny_qwen2):
    ids = tiny_qwen2.tokenizer(["a quick brown fox jumps"], return_tensors="pt").input_ids
    ours = Engine(tiny_qwen2.model).full_logits(ids)
    with torch.inference_mode():
        ref = tiny_qwen2.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    assert ours.shape == ref.shape == (1, ids.shape[1], 151936)
    assert torch.equal(ours, ref.float())


GEN_CASES = [
    dict(max_new_tokens=12),
    dict(max_new_tokens=10, num_beams=4, num_return_sequences=2),
    dict(max_new_tokens=10, num_beams=3, repetition_penalty=1.3, length_penalty=0.7),
    dict(max_new_tokens=10, do_sample=True, seed=7, top_k=20, num_return_sequences=3),
    dict(max_new_tokens=10, do_sample=True, seed=3, num_beams=2),
]


@pytest.mark.parametrize("kw", GEN_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
def test_fast_generate_equals_plain_generate(which, kw, request):
    loaded = request.getfixturevalue(which)
    prompts = ["It was a dark and stormy", "1, 2, 3,"]
    fast, plain = lm_with(loaded), lm_with(loaded, fast=False)
    a, b = fast.generate(prompts, **kw), plain.generate(prompts, **kw)
    assert [s.new_ids for s in a.sequences] == [s.new_ids for s in b.sequences]
    assert [s.score for s in a.sequences] == [s.score for s in b.sequences]
    assert all(len(s.new_ids) > 0 for s in a.sequences)


def hf_ids(loaded, prompt, **kw):
    enc = loaded.tokenizer(prompt, return_tensors="pt")
    out = loaded.model.generate(**enc, pad_token_id=loaded.tokenizer.pad_token_id, **kw)
    return out[0, enc.input_ids.shape[1]:].tolist()


def test_fast_path_matches_model_generate_on_embedded(embedded):
    lm = lm_with(embedded)
    assert lm.engine.fast is not None
    prompt = "The three primary colors are"
    greedy = lm.generate(prompt, max_new_tokens=16)
    assert greedy.sequences[0].new_ids == hf_ids(embedded, prompt, max_new_tokens=16, do_sample=False)
    beam = lm.generate(prompt, max_new_tokens=8, num_beams=3)
    assert beam.sequences[0].new_ids == hf_ids(embedded, prompt, max_new_tokens=8, num_beams=3, do_sample=False)
    sampled = lm.generate(prompt, max_new_tokens=8, do_sample=True, seed=11, top_k=50, top_p=1.0, temperature=1.0)
    torch.manual_seed(11)
    ref = hf_ids(embedded, prompt, max_new_tokens=8, do_sample=True, top_k=50, top_p=1.0, temperature=1.0)
    assert sampled.sequences[0].new_ids == ref


def test_bfloat16_fast_path_equals_bfloat16_plain(tiny_llama):
    import copy

    from decodelab.fastpath.decoder import can_pack
    from decodelab.fastpath.projections import PackedDense

    model = copy.deepcopy(tiny_llama.model).to(torch.bfloat16)
    fast, plain = Engine(model, pack=False), Engine(model, fast=False)
    enc = batch(tiny_llama, ["It was a dark and stormy", "Hi"])
    a, _ = run_steps(fast, enc.input_ids, enc.attention_mask, 8, hint=8)
    b, _ = run_steps(plain, enc.input_ids, enc.attention_mask, 8, hint=8)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    packed = Engine(model)
    assert isinstance(packed.fast.layers[0].q, PackedDense) == can_pack(torch.bfloat16, torch.device("cpu"))
    c, _ = run_steps(packed, enc.input_ids, enc.attention_mask, 8, hint=8)
    for x, y in zip(c, b):  # oneDNN computes the same products; allow bfloat16 rounding differences anyway
        assert torch.allclose(x, y, atol=0.05, rtol=0.02)
        assert torch.equal(x.argmax(-1), y.argmax(-1))


def test_unsupported_models_use_the_plain_path(tiny_llama):
    import copy

    model = copy.deepcopy(tiny_llama.model)
    model.config._attn_implementation = "eager"
    assert "eager" in unsupported_reason(model)
    engine = Engine(model)
    assert engine.fast is None and "eager" in engine.fast_reason
    logits, state = engine.prefill(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long), 4)
    assert isinstance(state, DecodeState) and not isinstance(state.cache, StaticKVCache)
    assert logits.shape == (1, engine.vocab_size)
    with pytest.raises(decodelab.ConfigError, match="quantize") as err:
        Engine(model, quantize="int8")
    assert err.value.param == "quantize"


def test_fastpath_can_be_switched_off_by_environment(tiny_llama, monkeypatch):
    monkeypatch.setenv("DECODELAB_FASTPATH", "0")
    assert Engine(tiny_llama.model).fast is None
    assert Engine(tiny_llama.model, fast=True).fast is not None


def test_compiled_step_matches_eager_and_is_reused_from_disk(tiny_llama, tmp_path, monkeypatch):
    """``compile=`` (AOTInductor with freezing and without autotuning here, to keep the test short): same greedy and
    beam ids as the eager fast path; one ``.pt2`` package written under the cache dir (no temporary left) and
    loaded, not recompiled, by a second engine."""
    from decodelab.compile_cache import artifact_dir, bucket

    monkeypatch.setenv("DECODELAB_CACHE_DIR", str(tmp_path))
    opts = {"freezing": True}
    messages: list[str] = []
    compiled = lm_with(tiny_llama, compile=opts)
    compiled.engine.compiled.progress = messages.append
    eager = lm_with(tiny_llama)
    kw = dict(max_new_tokens=12)
    a, b = compiled.generate("It was a dark and stormy", **kw), eager.generate("It was a dark and stormy", **kw)
    assert a.sequences[0].new_ids == b.sequences[0].new_ids
    stats = compiled.engine.compiled.stats
    assert list(stats) == [(1, bucket(7 + 12))] and stats[(1, 256)]["ok"] and not stats[(1, 256)]["loaded"]
    assert any("compiling" in m for m in messages)
    assert [p.suffix for p in artifact_dir().iterdir()] == [".pt2"]
    beam = dict(max_new_tokens=6, num_beams=3)
    assert (compiled.generate("1, 2, 3,", **beam).sequences[0].new_ids
            == eager.generate("1, 2, 3,", **beam).sequences[0].new_ids)
    # beam search feeds a strided column of its token matrix: the package must read it right, not fall back
    assert compiled.engine.compiled.stats[(3, 256)]["ok"]

    len_before = len(messages)
    again = lm_with(tiny_llama, compile=opts)
    again.engine.compiled.progress = messages.append
    assert again.generate("It was a dark and stormy", **kw).sequences[0].new_ids == b.sequences[0].new_ids
    assert again.engine.compiled.stats[(1, 256)]["loaded"] and again.engine.compiled.stats[(1, 256)]["ok"]
    assert not any("compiling" in m for m in messages[len_before:])


def test_batch1_float32_steps_use_half_matrix_products_bit_exactly(tiny_qwen2):
    """With >= 2 threads a batch-1 float32 step splits every projection into two half-matrix products (one
    ``bmm``); the logits stay bit-for-bit those of plain ``F.linear`` (Qwen2: biases included)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        split, plain = Engine(tiny_qwen2.model), Engine(tiny_qwen2.model)
        plain.fast.halves = False
        assert split.fast._halves_for(1) and not split.fast._halves_for(2) and not plain.fast._halves_for(1)
        enc = batch(tiny_qwen2, ["The capital of France is"])
        a, _ = run_steps(split, enc.input_ids, enc.attention_mask, 10, hint=10)
        b, _ = run_steps(plain, enc.input_ids, enc.attention_mask, 10, hint=10)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_every_measured_product_matches_f_linear(rows, bias):
    """``kernels="fast"`` projections: every product the measurement may pick (F.linear, bmm of halves, weight-first
    bmm / mm, oneDNN packed), forced for every bucket, gives F.linear's result to float32 rounding, in the shape
    F.linear gives; ``halves`` (an exact-mode candidate) gives it bit for bit."""
    from decodelab.fastpath import kernel_choice
    from decodelab.fastpath.projections import MeasuredDense

    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    x = torch.randn(rows, 1, 64, generator=gen)
    ref = torch.nn.functional.linear(x, weight, b)
    tried = []
    for name in kernel_choice.FAST_PRODUCTS:
        if not kernel_choice.applies(name, rows, weight):
            continue
        dense = MeasuredDense(weight, b, {str(k): name for k in kernel_choice.BUCKETS})
        assert dense.name_for(rows) == name
        out = dense(x)
        assert out.shape == ref.shape == (rows, 1, 96)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        if name in kernel_choice.EXACT_PRODUCTS:
            assert torch.equal(out, ref), name
        tried.append(name)
    built = ["panels"] if native.library() is not None else []  # tests/test_panels.py checks it builds on CI
    assert tried == (["linear", "halves", "weight_halves", "weight_first", "onednn", *built] if rows == 1
                     else ["linear", "weight_first", "onednn", *built])


@pytest.mark.parametrize("kw", [dict(max_new_tokens=24), dict(max_new_tokens=12, num_beams=5),
                                dict(max_new_tokens=10, num_beams=5, num_return_sequences=3, repetition_penalty=2.0),
                                dict(max_new_tokens=10, do_sample=True, seed=5, top_k=50, num_return_sequences=4)],
                         ids=["greedy", "beam5", "beam5-rp2-n3", "sample4"])
def test_fast_kernels_return_the_plain_paths_tokens_on_embedded(embedded, kw):
    """On the real SmolLM2 model, ``kernels="fast"`` (not bit-exact) returns the same tokens as transformers'
    own forward (the plain path) for greedy, beam search and seeded sampling, with scores within 1e-3."""
    fast, plain = lm_with(embedded, kernels="fast"), lm_with(embedded, fast=False)
    from decodelab.fastpath.projections import MeasuredDense

    assert isinstance(fast.engine.fast.layers[0].qkv, MeasuredDense) and fast.engine.fast.layers[0].q is None
    prompt = "It was a dark and stormy"
    a, b = fast.generate(prompt, **kw), plain.generate(prompt, **kw)
    assert [s.new_ids for s in a.sequences] == [s.new_ids for s in b.sequences]
    assert [s.score for s in a.sequences] == pytest.approx([s.score for s in b.sequences], abs=1e-3)
    assert len(a.sequences[0].new_ids) == kw["max_new_tokens"]


def test_fast_kernel_logits_stay_within_rounding_of_the_model(tiny_qwen2):
    fast, plain = Engine(tiny_qwen2.model, kernels="fast"), Engine(tiny_qwen2.model, fast=False)
    enc = batch(tiny_qwen2, ["Hello there my good friend, how", "Hi"])
    a, _ = run_steps(fast, enc.input_ids, enc.attention_mask, 8, hint=8)
    b, _ = run_steps(plain, enc.input_ids, enc.attention_mask, 8, hint=8)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_bad_kernels_value_is_a_config_error(tiny_llama):
    with pytest.raises(decodelab.ConfigError, match="kernels='turbo'") as info:
        Engine(tiny_llama.model, kernels="turbo")
    assert info.value.param == "kernels"
    with pytest.raises(decodelab.ConfigError, match="kernels"):
        decodelab.load("/nonexistent/model/dir", kernels="turbo")  # checked before the (slow) model load
    import copy

    eager_attention = copy.deepcopy(tiny_llama.model)
    eager_attention.config._attn_implementation = "eager"
    with pytest.raises(decodelab.ConfigError, match="kernels needs the fast path"):
        Engine(eager_attention, kernels="fast")


def test_fused_projections_share_the_models_weights(tiny_qwen2):
    """``kernels="fast"`` stacks q/k/v (with Qwen2's biases) and gate/up into one tensor each and rebinds the
    model's parameters to views of it: same values, one copy, and the model's own forward is unchanged."""
    model = tiny_qwen2.model
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    before = {name: t.detach().clone() for name, t in (("q", attn.q_proj.weight), ("k", attn.k_proj.weight),
                                                       ("qb", attn.q_proj.bias), ("up", mlp.up_proj.weight))}
    ids = torch.tensor([[5, 17, 42, 8]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    engine = Engine(model, kernels="fast")
    layer = engine.fast.layers[0]
    assert layer.qkv_sizes == [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
    assert layer.qkv.weight.shape == (sum(layer.qkv_sizes), attn.q_proj.in_features)
    assert attn.q_proj.weight.data_ptr() == layer.qkv.weight.data_ptr()
    assert attn.k_proj.weight.data_ptr() == layer.qkv.weight[layer.qkv_sizes[0]:].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == layer.gate_up.weight[mlp.gate_proj.out_features:].data_ptr()
    assert torch.equal(attn.q_proj.weight, before["q"]) and torch.equal(attn.k_proj.weight, before["k"])
    assert torch.equal(attn.q_proj.bias, before["qb"]) and torch.equal(mlp.up_proj.weight, before["up"])
    assert set(layer.projections()) == {"qkv", "o", "gate_up", "down"}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)


def test_a_second_fused_engine_shares_the_first_ones_stacked_weights(tiny_qwen2):
    """Building another ``kernels="fast"`` engine on the same model does not stack (copy) the weights again: its
    q/k/v (with biases) and gate/up tensors are the first engine's, and both give the same logits."""
    model = tiny_qwen2.model
    first = Engine(model, kernels="fast")
    second = Engine(model, kernels="fast")
    for a, b in zip(first.fast.layers, second.fast.layers):
        for name in ("qkv", "gate_up"):
            pa, pb = getattr(a, name), getattr(b, name)
            assert pb.weight.data_ptr() == pa.weight.data_ptr() and pb.weight.shape == pa.weight.shape
            assert (pb.bias is None) == (pa.bias is None)
            if pa.bias is not None:
                assert pb.bias.data_ptr() == pa.bias.data_ptr() and pb.bias.shape == pa.bias.shape
    assert first.fast.layers[0].qkv.bias is not None  # Qwen2: the biases were covered too
    ids = torch.tensor([[5, 17, 42, 8]])
    assert torch.equal(first.full_logits(ids), second.full_logits(ids))


def test_bfloat16_fused_engine_keeps_float32_activations(tiny_llama):
    """A bfloat16 model with ``kernels="fast"``: the matrix products run in bfloat16 but the activations, norms,
    attention and KV cache stay float32, so its logits are at least as close to the float32 model's as the plain
    bfloat16 forward's are, and the greedy tokens match it."""
    import copy

    model16 = copy.deepcopy(tiny_llama.model).to(torch.bfloat16)
    fast = Engine(model16, kernels="fast")
    assert fast.fast.act32 and fast.fast.act_dtype == torch.float32
    plain16, plain32 = Engine(model16, fast=False), Engine(tiny_llama.model, fast=False)
    enc = batch(tiny_llama, ["It was a dark and stormy", "Hi"])
    a, state = run_steps(fast, enc.input_ids, enc.attention_mask, 6, hint=6)
    assert state.cache.keys[0].dtype == torch.float32
    b, _ = run_steps(plain16, enc.input_ids, enc.attention_mask, 6, hint=6)
    ref, _ = run_steps(plain32, enc.input_ids, enc.attention_mask, 6, hint=6)
    err_fast = max(float((x - r).abs().max()) for x, r in zip(a, ref))
    err_plain = max(float((y - r).abs().max()) for y, r in zip(b, ref))
    assert err_fast <= err_plain * 1.5
    lm16 = lm_with(tiny_llama, fast=False)
    lm16.model, lm16.engine = model16, plain16
    fast_lm = decodelab.LM(model16, tiny_llama.tokenizer, tiny_llama.name, engine=fast)
    assert fast_lm.generate("1, 2, 3,", max_new_tokens=8).sequences[0].new_ids == \
        lm16.generate("1, 2, 3,", max_new_tokens=8).sequences[0].new_ids


def test_compiled_quantized_bfloat16_step_keeps_float32_activations(tiny_llama, tmp_path, monkeypatch):
    """A bfloat16 model with int8 weights, compiled: the traced step keeps the eager engine's float32 activations
    and cache (``act32``), passes the first-use check against the eager step and returns its greedy ids."""
    import copy

    monkeypatch.setenv("DECODELAB_CACHE_DIR", str(tmp_path))
    model16 = copy.deepcopy(tiny_llama.model).to(torch.bfloat16)
    compiled = decodelab.LM(model16, tiny_llama.tokenizer, tiny_llama.name,
                            engine=Engine(model16, quantize="int8", compile={"freezing": True}))
    eager = decodelab.LM(model16, tiny_llama.tokenizer, tiny_llama.name, engine=Engine(model16, quantize="int8"))
    compiled.engine.compiled.progress = lambda msg: None
    assert compiled.engine.fast.act32 and compiled.engine.compiled.module.act32
    kw = dict(max_new_tokens=10)
    a, b = compiled.generate("It was a dark and stormy", **kw), eager.generate("It was a dark and stormy", **kw)
    stat = compiled.engine.compiled.stats[(1, 256)]
    assert stat["ok"] and stat["max_rel_err"] < 1e-2
    assert a.sequences[0].new_ids == b.sequences[0].new_ids


def tiny_qwen3():
    """A seeded tiny random Qwen3ForCausalLM (head_dim 32 != hidden / heads, q/k/v biases on) whose per-head query /
    key norm weights are random, not the initial ones (which would make the norms' scaling a no-op)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=0.1, attention_bias=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = Qwen3ForCausalLM(cfg).to(torch.float32).eval()
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    norm.weight.normal_(1.0, 0.3)
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    return model


def assert_padded_batch_parity(exact: Engine, plain: Engine, fused: Engine | None = None, steps: int = 8) -> None:
    """On a left-padded batch of two (vocabulary >= 301), prefill and ``steps`` greedy decode steps: ``exact``'s logits
    bit for bit ``plain``'s, ``fused``'s (``kernels="fast"``) within float32 rounding."""
    ids = torch.tensor([[0, 0, 5, 17, 300, 42], [7, 9, 11, 13, 15, 17]])
    mask = (ids != 0).long()
    mask[1] = 1
    b, _ = run_steps(plain, ids, mask, steps, hint=steps)
    a, _ = run_steps(exact, ids, mask, steps, hint=steps)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    if fused is not None:
        for z, y in zip(run_steps(fused, ids, mask, steps, hint=steps)[0], b):
            torch.testing.assert_close(z, y, rtol=1e-4, atol=1e-4)


def test_qwen3_fast_path_is_bit_exact_and_its_fused_form_close(tiny_llama):
    """Qwen3 on the fast path (query / key RMSNorm per head before the rotary embedding): prefill and decode-step
    logits bit for bit the plain path's, padded batch included; ``kernels="fast"`` (q and k heads normalised in
    one call with stacked weights) within float32 rounding; greedy and beam ids equal ``model.generate``'s."""
    model = tiny_qwen3()
    assert unsupported_reason(model) is None
    exact, fused, plain = Engine(model), Engine(model, kernels="fast"), Engine(model, fast=False)
    assert exact.fast.layers[0].q_norm is not None and fused.fast.layers[0].qk_norm.shape == (6, 1, 32)
    assert_padded_batch_parity(exact, plain, fused)
    prompt = torch.tensor([[5, 17, 300, 42, 7, 9]])
    for kw in (dict(max_new_tokens=12), dict(max_new_tokens=8, num_beams=4, repetition_penalty=2.0)):
        with torch.inference_mode():
            ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0,
                                 eos_token_id=None, **kw)[0, 6:].tolist()
        lm = decodelab.LM(model, tiny_llama.tokenizer, "tiny-qwen3")  # ids in, ids out: any tokenizer
        lm.engine = exact
        ours = lm.generate(prompt[0].tolist(), ignore_eos=True, **kw).sequences[0].new_ids
        assert ours == ref


@pytest.mark.parametrize("window", [None, 4])
def test_mistral_takes_the_fast_path_with_or_without_a_binding_window(tiny_llama, window):
    """Mistral without a sliding window (Mistral-7B-v0.3's ``sliding_window: null``) is Llama's layer; with a window
    shorter than the context (transformers' ``DynamicSlidingWindowLayer`` keeps the last W positions) every layer
    attends over that window. Both: fast path, logits bit for bit the plain path's (padded batch included), greedy
    ids equal ``model.generate``'s (more tokens than the window). More windowed cases: tests/test_fastpath_windows.py.
    """
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=window, initializer_range=0.1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = MistralForCausalLM(cfg).eval()
    engine = Engine(model)
    assert engine.fast is not None and engine.fast_reason is None
    assert all(layer.window == window for layer in engine.fast.layers)
    plain = Engine(model, fast=False)
    assert_padded_batch_parity(engine, plain, steps=16)
    prompt = torch.tensor([[5, 17, 300, 42, 7, 9]])
    with torch.inference_mode():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=10,
                             pad_token_id=0, eos_token_id=None)[0, 6:].tolist()
    lm = decodelab.LM(model, tiny_llama.tokenizer, "tiny-mistral")
    lm.engine = engine
    assert lm.generate(prompt[0].tolist(), max_new_tokens=10, ignore_eos=True).sequences[0].new_ids == ref


def test_phi3_fast_path_uses_its_stacked_projections_bit_exactly():
    """Phi-3's stacked ``qkv_proj`` / ``gate_up_proj`` are used as they are (one product each, as transformers runs
    them, views of the model's weights): logits bit for bit the plain path's in the exact mode, padded batch
    included; ``kernels="fast"`` within float32 rounding."""
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = Phi3ForCausalLM(cfg).eval()
    exact, fused, plain = Engine(model), Engine(model, kernels="fast"), Engine(model, fast=False)
    layer = exact.fast.layers[0]
    stacked = model.model.layers[0].self_attn.qkv_proj.weight  # the model's own tensor: same storage, no copy
    assert layer.q is None and layer.qkv.weight.data_ptr() == stacked.data_ptr()
    assert torch.equal(layer.qkv.weight, stacked)
    assert layer.qkv_sizes == [64, 32, 32]
    assert_padded_batch_parity(exact, plain, fused)
