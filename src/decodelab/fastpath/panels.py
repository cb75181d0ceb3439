"""The ``panels`` product: a register-blocked float32 GEMM on a weight stored once as panels of 16 output columns.

A candidate of :mod:`decodelab.fastpath.kernel_choice` (``kernels="fast"`` only: its sums run in another order than
``F.linear``'s). Why a product of our own: a decode step of 16-32 requests multiplies 16-32 rows by every weight,
a shape the libraries PyTorch ships handle poorly on some CPUs. Measured on an AMD EPYC (AVX2, 2 threads, torch
2.13.0), SmolLM2-135M's weights streamed from memory as in a decode step, GFLOP/s at 16 / 32 rows: oneDNN on a
prepacked weight 76-104 / 102-128, MKL's packed GEMM 49-51 / 75-81, BLIS (the ``blis`` wheel, one thread per half)
24-30 / 39-41, this kernel 114-130 / 139-160; a decode step of 16 requests 74 -> 58 ms (BENCHMARKS.md). The
measured choice keeps it only where it wins on the machine at hand.

The C source (``native_panels.c``) is compiled on this machine by :mod:`decodelab.fastpath.native`; where that
cannot be done, the candidate is not offered: nothing else changes.

Every output is one fused multiply-add chain over the K inputs in order (the micro-kernel of Goto & van de Geijn,
"Anatomy of High-Performance Matrix Multiplication", 2008: 6 rows x 16 columns in 12 AVX accumulators), the same
whatever the number of rows: a row's result is bit for bit the same alone and among others. While the first tile of
rows runs over a panel, the next panel is prefetched: without it, 16 rows ran at half the in-cache speed, waiting on
memory.
"""

from __future__ import annotations

import torch

from . import native

PANEL = 16
"""Output columns per panel: a weight of N rows is packed only when N is a multiple of this."""


def fits(weight: torch.Tensor) -> bool:
    """Whether ``weight`` (N, K) can be packed: float32 on the CPU, N a multiple of :data:`PANEL`."""
    return (weight.dim() == 2 and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and weight.shape[0] % PANEL == 0 and weight.shape[0] > 0 and weight.shape[1] > 0)


def available(weight: torch.Tensor) -> bool:
    """:func:`fits` and the kernel is built on this machine."""
    return fits(weight) and native.library() is not None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The (N / 16, K, 16) panel copy of a (N, K) float32 weight: ``packed[p, k, j] = weight[16 p + j, k]``.

    Raises:
        ValueError: the weight does not :func:`fit` or the kernel is not available here.
    """
    lib = native.library()
    if lib is None or not fits(weight):
        raise ValueError(f"cannot pack a {tuple(weight.shape)} {weight.dtype} weight into panels here")
    w = weight.detach().contiguous()
    n, k = w.shape
    packed = torch.empty((n // PANEL, k, PANEL), dtype=torch.float32)
    lib.dl_panels_pack(w.data_ptr(), packed.data_ptr(), n, k)
    return packed


def product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for x (M, K) float32 and ``packed`` = :func:`pack` (W): (M, N).

    Raises:
        MemoryError: the kernel could not allocate its copy of a block of rows (at most 96 x K floats).
    """
    x = x.contiguous()
    m, k = x.shape
    n = packed.shape[0] * PANEL
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    if m and native.library().dl_panels_mm(x.data_ptr(), packed.data_ptr(), y.data_ptr(), m, n, k):
        raise MemoryError(f"panels product: no memory for {min(m, 96)} x {k} floats")
    return y if bias is None else y + bias
