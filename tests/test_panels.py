"""decodelab's own GEMM (decodelab.fastpath.panels, built by decodelab.fastpath.native): built on this machine, close to F.linear for every tile and
block remainder, a row's result bit for bit the same alone and among other rows, offered to the measured choice only
where it can be built, and a failed build is no error and leaves no file behind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_fast_kernels_edge import build
from test_kernel_choice import last_logits, model_logits, table_for

from decodelab.fastpath import kernel_choice, native, panels
from decodelab.fastpath.decoder import FastDecoder

needs_panels = pytest.mark.skipif(native.library() is None, reason="no C compiler / AVX2 here")


def test_the_kernel_builds_on_a_machine_like_ci():
    """CI's machines (x86-64 Linux, AVX2, gcc) build it: skipping every other test here would hide a broken build."""
    import platform
    import shutil

    if platform.machine() == "x86_64" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") \
            and shutil.which("cc"):
        assert native.library() is not None


@needs_panels
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12, 16, 33, 96, 97, 200])
@pytest.mark.parametrize("k", [1, 64, 67])
def test_product_matches_linear(rows, k):
    """Every row count (tiles of 6 rows and their remainders, blocks of 96) and K (odd ones too), with a bias."""
    gen = torch.Generator().manual_seed(rows * 100 + k)
    weight, bias = torch.randn(48, k, generator=gen), torch.randn(48, generator=gen)
    x = torch.randn(rows, k, generator=gen)
    packed = panels.pack(weight)
    assert packed.shape == (3, k, 16)
    assert torch.equal(packed[1, :, 5], weight[16 + 5])  # packed[p, k, j] = W[16 p + j, k]
    y = panels.product(x, packed, bias)
    assert y.shape == (rows, 48) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@needs_panels
def test_a_row_is_bit_for_bit_the_same_alone_and_among_others():
    """Each output is one FMA chain over k in order, whatever the rows around it: 40 rows multiplied together equal
    each row multiplied alone, and the rows in another order (other tile positions) too."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 576, generator=gen)
    x = torch.randn(40, 576, generator=gen)
    packed = panels.pack(weight)
    together = panels.product(x, packed, None)
    alone = torch.cat([panels.product(x[r : r + 1], packed, None) for r in range(40)])
    assert torch.equal(together, alone)
    order = torch.randperm(40, generator=gen)
    assert torch.equal(panels.product(x[order], packed, None), together[order])
    assert not torch.equal(together, F.linear(x, weight))  # another summation order than oneDNN / MKL: not exact


def test_weights_that_do_not_fit_are_refused():
    """N not a multiple of 16, or not float32: not packed (ValueError) and not offered to the choice."""
    for weight in (torch.randn(40, 8), torch.randn(48, 8, dtype=torch.float64)):
        assert not panels.available(weight)
        assert not kernel_choice.applies("panels", 4, weight)
        with pytest.raises(ValueError, match="cannot pack"):
            panels.pack(weight)


@pytest.fixture()
def fresh_library():
    """:func:`native.library` forgotten before and after the test (its result is cached per process)."""
    native.library.cache_clear()
    yield
    native.library.cache_clear()


def test_no_compiler_means_no_candidate(fresh_library, monkeypatch, tmp_path):
    """Without a C compiler the product is simply not offered: the measured choice still works, without it."""
    monkeypatch.setenv("DECODELAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.library() is None
    weight = torch.randn(64, 32)
    assert not kernel_choice.applies("panels", 16, weight)
    entry = kernel_choice.measure([(weight, None)], kernel_choice.FAST_PRODUCTS, (1, 16))
    assert "panels" not in entry["ms"]["16"] and entry["choice"]["16"] in kernel_choice.FAST_PRODUCTS


def test_a_failed_build_is_no_error_and_leaves_nothing(fresh_library, monkeypatch, tmp_path):
    """A compiler that fails (here: a flag it does not know) gives ``None`` and no library or temporary file."""
    monkeypatch.setenv("DECODELAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-fno-such-flag-decodelab"))
    assert native.library() is None
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@needs_panels
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decoder_with_every_product_panels_matches_the_model(arch):
    """A fast decoder forced to ``panels`` for every projection and row count (Qwen2's biased q/k/v included):
    its prefill and decode-step logits stay within float32 rounding of transformers' own forward."""
    model = build(arch)
    dec = FastDecoder(model, kernels="fast", kernel_table=table_for(model, {str(b): "panels"
                                                                              for b in kernel_choice.BUCKETS}))
    assert dec.kernel_summary().split("; ")[0].endswith("1-16 panels")
    ids = torch.randint(0, 1000, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours, theirs = last_logits(dec, ids), model_logits(model, ids)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
