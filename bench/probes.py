"""Measurement helpers for bench/: the machine's memory-bandwidth ceiling, peak resident memory during a run,
the load average, and robust summaries of repeated timings.

The ceiling is measured, not assumed: a batch-1 decode step must read every weight once, so the best a decoder can
do is ``bandwidth / weight_bytes`` tokens per second. Two probes:

- ``copy``: ``dst.copy_(src)`` of a buffer much larger than the caches, GB/s counted as bytes read + written;
- ``gemv``: a float32 matrix-vector product over a ~256 MB W, bytes of W read per second, the better of
  ``F.linear(x, W)`` (one core: PyTorch's float32 matrix-vector kernel is single-threaded) and ``torch.bmm`` over
  one slice of W's rows per thread (all cores). This is the access pattern of a decode step, so it is the ceiling
  the bench reports against.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import torch


def loadavg() -> list[float]:
    """``os.getloadavg()`` (1, 5, 15 minutes) rounded to 2 decimals; the machine's other work while measuring."""
    return [round(x, 2) for x in os.getloadavg()]


def rss_mb() -> float:
    """Resident set size of this process in MiB (``/proc/self/statm``; 0.0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


class PeakRSS:
    """Context manager sampling :func:`rss_mb` every ``interval`` seconds in a thread; ``.peak`` (MiB) after exit.

    Sampling misses spikes shorter than ``interval``; it measures the whole process (weights included)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak = interval, 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_mb())


def summary(values: list[float]) -> dict:
    """Median, min, max and relative spread ``(max - min) / median`` of repeated measurements."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else 0.0, "runs": len(values)}


@torch.inference_mode()
def bandwidth(mbytes: int = 256, repeats: int = 7) -> dict:
    """Measure memory bandwidth in GB/s (1e9 bytes): ``copy`` (read + write) and ``gemv`` (weight bytes read by a
    float32 matrix-vector product), best of ``repeats`` after one warm-up. Uses torch's current thread count."""
    n = mbytes * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for i in range(repeats + 1):
        t = time.perf_counter()
        dst.copy_(src)
        if i:
            best = min(best, time.perf_counter() - t)
    copy_gbs = 2 * n * 4 / best / 1e9
    del src, dst
    k, parts = 2048, max(1, torch.get_num_threads())
    rows = n // k // parts * parts
    w = torch.randn(rows, k) * 0.01
    x = torch.randn(1, k)
    sliced = w.view(parts, rows // parts, k).transpose(1, 2)
    variants = {"linear": lambda: torch.nn.functional.linear(x, w),
                "bmm": lambda: torch.bmm(x.expand(parts, 1, k), sliced)}
    gbs = {}
    for name, fn in variants.items():
        best = float("inf")
        for i in range(repeats + 1):
            t = time.perf_counter()
            fn()
            if i:
                best = min(best, time.perf_counter() - t)
        gbs[name] = w.numel() * 4 / best / 1e9
    return {"copy_gbs": round(copy_gbs, 2), "gemv_gbs": round(max(gbs.values()), 2),
            "gemv_linear_gbs": round(gbs["linear"], 2), "gemv_bmm_gbs": round(gbs["bmm"], 2), "probe_mbytes": mbytes}


class GemvProbe:
    """The ``gemv`` probe of :func:`bandwidth` kept ready to rerun between timed runs: the machine's bandwidth
    drifts (on this project's VM by up to 2x within minutes), so a case's fraction of the ceiling is computed
    against the probe taken in the same round (see ``cases.side_by_side``). Holds a ``mbytes`` float32 weight.

    Calling it returns GB/s (1e9 bytes of the weight read per second), best of ``repeats`` ``bmm`` products over
    one slice of rows per thread (the faster of the two variants :func:`bandwidth` tries, on more than one thread)."""

    def __init__(self, mbytes: int = 256, repeats: int = 3) -> None:
        k, parts = 2048, max(1, torch.get_num_threads())
        rows = mbytes * 2**20 // 4 // k // parts * parts
        with torch.inference_mode():
            self.weight = torch.randn(rows, k) * 0.01
            self.sliced = self.weight.view(parts, rows // parts, k).transpose(1, 2)
            self.x = torch.randn(1, 1, k).expand(parts, 1, k)
        self.repeats = repeats

    @torch.inference_mode()
    def __call__(self) -> float:
        best = float("inf")
        for i in range(self.repeats + 1):
            t = time.perf_counter()
            torch.bmm(self.x, self.sliced)
            if i:
                best = min(best, time.perf_counter() - t)
        return self.weight.numel() * 4 / best / 1e9
