"""Which thread may use PyTorch's intra-op parallelism: the model's thread, and only it.

PyTorch's CPU wheels parallelise operators with GNU OpenMP (libgomp). Every Python thread that runs a parallel
operator gets its own OpenMP team (itself plus ``torch.get_num_threads() - 1`` workers that live on). Once the
process has more OpenMP threads than CPUs, libgomp *throttles* its workers' spin-waiting (to 100 spins, libgomp's
documented behaviour when threads outnumber CPUs) and every parallel region then pays a sleep/wake-up. Measured on an
AMD EPYC (2 cores, torch 2.13.0, SmolLM2-135M float32, one decode step): 27-29 ms in a process where one thread ever
ran parallel operators, 41-49 ms when another thread (the main one) had run one first; ``lm.generate`` 36.5 against
21 tokens/s. A server or a batching scheduler whose model runs in a worker thread pays that on every token.

So decodelab keeps one OpenMP team per process where it controls the threads:

* the continuous-batching scheduler can run its loop in the caller's own thread
  (:meth:`decodelab.scheduler.Scheduler.run`): ``generate_many`` / ``generate_iter`` drive it from the calling thread
  and ``decodelab serve`` from the main thread (where the model was loaded), with uvicorn in a background thread;
* every search loop step runs single-threaded (:func:`single_threaded`), its model calls excepted
  (:func:`model_threads`), whatever thread it is in: the request threads around the scheduler (search loops, server
  workers), whose own tensor work is small (a softmax over the vocabulary, processors), never start a team, and a
  request's numbers are the same alone and batched.

Where libgomp is not what PyTorch uses (another OpenMP runtime, no OpenMP), :func:`single_threaded` sets the same
per-thread limit through that runtime's ``omp_set_num_threads`` if one is loaded, else does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import functools
import pathlib
import threading
from typing import Iterator


@functools.lru_cache(maxsize=1)
def _openmp():
    """The OpenMP runtime PyTorch loaded (its ``omp_get_max_threads`` / ``omp_set_num_threads``), or ``None``."""
    import torch

    candidates = sorted(pathlib.Path(torch.__file__).parent.joinpath("lib").glob("lib*omp*.so*"))
    names = [str(p) for p in candidates] + [n for n in ("libgomp.so.1", ctypes.util.find_library("gomp")) if n]
    for name in names:
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            lib.omp_get_max_threads.restype = ctypes.c_int
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            return lib
        except (OSError, AttributeError):
            continue
    return None


_local = threading.local()  # per thread: initialised (bool)
_REPLACED: contextvars.ContextVar[tuple[int, ...]] = contextvars.ContextVar("decodelab_replaced_thread_counts",
                                                                          default=())
"""The thread counts the enclosing :func:`single_threaded` blocks replaced, innermost last. A context variable, not a
thread-local: the batching scheduler's tasks (greenlets, :meth:`decodelab.scheduler.Scheduler.spawn`) share their
thread, and each has its own context; with a per-thread list, the blocks of a suspended task were seen by whatever ran
next in the thread (a ``generate_iter`` consumer's model call then left the thread at 1 thread)."""


def _runtime():
    """:func:`_openmp`, once PyTorch has set this thread's OpenMP thread count (it does on the thread's first
    parallel operator, which would undo an earlier override)."""
    if not getattr(_local, "initialised", False):
        import torch

        torch.get_num_threads()
        _local.initialised = True
    return _openmp()


def limit_current_thread() -> None:
    """:func:`single_threaded` for the rest of the calling thread's life (a pool thread that never runs the model,
    e.g. a server worker while the batching scheduler runs it). Raises nothing."""
    lib = _runtime()
    if lib is not None:
        lib.omp_set_num_threads(1)


def set_thread_count(n: int) -> int | None:
    """Set the calling thread's OpenMP thread count to ``n`` (nothing else: no :func:`single_threaded` stack);
    returns the count it replaced, or ``None`` (and does nothing) without an OpenMP runtime. The batching scheduler
    uses it around the request tasks it runs in its own thread (:meth:`decodelab.scheduler.Scheduler.spawn`): 1 for
    a task's own work, the model's count back for the model. Raises nothing."""
    lib = _runtime()
    if lib is None:
        return None
    previous = lib.omp_get_max_threads()
    if previous != n:
        lib.omp_set_num_threads(n)
    return previous


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the block's PyTorch CPU operators in the calling thread only (OpenMP's per-thread ``nthreads`` setting
    set to 1, restored after), except inside :func:`model_threads`. Other threads are not affected
    (``torch.set_num_threads`` would change the process-wide default that new threads start from). Raises nothing.

    Every search loop step runs in it (:class:`decodelab.search.common.Run`), alone or batched, so a request's own
    tensor work (processors, softmax, log-sum-exp over the vocabulary) gives the same numbers in every thread: a
    reduction split over 2 threads can round differently from 1."""
    lib = _runtime()
    if lib is None:
        yield
        return
    previous = lib.omp_get_max_threads()
    token = _REPLACED.set(_REPLACED.get() + (previous,))
    lib.omp_set_num_threads(1)
    try:
        yield
    finally:
        _REPLACED.reset(token)
        lib.omp_set_num_threads(previous)


@contextlib.contextmanager
def model_threads() -> Iterator[None]:
    """Inside :func:`single_threaded`: run the block (a model call) with the thread count it replaced; elsewhere a
    no-op. Raises nothing."""
    replaced = _REPLACED.get()
    lib = _openmp()
    if not replaced or lib is None:
        yield
        return
    current = lib.omp_get_max_threads()
    lib.omp_set_num_threads(replaced[-1])
    try:
        yield
    finally:
        lib.omp_set_num_threads(current)
