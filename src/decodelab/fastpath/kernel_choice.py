"""Which matrix-product kernel each fast-path projection uses, chosen by measurement on the machine at hand.

The fastest way to multiply a few rows by a weight matrix on a CPU is not a property of the code: it depends on the
processor, its BLAS (MKL, oneDNN, OpenBLAS) and the thread count. Measured with 2 threads and PyTorch 2.13, float32,
SmolLM2-135M's projections, one decode step's worth of weights:

* AMD EPYC: a one-row ``F.linear`` ran single-threaded (45 ms / step); splitting the weight in two halves for a
  ``bmm`` (``halves``) or multiplying weight-first (``weight_halves``) used both cores (25 / 17 ms).
* Intel Xeon (AMX): the one-row ``F.linear`` is already multi-threaded, ``weight_halves`` takes twice as long and
  ``weight_first`` on 2-3 rows twice as long as ``F.linear``: the choice hard-coded for the AMD machine made
  ``kernels="fast"`` 0.65x the speed of ``generate`` there.

So the choice is measured (:func:`measure`), per weight shape and per row-count bucket (:data:`BUCKETS`), the first
time a shape is seen on a machine, and kept in a JSON file per CPU model, torch
version, CPU capability, dtype and thread count under decodelab's cache directory (:func:`choice_path`, written
atomically). Later engines read it.

Products (:data:`PRODUCTS`; ``x`` has M rows of K, the weight is (N, K)):

* ``linear``: ``F.linear``, what transformers runs. Exact by definition.
* ``halves``: one row only; ``bmm`` of the row against the two halves of the weight's output rows, one half per
  OpenMP thread (:func:`decodelab.fastpath.projections.half_linear`): the same dot products by the same kernel, bit for
  bit ``F.linear`` (checked again at measurement; a machine where it differs never gets it in exact mode).
* ``weight_halves``: one row only; ``bmm(weight halves (2, N/2, K), x.T)``: weight-first, rounding may differ.
* ``weight_first``: ``mm(weight, x.T).T``, copied back to row-major: rounding may differ.
* ``onednn``: oneDNN's GEMM on a copy of the weight prepacked once (``torch.ops.mkldnn._reorder_linear_weight`` /
  ``_linear_pointwise``, as Inductor's freezing pass uses); doubles the weight memory where chosen; rounding may
  differ.
* ``panels``: decodelab's own register-blocked GEMM on a copy of the weight packed once in panels of 16 output
  columns (:mod:`decodelab.fastpath.panels`, compiled on this machine; offered only where it could be built and N is
  a multiple of 16); doubles the weight memory where chosen; rounding may differ.

``kernels="exact"`` chooses between ``linear`` and ``halves`` for one row (more rows: ``linear``, as transformers);
``kernels="fast"`` among all of them for every bucket. Since ``linear`` is always a candidate, the fast mode's
measured products are never slower than the exact ones (up to measurement noise).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F

from . import native, panels

BUCKETS = (1, 2, 3, 4, 8, 16)
"""Row counts measured; a product of M rows uses the choice of the smallest bucket >= M (the last one beyond)."""

EXACT_PRODUCTS = ("linear", "halves")
"""Products whose results are bit for bit ``F.linear``'s (the candidates of ``kernels="exact"``)."""

FAST_PRODUCTS = ("linear", "halves", "weight_halves", "weight_first", "onednn", "panels")
"""The candidates of ``kernels="fast"``."""

ROUNDS = 3
"""Timed rounds per candidate (after one warm-up round); the minimum counts. Candidates are interleaved round by
round, so all see the same machine load; after the first timed round, a candidate over :data:`DROP` times the best
is not timed again."""

DROP = 1.5

