"""The fast path's product kernels chosen by measurement (decodelab.fastpath.kernel_choice): the choice file per
machine (measured once, reused, written atomically, a damaged one measured again), and the choices another CPU would
make forced here, so that both vendors' code paths run in CI whatever this machine is: an AMD EPYC's (weight-first
products for 1-3 rows, oneDNN beyond) and an Intel Xeon's (F.linear for 1-3 rows, oneDNN beyond)."""

from __future__ import annotations

import json

import pytest
import torch
from test_fast_kernels_edge import build

from decodelab.fastpath import kernel_choice, native
from decodelab.fastpath.decoder import FastDecoder
from decodelab.fastpath.projections import Dense, MeasuredDense

AMD_LIKE = {"1": "weight_halves", "2": "weight_first", "3": "weight_first", "4": "onednn", "8": "onednn",
            "16": "onednn"}
INTEL_LIKE = {"1": "linear", "2": "linear", "3": "linear", "4": "onednn", "8": "onednn", "16": "onednn"}


def table_for(model, choice: dict, exact_one_row: str = "halves", fused: bool = True) -> dict:
    """A forced table: every projection shape of ``model`` (fused or not) gets ``choice``."""
    dec = FastDecoder(model, kernels="exact", fuse=fused, measure=False)
    keys = {kernel_choice.shape_key(p.weight, p.bias is not None)
            for layer in dec.layers for p in layer.projections().values()}
    keys.add(kernel_choice.shape_key(dec.lm_head.weight, dec.lm_head.bias is not None))
    return {k: {"choice": dict(choice), "exact": {"1": exact_one_row}} for k in keys}


def last_logits(dec: FastDecoder, ids: torch.Tensor) -> list[torch.Tensor]:
    """Prefill ``ids`` (B, T) but the last column, then one decode step: the (B, V) logits of both."""
    b, t = ids.shape
    cache = dec.new_cache(b, t)
    cache.start(torch.ones((b, t - 1), dtype=torch.long))
    pos = torch.arange(t).expand(b, t)
    first = dec.forward(ids[:, :-1], pos[:, :-1], cache)
    cache.append_mask()
    return [first, dec.forward(ids[:, -1:], pos[:, -1:], cache)]


def model_logits(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The model's own (B, V) logits as ``generate`` computes them: prefill of all but the last column (last
    position only), then one cached step."""
    out = model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1)
    step = model(input_ids=ids[:, -1:], cache=out.cache, use_cache=True)
    return [out.logits[:, -1], step.logits[:, -1]]


@pytest.fixture()
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODELAB_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_choices_are_measured_once_per_machine_then_read(own_cache, monkeypatch):
    """The first fast decoder measures each weight shape and writes the choice file (named for this CPU model,
    torch version, dtype and threads); a second one reads it without measuring; a damaged file is measured again."""
    model = build("qwen2")
    calls = []
    real = kernel_choice.measure
    monkeypatch.setattr(kernel_choice, "measure", lambda *a, **k: calls.append(a[0][0][0].shape) or real(*a, **k))
    dec = FastDecoder(model, kernels="fast")
    # qkv (64+32+32 x 64, biased), o (64x64), gate_up (128x64), down (64x64), lm_head (1000x64)
    assert sorted(dec.kernel_table) == ["1000x64", "128x64", "128x64+b", "64x64"]
    assert len(calls) == 4
    path = kernel_choice.choice_path(torch.float32, "fast")
    data = json.loads(path.read_text())
    assert data["machine"]["cpu"] == kernel_choice.cpu_model() and data["machine"]["torch"] == torch.__version__
    assert data["machine"]["threads"] == torch.get_num_threads() and data["machine"]["mode"] == "fast"
    for entry in data["shapes"].values():
        assert sorted(entry["choice"], key=int) == [str(b) for b in kernel_choice.BUCKETS]
        assert entry["exact"]["1"] in kernel_choice.EXACT_PRODUCTS
        for bucket, name in entry["choice"].items():
            assert entry["ms"][bucket][name] == min(entry["ms"][bucket].values()) > 0
    assert not list(path.parent.glob("*.tmp"))  # written atomically: no temporary left behind
    assert all(isinstance(p, MeasuredDense) for p in dec.layers[0].projections().values())

    FastDecoder(build("qwen2", seed=1), kernels="fast")
    assert len(calls) == 4  # read from the file

    path.write_text('{"shapes": {"64x64": ')  # a torn file is never trusted
    again = FastDecoder(build("qwen2", seed=2), kernels="fast")
    assert len(calls) == 8 and sorted(again.kernel_table) == sorted(dec.kernel_table)
    assert json.loads(path.read_text())["shapes"].keys() == data["shapes"].keys()


def test_exact_mode_measures_only_its_bit_exact_candidates(own_cache):
    """``kernels="exact"`` measures F.linear against the two-halves bmm for one row and nothing else: both are
    bit for bit F.linear, whichever wins."""
    dec = FastDecoder(build("llama"), kernels="exact")
    for entry in dec.kernel_table.values():
        assert list(entry["choice"]) == ["1"] and set(entry["ms"]["1"]) <= set(kernel_choice.EXACT_PRODUCTS)
    assert all(type(p) is Dense for p in dec.layers[0].projections().values())
    assert kernel_choice.choice_path(torch.float32, "exact").exists()


@pytest.mark.parametrize("one_row", ["linear", "halves"])
def test_exact_mode_is_bit_exact_with_either_one_row_choice(own_cache, one_row):
    """Forcing either exact one-row product keeps the logits bit for bit the model's own."""
    model = build("qwen2")
    dec = FastDecoder(model, kernels="exact", kernel_table=table_for(model, INTEL_LIKE, one_row, fused=False))
    assert all(p.halves == (one_row == "halves") for p in dec.layers[0].projections().values())
    ids = torch.tensor([[5, 17, 300, 42, 7, 9]])
    with torch.inference_mode():
        prefill, step = last_logits(dec, ids)
        ref_prefill, ref_step = model_logits(model, ids)
    assert torch.equal(prefill, ref_prefill)
    assert torch.equal(step, ref_step)


