"""decodelab's own CPU kernels in C, compiled on the machine at hand: the ``panels`` GEMM
(:mod:`decodelab.fastpath.panels`) and the decode-step attention over cache slots
(:mod:`decodelab.fastpath.slot_attention`).

The C sources beside this file (:data:`SOURCES`) are compiled on first use with the machine's own instruction set
(``cc -O3 -march=native -fopenmp``; a kernel choice written for one CPU would be wrong on another), linked against the
OpenMP runtime PyTorch loaded (one thread team, PyTorch's thread count), and kept under decodelab's cache directory,
one library per sources, compiler, flags and CPU model (written atomically). Where that cannot be done (not x86-64
Linux with AVX2 / FMA, no C compiler, PyTorch without GNU OpenMP, a failed build), :func:`library` returns ``None``
and PyTorch's own operators are used instead: nothing else changes.
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

SOURCES = tuple(pathlib.Path(__file__).with_name(name) for name in ("native_panels.c", "native_attention.c"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120


@functools.cache
def source_digest() -> str:
    """The first 16 hex digits of the SHA-256 of :data:`SOURCES` (part of the kernel choice file's key: an edited
    kernel is measured again)."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]


def _openmp_path() -> pathlib.Path | None:
    """PyTorch's own GNU OpenMP runtime (``torch/lib/libgomp*.so*``), the one the kernels must share: a second
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
    """Compile :data:`SOURCES` into ``target`` (a temporary file renamed into place: readers never see half a
    library). Returns whether it worked."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(fd)
    try:
        cmd = [cc, *FLAGS, *map(str, SOURCES), "-o", tmp, str(gomp), f"-Wl,-rpath,{gomp.parent}", "-lm"]
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
    """The compiled kernels (built on first call on this machine, then read from the cache), or ``None`` where they
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
    ident = "\n".join([source_digest(), version, " ".join(FLAGS), cpu_model(), str(gomp)])
    target = cache_dir() / "kernels" / f"native-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.so"
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
    lib.dl_slot_attention.argtypes = [ptr] * 7 + [i64] * 5 + [ctypes.c_float]
    lib.dl_slot_attention.restype = ctypes.c_int
    return lib