MODES = {"exact": (EXACT_PRODUCTS, (1,)), "fast": (FAST_PRODUCTS, BUCKETS)}
"""``kernels`` mode -> (candidate products, row buckets measured)."""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``, else :func:`platform.processor`), e.g.
    ``"Intel(R) Xeon(R) Processor"``; ``"unknown CPU"`` when neither says."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def bucket(rows: int) -> int:
    """The :data:`BUCKETS` entry whose choice a product of ``rows`` rows uses."""
    for b in BUCKETS:
        if rows <= b:
            return b
    return BUCKETS[-1]


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN can prepack a ``dtype`` weight on ``device`` (the ``onednn`` product): float32 on any CPU
    with oneDNN, 16-bit types only where the CPU has the instructions (``_reorder_linear_weight`` raises otherwise,
    e.g. float16 without AVX512-FP16 / AVX-NE-CONVERT)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """The oneDNN blocked copy of an (N, K) weight used by the ``onednn`` product."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 5)


def applies(name: str, rows: int, weight: torch.Tensor) -> bool:
    """Whether product ``name`` can multiply ``rows`` rows by ``weight`` (N, K): the ``halves`` products need one
    row, an even N and a contiguous weight; ``onednn`` a dtype oneDNN packs on this device; ``panels`` a float32 CPU
    weight of N a multiple of 16 on a machine where :func:`decodelab.fastpath.native.library` could be built."""
    if name in ("halves", "weight_halves"):
        return rows == 1 and weight.shape[0] % 2 == 0 and weight.is_contiguous()
    if name == "onednn":
        return can_prepack(weight.dtype, weight.device)
    if name == "panels":
        return panels.available(weight)
    return name in PRODUCTS


def _linear(x, weight, bias, packed):
    return F.linear(x, weight, bias)


def _halves(x, weight, bias, packed):
    n, k = weight.shape
    y = torch.bmm(x.reshape(1, 1, k).expand(2, 1, k), weight.view(2, n // 2, k).transpose(1, 2)).reshape(1, n)
    return y if bias is None else y + bias


def _weight_halves(x, weight, bias, packed):
    n, k = weight.shape
    y = torch.bmm(weight.view(2, n // 2, k), x.reshape(1, k).t().expand(2, -1, -1)).view(1, n)
    return y if bias is None else y + bias


def _weight_first(x, weight, bias, packed):
    # the (N, M) product transposed back to row-major (M, N): a copy of M x N values, counted in its measured time,
    # so that the operations after it (attention, SiLU * up, residual adds) read rows, not strided columns
    y = torch.mm(weight, x.t()).t().contiguous()
    return y if bias is None else y + bias


def _onednn(x, weight, bias, packed):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _panels(x, weight, bias, packed):
    return panels.product(x, packed, bias)


PRODUCTS: dict[str, Callable] = {"linear": _linear, "halves": _halves, "weight_halves": _weight_halves,
                                 "weight_first": _weight_first, "onednn": _onednn, "panels": _panels}
"""name -> ``f(x (M, K), weight (N, K), bias (N,) or None, packed or None) -> (M, N)``."""

PACKERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"onednn": prepack, "panels": panels.pack}
"""Products that multiply by a copy of the weight made once: name -> ``f(weight (N, K)) -> packed copy``."""


def product(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            packed: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` by product ``name`` (see the module docstring): x (..., K) -> (..., N).
    ``packed``: the weight's :data:`PACKERS` copy for ``name`` (``onednn``, ``panels``), else ``None``."""
    lead = x.shape[:-1]
    y = PRODUCTS[name](x.reshape(-1, x.shape[-1]), weight, bias, packed)
    return y.reshape(*lead, y.shape[-1])


def choice_path(dtype: torch.dtype, mode: str) -> pathlib.Path:
    """``<decodelab cache>/kernels/<id>.json``: the measured choices of ``kernels=mode`` for this CPU model, torch
    version, CPU capability, ``dtype`` and thread count (see :func:`decodelab.modelcache.cache_dir`)."""
    from ..modelcache import cache_dir

    ident = {**machine_key(dtype), "mode": mode}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"{digest}.json"


PRODUCTS_VERSION = 4
"""Bumped when a product's code changes what it costs or a candidate is added (2: ``weight_first`` returns row-major
results; 4: ``panels``), so that choices measured with the earlier code are measured again. (A choice naming a
product this code does not have is measured again too: :func:`choices`.)"""


def machine_key(dtype: torch.dtype) -> dict:
    """What a measured choice is valid for: CPU model, torch version, ATen's CPU capability, dtype, threads,
    :data:`PRODUCTS_VERSION` and the C kernels' sources (:func:`decodelab.fastpath.native.source_digest`:
    an edited kernel is measured again)."""
    return {"cpu": cpu_model(), "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
            "dtype": str(dtype), "threads": torch.get_num_threads(), "products": PRODUCTS_VERSION,
            "native": native.source_digest()}


def shape_key(weight: torch.Tensor, has_bias: bool) -> str:
    """``"NxK"`` (``"+b"`` with a bias): a weight's entry in the choice file."""
    n, k = weight.shape
    return f"{n}x{k}{'+b' if has_bias else ''}"


def _time_pass(fn, weights, x) -> float:
    start = time.perf_counter()
    for w, b, p in weights:
        fn(x, w, b, p)
    return time.perf_counter() - start


