"""The ``panels`` product: a register-blocked float32 GEMM on a weight stored once as panels of 16 output columns.

A candidate of :mod:`decodelab.fastpath.kernel_choice` (``kernels="fast"`` only: its sums run in another order than
``F.linear``'s). Why a product of our own: a decode step of 16-32 requests multiplies 16-32 rows by every weight,
a shape the libraries PyTorch ships handle poorly on some CPUs. Measured on an AMD EPYC (AVX2, 2 threads, torch
2.13.0), SmolLM2-135M's weights, GFLOP/s at 16 / 32 rows: oneDNN on a prepacked weight 89-96 / 113-126, MKL's packed
GEMM 49 / 75-81, BLIS (the ``blis`` wheel) 24-30 / 39-41, this kernel 87-117 / 129-150 (BENCHMARKS.md). The
measured choice keeps it only where it wins on the machine at hand.

The C source (``panels.c`` beside this file) is compiled on first use with the machine's own instruction set
(``cc -O3 -march=native -fopenmp``), linked against the OpenMP runtime PyTorch loaded (one thread team, PyTorch's
thread count), and kept under decodelab's cache directory, one library per source, compiler, flags and CPU model
(written atomically). Where that cannot be done (no C compiler, no AVX2 / FMA, PyTorch without GNU OpenMP, a failed
build), :func:`library` returns ``None`` and the candidate is not offered: nothing else changes.

Every output is one fused multiply-add chain over the K inputs in order (the micro-kernel of Goto & van de Geijn,
"Anatomy of High-Performance Matrix Multiplication", 2008: 6 rows x 16 columns in 12 AVX accumulators), the same
whatever the number of rows: a row's result is bit for bit the same alone and among others.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import torch

SOURCE = pathlib.Path(__file__).with_name("panels.c")
PANEL = 16
"""Output columns per panel: a weight of N rows is packed only when N is a multiple of this."""
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120


@functools.cache
def source_digest() -> str:
    """The first 16 hex digits of the SHA-256 of :data:`SOURCE` (part of the kernel choice file's key)."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def _openmp_path() -> pathlib.Path | None:
    """PyTorch's own GNU OpenMP runtime (``torch/lib/libgomp*.so*``), the one the kernel must share: a second
    runtime would start a second thread team on the same cores."""
    found = sorted(pathlib.Path(torch.__file__).parent.joinpath("lib").glob("libgomp*.so*"))
    return found[0] if found else None


def _compiler() -> str | None:
    """``$CC``, else ``cc`` / ``gcc`` on the PATH, else ``None``."""
    for name in (os.environ.get("CC", "").strip(), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _supported() -> bool:
    """x86-64 with AVX2 and FMA (ATen's ``AVX2`` / ``AVX512`` capability implies both) on Linux."""
    return (platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def _build(cc: str, gomp: pathlib.Path, target: pathlib.Path) -> bool:
    """Compile :data:`SOURCE` into ``target`` (a temporary file renamed into place: readers never see half a
    library). Returns whether it worked."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(fd)
    try:
        cmd = [cc, *FLAGS, str(SOURCE), "-o", tmp, str(gomp), f"-Wl,-rpath,{gomp.parent}"]
        done = subprocess.run(cmd, capture_output=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            return False
        os.replace(tmp, target)
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first call on this machine, then read from the cache), or ``None`` where it
    cannot be had here (see the module docstring). Raises nothing."""
    from ..modelcache import cache_dir
    from .kernel_choice import cpu_model

    cc, gomp = _compiler(), _openmp_path()
    if not _supported() or cc is None or gomp is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    ident = "\n".join([SOURCE.read_text(), version, " ".join(FLAGS), cpu_model(), str(gomp)])
    target = cache_dir() / "kernels" / f"panels-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.so"
    if not target.exists() and not _build(cc, gomp, target):
        return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dl_panels_pack.argtypes = [ptr, ptr, i64, i64]
    lib.dl_panels_pack.restype = None
    lib.dl_panels_mm.argtypes = [ptr, ptr, ptr, i64, i64, i64]
    lib.dl_panels_mm.restype = ctypes.c_int
    return lib


def fits(weight: torch.Tensor) -> bool:
    """Whether ``weight`` (N, K) can be packed: float32 on the CPU, N a multiple of :data:`PANEL`."""
    return (weight.dim() == 2 and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and weight.shape[0] % PANEL == 0 and weight.shape[0] > 0 and weight.shape[1] > 0)


def available(weight: torch.Tensor) -> bool:
    """:func:`fits` and the kernel is built on this machine."""
    return fits(weight) and library() is not None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The (N / 16, K, 16) panel copy of a (N, K) float32 weight: ``packed[p, k, j] = weight[16 p + j, k]``.

    Raises:
        ValueError: the weight does not :func:`fit` or the kernel is not available here.
    """
    lib = library()
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
    if m and library().dl_panels_mm(x.data_ptr(), packed.data_ptr(), y.data_ptr(), m, n, k):
        raise MemoryError(f"panels product: no memory for {min(m, 96)} x {k} floats")
    return y if bias is None else y + bias
