"""The fast path's projection modules, one per kernel mode, swapped into the one decoder (:mod:`.decoder`) per mode.

Every projection is an ``nn.Module`` computing ``y = x @ W.T + bias``: (..., in) -> (..., out). The same module runs
in the eager decoder and in the compiled step (:mod:`decodelab.compile_cache` exports the decoder itself), so there
is one class per mode, never a second "traceable" twin:

* :class:`Dense`: ``F.linear``, transformers' own product (``kernels="exact"``), optionally as two half-matrix
  products for one row (:func:`half_linear`, bit for bit the same);
* :class:`PackedDense`: bfloat16 weights prepacked once for oneDNN;
* :class:`MeasuredDense`: ``kernels="fast"``, the product measured fastest for the row count
  (:mod:`decodelab.fastpath.kernel_choice`);
* :class:`Int8Linear` / :class:`Int4Linear`: weight-only quantized (``quantize="int8" / "int4"``, built by
  :func:`decodelab.quantize.quantize_decoder`).

Inside a trace (``torch.compiler.is_compiling()``: ``torch.export`` / ``torch.compile``), the packed and measured
products are written as ``F.linear`` of the plain weight, which Inductor's freezing pass prepacks itself; the eager
prepacked copies are then not part of the graph. Weights are buffers holding the model's own tensors (no copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernel_choice


def _buffer(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    """Register ``tensor`` (detached: the same storage, no copy) as a non-persistent buffer."""
    module.register_buffer(name, None if tensor is None else tensor.detach(), persistent=False)


class Dense(nn.Module):
    """``y = x @ weight.T + bias`` (``torch.nn.functional.linear``): (..., in) -> (..., out).

    ``halves``: whether a one-row product may run as :func:`half_linear` (bit for bit the same numbers); set from the
    measurement of :mod:`decodelab.fastpath.kernel_choice` by :class:`~decodelab.fastpath.decoder.FastDecoder`
    (default ``True``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        _buffer(self, "weight", weight)
        _buffer(self, "bias", bias)
        self.halves = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedDense(Dense):
    """:class:`Dense` with the weight prepacked once in oneDNN's blocked layout
    (``torch.ops.mkldnn._reorder_linear_weight``, as Inductor's freezing pass does), called through
    ``torch.ops.mkldnn._linear_pointwise``. ``F.linear`` in bfloat16 on CPU runs the same oneDNN kernel but
    reorders the weight on every call, which costs about as much as the product itself. (..., in) -> (..., out).
    Traced: ``F.linear`` (Inductor packs the weight itself)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight, bias)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)  # a plain attribute, not a buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class MeasuredDense(Dense):
    """``kernels="fast"``: ``y = x @ weight.T + bias`` with the product measured fastest on this machine for the
    weight's shape and the call's row count (:mod:`decodelab.fastpath.kernel_choice`: ``F.linear``, two
    half-matrix ``bmm``\\ s, weight-first ``mm`` / ``bmm``, oneDNN's GEMM on a prepacked copy, or decodelab's own
    GEMM on a panel copy (:mod:`decodelab.fastpath.panels`); packed copies are kept only where chosen). Except for
    ``linear`` / ``halves``, each output is the same dot product summed in another order: results differ from
    ``F.linear``'s in the last bits (~1e-6 relative), so greedy / beam outputs equal ``model.generate``'s except
    where two candidates tie to within rounding. (..., in) -> (..., out).
    Traced, the row count is static, so the chosen product is what is traced (``onednn`` and ``panels`` as
    ``F.linear``, which Inductor's freezing turns into a prepacked GEMM).

    Args:
        weight, bias: the (N, K) weight and (N,) bias or ``None``.
        choice: ``{str(bucket): product name}`` for every :data:`~decodelab.fastpath.kernel_choice.BUCKETS` entry.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, choice: dict[str, str]) -> None:
        super().__init__(weight, bias)
        # a packed product this weight cannot have here (e.g. ``panels`` for N not a multiple of 16 in a table
        # given by hand, or where its library cannot be built) falls back to F.linear
        self.choice = {int(b): name if name not in kernel_choice.PACKERS or kernel_choice.applies(name, 2, weight)
                       else "linear" for b, name in choice.items()}
        # the packed copies of the chosen products that need one (plain attributes, not buffers)
        self.packs = {name: kernel_choice.PACKERS[name](weight) for name in sorted(set(self.choice.values()))
                      if name in kernel_choice.PACKERS}

    def name_for(self, rows: int) -> str:
        """The product used for ``rows`` rows."""
        return self.choice[kernel_choice.bucket(rows)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.name_for(x.numel() // x.shape[-1])
        if name in kernel_choice.PACKERS and torch.compiler.is_compiling():
            name = "linear"
        return kernel_choice.product(name, x, self.weight, self.bias, self.packs.get(name))


def half_linear(dense: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``dense(x)`` for one row x (1, 1, K) -> (1, 1, N), as one ``torch.bmm`` over the two halves of the weight's
    output rows (a view, no copy). PyTorch runs a float32 ``F.linear`` of one row as a single-threaded
    matrix-vector product on some CPUs (measured: AMD EPYC), leaving the other cores idle while it streams the
    weight; ``bmm`` hands the halves to two OpenMP threads. Each output element is still the same dot product by
    the same kernel, so the result is bit-for-bit ``F.linear``'s (tests/test_fastpath.py compares against
    transformers); a bias is added after. Projections other than a :class:`Dense` with ``halves`` set, and odd N,
    run ``dense(x)``."""
    if type(dense) is not Dense or not dense.halves:
        return dense(x)
    w = dense.weight
    n, k = w.shape
    if n % 2:
        return dense(x)
    y = torch.bmm(x.reshape(1, 1, k).expand(2, 1, k), w.view(2, n // 2, k).transpose(1, 2)).reshape(1, 1, n)
    return y if dense.bias is None else y + dense.bias


class Int8Linear(nn.Module):
    """``y = x @ (q * scale[:, None]).T + bias`` with ``q`` (N, K) int8 and ``scale`` (N,) in the activation dtype
    (``torch._weight_int8pack_mm``; gpt-fast's ``WeightOnlyInt8QuantHandler`` scheme).

    Built from a (N, K) float weight by :meth:`from_weight`; called on (..., K) activations -> (..., N).
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        _buffer(self, "q", q)
        _buffer(self, "scale", scale)
        _buffer(self, "bias", bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """Quantize a (N, K) weight: ``scale = max|w_row| / 127`` (float32 arithmetic), ``q = round(w / scale)``."""
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale.to(weight.dtype), bias)

    def dequantized(self) -> torch.Tensor:
        """The (N, K) float32 weight this layer multiplies by."""
        return self.q.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.q, self.scale.to(x.dtype))
        y = y.reshape(*lead, y.shape[-1])
        return y if self.bias is None else y + self.bias


INT4_GROUP = 32  # input columns per (scale, zero) pair: GGUF Q4_0/Q4_1's block size


class Int4Linear(nn.Module):
    """``y = x @ W.T + bias`` with ``W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]``, ``g = k // group_size``
    (``torch._weight_int4pack_mm_for_cpu``; gpt-fast's / torchao's "tinygemm" convention).

    ``packed`` is the kernel's layout of the (N, K) 4-bit values; ``scale_zero`` is (K / group_size, N, 2) in the
    activation dtype. Built by :meth:`from_weight`; (..., K) -> (..., N).
    """

    def __init__(self, packed, scale_zero, group_size: int, bias, n: int) -> None:
        super().__init__()
        _buffer(self, "packed", packed)
        _buffer(self, "scale_zero", scale_zero)
        _buffer(self, "bias", bias)
        self.group_size, self.n = group_size, n

    @staticmethod
    def fits(weight: torch.Tensor, group_size: int = INT4_GROUP) -> bool:
        """Whether a (N, K) weight can be packed: K a multiple of ``group_size`` and of 16, N of 8."""
        n, k = weight.shape
        return k % group_size == 0 and k % 16 == 0 and n % 8 == 0

    @staticmethod
    def quantize(weight: torch.Tensor, group_size: int = INT4_GROUP):
        """(N, K) float weight -> ((N, K) int32 values in [0, 15], (N, G) scale, (N, G) zero), G = K / group_size,
        with ``scale = (max - min) / 15`` and ``zero = min + 8 * scale`` per group (float32)."""
        n, k = weight.shape
        w = weight.detach().float().reshape(n, k // group_size, group_size)
        hi, lo = w.amax(dim=-1), w.amin(dim=-1)
        scale = (hi - lo).clamp(min=1e-6) / 15.0
        zero = lo + 8.0 * scale
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        return q.reshape(n, k), scale, zero

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    group_size: int = INT4_GROUP) -> "Int4Linear":
        """Quantize and pack a (N, K) weight (see :meth:`quantize`)."""
        q, scale, zero = cls.quantize(weight, group_size)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(weight.dtype)
        return cls(packed, scale_zero, group_size, bias, weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), self.packed, self.group_size,
                                              self.scale_zero.to(x.dtype))
        y = y.reshape(*lead, self.n)
        return y if self.bias is None else y + self.bias