@pytest.mark.parametrize("vendor", ["amd", "intel"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_either_vendors_choice_gives_the_models_logits(own_cache, vendor, rows):
    """The fast mode with the choices measured on an AMD EPYC or on an Intel Xeon, forced on this machine: the
    prefill and decode-step logits for 1, 2, 3 and 5 rows equal the model's to float32 rounding, with the same
    argmax, and the summary names the products."""
    model = build("qwen2")
    choice = AMD_LIKE if vendor == "amd" else INTEL_LIKE
    gen = torch.Generator().manual_seed(rows)
    ids = torch.randint(0, 1000, (rows, 7), generator=gen)
    with torch.inference_mode():
        ref_prefill, ref_step = model_logits(model, ids)
    dec = FastDecoder(model, kernels="fast", kernel_table=table_for(model, choice))
    qkv = dec.layers[0].qkv
    assert isinstance(qkv, MeasuredDense) and qkv.name_for(rows) == choice[str(kernel_choice.bucket(rows))]
    with torch.inference_mode():
        prefill, step = last_logits(dec, ids)
    for ours, ref in ((prefill, ref_prefill), (step, ref_step)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    expected = ("1 weight_halves, 2-3 weight_first, 4-16 onednn" if vendor == "amd"
                else "1-3 linear, 4-16 onednn")
    assert dec.kernel_summary().split("; ")[0] == f"1000x64: {expected}"


def test_bucket_maps_row_counts():
    assert [kernel_choice.bucket(r) for r in (1, 2, 3, 4, 5, 8, 9, 16, 17, 700)] == [1, 2, 3, 4, 8, 8, 16, 16, 16,
                                                                                       16]


@pytest.mark.parametrize("fused", [True, False])
def test_attention_inputs_are_row_major_after_weight_first_products(own_cache, monkeypatch, fused):
    """A weight-first product (``mm(W, x.T).T``, the AMD choice for 2-3 rows and for batched decode steps) returned its
    rows transposed in memory (it now copies them back); fed to SDPA as q/k/v views, that made PyTorch skip its
    flash kernel for the math fallback (5x slower per call: a 16-request decode step on an AMD EPYC went 113 ->
    167 ms). Every q, k, v SDPA sees, prefill and decode step of 3 rows, has a unit last-dimension stride."""
    model = build("qwen2")
    dec = FastDecoder(model, kernels="fast", fuse=fused,
                      kernel_table=table_for(model, {**AMD_LIKE, "4": "weight_first"}, fused=fused))
    strides = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        strides.append((q.stride(-1), k.stride(-1), v.stride(-1)))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 1000, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        last_logits(dec, ids)
    # 2 layers' prefill and step; the step attends through decodelab's own kernel where it is built (no SDPA)
    steps_sdpa = 0 if native.library() is not None else 1
    assert len(strides) == 2 * (1 + steps_sdpa) and set(strides) == {(1, 1, 1)}


@pytest.mark.parametrize("name", ["linear", "weight_first", "onednn"])
def test_multi_row_products_return_row_major_results(name):
    """Every multi-row product hands back a row-major (M, N) result (``weight_first`` copies its transposed
    product back, inside its measured time), close to ``F.linear``."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen)
    x = torch.randn(3, 32, generator=gen)
    packed = kernel_choice.prepack(weight) if name == "onednn" else None
    y = kernel_choice.product(name, x, weight, bias, packed)
    assert y.shape == (3, 48) and y.is_contiguous()
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_a_choice_naming_an_unknown_product_is_measured_again(own_cache, monkeypatch):
    """A choice file entry naming a product this code does not have (another version's, an experiment's) is not
    trusted: that shape is measured again and the file rewritten; well-formed entries are kept."""
    model = build("llama")
    FastDecoder(model, kernels="fast")
    path = kernel_choice.choice_path(torch.float32, "fast")
    data = json.loads(path.read_text())
    stale = sorted(data["shapes"])[0]
    data["shapes"][stale]["choice"]["16"] = "no_such_product"
    path.write_text(json.dumps(data))
    calls = []
    real = kernel_choice.measure
    monkeypatch.setattr(kernel_choice, "measure", lambda *a, **k: calls.append(a[0][0][0].shape) or real(*a, **k))
    dec = FastDecoder(model, kernels="fast")
    assert len(calls) == 1 and kernel_choice.shape_key(torch.empty(calls[0]), False) == stale  # llama: no biases
    assert dec.kernel_table[stale]["choice"]["16"] in kernel_choice.FAST_PRODUCTS
    assert json.loads(path.read_text())["shapes"][stale]["choice"]["16"] in kernel_choice.FAST_PRODUCTS