def measure(weights: list[tuple[torch.Tensor, torch.Tensor | None]], candidates=FAST_PRODUCTS,
            buckets=BUCKETS) -> dict:
    """Time each candidate product over every weight in ``weights`` (all of one shape: a layer stack's q/k/v or
    MLP projections, so that the pass streams them from memory as a decode step does), for each row bucket.

    Args:
        weights: ``(weight (N, K), bias or None)`` pairs of one shape, dtype and device.
        candidates: product names (see :data:`PRODUCTS`); the ones that do not apply to a bucket are skipped.
        buckets: row counts.

    Returns:
        ``{"choice": {bucket: name}, "exact": {bucket: name among EXACT_PRODUCTS}, "ms": {bucket: {name: ms}}}``
        with string bucket keys (JSON); times are the minimum of :data:`ROUNDS` passes over all the weights, in
        milliseconds. ``halves`` counts as exact only where it equalled ``F.linear`` bit for bit here.
    """
    first = weights[0][0]
    gen = torch.Generator(device="cpu").manual_seed(0)
    packs = {n: [PACKERS[n](w) for w, _ in weights] for n in candidates if n in PACKERS and applies(n, 1, first)}
    items = {n: [(w, b, packs[n][i] if n in packs else None) for i, (w, b) in enumerate(weights)]
             for n in candidates}
    out: dict = {"choice": {}, "exact": {}, "ms": {}}
    with torch.inference_mode():
        for rows in buckets:
            x = torch.randn((rows, first.shape[1]), generator=gen).to(first.dtype).to(first.device)
            names = [n for n in candidates if applies(n, rows, first) and (n not in PACKERS or n in packs)]
            exact_ok = {"linear"}
            if "halves" in names:
                w, b, _ = items["halves"][0]
                if torch.equal(_halves(x, w, b, None), F.linear(x, w, b)):
                    exact_ok.add("halves")
            best = {n: float("inf") for n in names}
            timed = list(names)
            for r in range(ROUNDS + 1):
                for n in timed:
                    t = _time_pass(PRODUCTS[n], items[n], x)
                    if r:
                        best[n] = min(best[n], t)
                if r:
                    fastest = min(best.values())
                    timed = [n for n in timed if best[n] <= DROP * fastest]
            key = str(rows)
            out["ms"][key] = {n: round(t * 1e3, 4) for n, t in best.items()}
            out["choice"][key] = min(names, key=best.get)
            out["exact"][key] = min((n for n in names if n in exact_ok), key=best.get)
    return out


def load(path: pathlib.Path) -> dict:
    """The choice file at ``path`` as a dict (``{"machine": ..., "shapes": {shape_key: measure(...)}}``); an empty
    one when missing or unreadable (a damaged file is measured again, never trusted)."""
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("shapes"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"machine": None, "shapes": {}}


def save(path: pathlib.Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file in the same directory, then ``os.replace``): a
    reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _usable(entry, candidates, buckets) -> bool:
    """Whether a choice file's entry for one shape names one of ``candidates`` for every bucket (a file written by
    other code, e.g. an experiment's extra product, is measured again rather than trusted)."""
    if not isinstance(entry, dict):
        return False
    picked = [entry.get(part, {}).get(str(b)) for part in ("choice", "exact") for b in buckets]
    return all(name in candidates for name in picked)


def choices(groups: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]], mode: str = "fast", *,
            progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """The measured choice for every weight shape in ``groups`` (``shape_key`` -> that shape's weights) in
    ``kernels=mode`` (see :data:`MODES`), read from the choice file of this machine, measuring (and adding to the
    file) the shapes it does not hold yet.

    Returns ``{shape_key: measure(...) result}``. ``progress`` gets a one-line note before a measurement (default:
    printed on stderr). A file that cannot be written (read-only cache) is not an error: the choice is used
    for this engine and measured again next time.
    """
    if not groups:
        return {}
    dtype = next(iter(groups.values()))[0][0].dtype
    path = choice_path(dtype, mode)
    candidates, buckets = MODES[mode]
    data = load(path)
    missing = [k for k in groups if not _usable(data["shapes"].get(k), candidates, buckets)]
    if missing:
        total = sum(w.numel() * w.element_size() for k in missing for w, _ in groups[k])
        if total > (64 << 20):  # worth a note: tiny test models measure in milliseconds
            note = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
            note(f"measuring matrix-product kernels on this CPU ({cpu_model()}, {len(missing)} weight shapes); "
                 f"once per machine, kept in {path}")
        data = load(path)  # another process may have measured meanwhile
        for k in missing:
            if not _usable(data["shapes"].get(k), candidates, buckets):
                data["shapes"][k] = measure(groups[k], candidates, buckets)
        data["machine"] = {**machine_key(dtype), "mode": mode}
        try:
            save(path, data)
        except OSError:
            pass
    return {k: data["shapes"][k] for k in groups}
