"""``compile=True``: the fast path's decode step compiled ahead of time by AOTInductor, kept on disk.

What is compiled is :class:`decodelab.fastpath.static.StaticStep`: the engine's own decoder forward with the
fixed-shape row plan (one token per row, fixed batch and cache capacity): ``torch.export`` traces it,
``torch._inductor.aoti_compile_and_package`` compiles it with Inductor (on CPU: ``freezing``, so the weights become constants Inductor can prepack, and ``max_autotune``) into a
``.pt2`` package at ``<decodelab cache>/compiled/<key>.pt2``, written to a temporary name and renamed, so an
interrupted compilation leaves nothing half-written. A later process loads the package with
``torch._inductor.aoti_load_package`` (about a second) instead of compiling again (a minute or more on a small
CPU). The key hashes everything the compiled code depends on: the model's config and a fingerprint of its
weights, dtype, quantization, kernel mode (fusion, float32 activations), batch size, cache capacity, device, CPU
capability, torch and transformers versions, the Inductor options and the traced code (every file of
:mod:`decodelab.fastpath`). The prefill stays eager. Packages hold their own copy of the (frozen) weights:
disk and memory grow by the model's size per compiled shape.

The directory is kept to a size budget (:func:`prune`, after every new package): packages are dropped least
recently used first (loading one marks it used) until the rest fit in ``$DECODELAB_COMPILED_MAX_GB`` (default
:data:`DEFAULT_MAX_GB`); a package from an older torch or decodelab, whose key nothing asks for any more, is
thus removed once newer ones need the room. Temporary files of a compilation that was killed outright are
removed after a day.

Compiled graphs reorder float arithmetic: their logits are close to the eager path's, not bit-for-bit. Each newly
compiled or loaded shape is checked once against the eager step (same argmax, logits within :func:`tolerance` after
scaling); on a mismatch the engine falls back to the eager step for that shape and says so on stderr.

Measured on this project's 2-core CPU (BENCHMARKS.md): the compiled step is faster than the eager fast path in
every case, most in bfloat16 and with int8 / int4 weights (about 1.6-1.9x, where Inductor fuses the float32
element-wise work and the casts around the products), least in float32 (about 1.1x: the eager weight-first products
already run at the memory bandwidth). The same code compiles for CUDA (``compile_options``), untested: no GPU here.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Callable

import torch

from .fastpath import FastDecoder, StaticKVCache
from .fastpath.static import StaticStep

CAPACITY_BUCKET = 256  # compiled steps are built for cache capacities rounded up to a multiple of this
DEFAULT_MAX_GB = 8.0  # default size budget of <cache>/compiled (GB, 1e9 bytes): about 15 float32 SmolLM2 packages
STALE_TMP_S = 24 * 3600  # a temporary package older than this belongs to a compilation that was killed


def tolerance(dtype: torch.dtype) -> float:
    """Largest ``max |compiled - eager| / max(1, max |eager|)`` the first-use check accepts: 1e-3 in float32,
    5e-2 in 16-bit dtypes (a few units in the last place of bfloat16 logits of magnitude ~20 after 30 layers)."""
    return 1e-3 if dtype == torch.float32 else 5e-2


def bucket(capacity: int) -> int:
    """``capacity`` rounded up to a multiple of :data:`CAPACITY_BUCKET` positions (one compiled graph serves all
    requests in the bucket)."""
    return -(-int(capacity) // CAPACITY_BUCKET) * CAPACITY_BUCKET


def weights_fingerprint(decoder: FastDecoder) -> str:
    """A cheap sha256 over the shapes, dtypes and first/last 256 values of the embedding, the final norm and every
    layer's first norm (enough to tell two checkpoints apart without hashing hundreds of MB)."""
    h = hashlib.sha256()
    tensors = [decoder.embed, decoder.norm] + [layer.ln1 for layer in decoder.layers]
    for t in tensors:
        flat = t.detach().reshape(-1)
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        for part in (flat[:256], flat[-256:]):
            h.update(part.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def compile_options(device: torch.device) -> dict:
    """Inductor options (``inductor_configs`` of ``aoti_compile_and_package``) for the decode step on ``device``."""
    if device.type == "cuda":
        return {"max_autotune": True}
    return {"freezing": True, "max_autotune": True}


def artifact_dir() -> pathlib.Path:
    """``<decodelab cache>/compiled`` (see :func:`decodelab.modelcache.cache_dir`)."""
    from .modelcache import cache_dir

    return cache_dir() / "compiled"


def max_bytes() -> int:
    """The compiled-package directory's size budget in bytes: ``$DECODELAB_COMPILED_MAX_GB`` (GB, 1e9 bytes; 0
    keeps only the newest package; ``inf`` never removes one), else :data:`DEFAULT_MAX_GB`.

    Raises:
        ConfigError: the variable is set to something that is not a number >= 0.
    """
    from .errors import ConfigError

    raw = os.environ.get("DECODELAB_COMPILED_MAX_GB", "").strip()
    if not raw:
        return int(DEFAULT_MAX_GB * 1e9)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also rejects nan
        raise ConfigError(f"DECODELAB_COMPILED_MAX_GB must be a number of GB >= 0, got {raw!r}",
                          param="DECODELAB_COMPILED_MAX_GB")
    return sys.maxsize if value == float("inf") else int(value * 1e9)


def prune(directory: pathlib.Path, budget: int, keep: pathlib.Path | None = None,
          now: float | None = None) -> list[pathlib.Path]:
    """Delete compiled packages (``*.pt2``) least recently used first (file modification time: written, or
    touched when loaded) until the rest total at most ``budget`` bytes, never ``keep`` (the package just written
    or loaded); also delete temporary packages (``*.tmp<pid>.pt2``) older than :data:`STALE_TMP_S` seconds. A
    file another process removes first is skipped. Returns the deleted paths. Raises nothing."""
    now = time.time() if now is None else now
    removed: list[pathlib.Path] = []
    packages: list[tuple[float, int, pathlib.Path]] = []
    try:
        entries = list(directory.glob("*.pt2"))
    except OSError:
        return removed
    for path in entries:
        try:
            st = path.stat()
        except OSError:
            continue
        if ".tmp" in path.name:
            if now - st.st_mtime > STALE_TMP_S:
                path.unlink(missing_ok=True)
                removed.append(path)
            continue
        packages.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in packages)
    for _, size, path in sorted(packages):
        if total <= budget:
            break
        if path == keep:
            continue
        try:
            path.unlink(missing_ok=True)
        except OSError:
            continue
        removed.append(path)
        total -= size
    return removed


class CompiledStep:
    """The compiled decode step of one :class:`FastDecoder`.

    Args:
        decoder: the engine's fast decoder (its quantization, if any, is compiled in).
        model: the transformers model (its config goes into the cache key).
        progress: called with one-line messages while compiling / loading (default: print to stderr).
        options: Inductor options (default :func:`compile_options`).

    Raises:
        ConfigError: ``$DECODELAB_COMPILED_MAX_GB`` is not a number >= 0 (see :func:`max_bytes`).

    Call :meth:`step` in place of ``decoder.forward`` for decode steps; ``stats`` records, per (batch, capacity),
    ``{"seconds": seconds to compile or load the package, "loaded": the package was found on disk, "ok": passed
    the first-use check, "max_rel_err": that check's error}``.
    """

    def __init__(self, decoder: FastDecoder, model, *, progress: Callable[[str], None] | None = None,
                 options: dict | None = None) -> None:
        self.decoder = decoder
        self.module = StaticStep(decoder).eval()
        self.options = options or compile_options(decoder.device)
        self.runners: dict[tuple[int, int], Callable] = {}
        self.progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.stats: dict[tuple[int, int], dict] = {}
        self.budget_bytes = max_bytes()  # read once, when the engine is built: a bad value fails before any work
        cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
        self._base_key = {
            "config": {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool, type(None)))},
            "weights": weights_fingerprint(decoder), "dtype": str(decoder.dtype), "quantized": decoder.quantized,
            "device": decoder.device.type, "capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "transformers": _transformers_version(), "options": json.dumps(self.options, sort_keys=True, default=str),
            "code": _code_version(), "backend": "aoti", "kernels": decoder.kernels, "fused": decoder.fused,
            "act32": decoder.act32,
            "kernel_table": {k: v.get("choice") for k, v in sorted(decoder.kernel_table.items())},
        }

    def key(self, batch: int, capacity: int) -> str:
        """The on-disk key of the compiled step for (batch, capacity)."""
        blob = json.dumps(self._base_key | {"batch": batch, "capacity": capacity}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def capacity_for(self, total: int) -> int:
        """The cache capacity a request of ``total`` positions should allocate (a compiled bucket)."""
        return bucket(total)

    def _example(self, batch: int, capacity: int) -> tuple:
        """Example inputs of the step's signature (fresh, non-inference tensors: ``torch.export`` needs them)."""
        with torch.inference_mode(False):
            cache = self.decoder.new_cache(batch, capacity)
            dev = cache.pad.device
            ids = torch.zeros((batch, 1), dtype=torch.long, device=dev)
            index = torch.zeros(1, dtype=torch.long, device=dev)
            return ids, ids.clone(), index, cache.keys, cache.values, cache.pad.logical_not()

    def _compile(self, shape, path: pathlib.Path):
        """Export, compile and package the step for ``shape`` into ``path`` (atomically); returns the runner."""
        import torch._inductor

        with torch.inference_mode(False), torch.no_grad():
            program = torch.export.export(self.module, self._example(*shape), strict=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.pt2")
            try:
                torch._inductor.aoti_compile_and_package(program, package_path=str(tmp),
                                                         inductor_configs=dict(self.options))
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return torch._inductor.aoti_load_package(str(path))

    def _runner(self, shape) -> tuple[Callable, bool, float]:
        """(runner, loaded from disk, seconds) for ``shape``: the package on disk, else a new compilation."""
        import torch._inductor

        path = artifact_dir() / f"{self.key(*shape)}.pt2"
        start = time.perf_counter()
        if path.is_file():
            try:
                runner = torch._inductor.aoti_load_package(str(path))
                try:
                    os.utime(path)  # mark it recently used for prune()
                except OSError:
                    pass
                return runner, True, time.perf_counter() - start
            except Exception as err:  # a stale or corrupt package: compile again
                self.progress(f"decodelab: ignoring compiled package {path.name}: {type(err).__name__}")
        self.progress(f"decodelab: compiling the decode step for batch {shape[0]}, {shape[1]} cache positions "
                      "(a minute or more, once; kept on disk for later runs)")
        runner = self._compile(shape, path)
        removed = prune(path.parent, self.budget_bytes, keep=path)
        if removed:
            self.progress(f"decodelab: removed {len(removed)} least recently used compiled package(s) to stay "
                          f"within {self.budget_bytes / 1e9:g} GB ($DECODELAB_COMPILED_MAX_GB)")
        return runner, False, time.perf_counter() - start

    def _first_call(self, shape, tokens, positions, cache: StaticKVCache) -> torch.Tensor:
        runner, loaded, seconds = self._runner(shape)
        self.runners[shape] = runner
        ref = self.decoder.forward(tokens, positions, cache.clone())  # the eager step, on a copy of the cache
        out = self._call(runner, tokens, positions, cache)
        scale = max(1.0, float(ref.float().abs().max()))
        err = float((out.float() - ref.float()).abs().max()) / scale
        ok = bool(torch.equal(out.argmax(-1), ref.argmax(-1))) and err <= tolerance(self.decoder.dtype)
        self.stats[shape] = {"seconds": seconds, "loaded": loaded, "ok": ok, "max_rel_err": err}
        if not ok:
            self.progress(f"decodelab: the compiled step differs from the eager one (max error {err:.2e}); "
                          f"using the eager step for this shape")
            return ref
        self.progress(f"decodelab: decode step {'loaded' if loaded else 'compiled'} in {seconds:.1f} s")
        return out

    @staticmethod
    def _call(runner, tokens, positions, cache: StaticKVCache) -> torch.Tensor:
        # An AOTInductor package reads its inputs with the strides of the example inputs it was compiled for
        # (contiguous) and does not check them: a strided view (beam search's tokens are a column of a larger
        # tensor) would be read as garbage. The cache buffers are contiguous by construction.
        index = torch.tensor([cache.length], dtype=torch.long, device=cache.pad.device)
        out = runner(tokens.contiguous(), positions.contiguous(), index, cache.keys, cache.values,
                     cache.pad.contiguous())
        cache.length += 1
        return out

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """One decode step: (B, 1) ids at (B, 1) positions -> (B, V) logits (model dtype); advances ``cache``.
        The caller has already called ``cache.append_mask()``."""
        shape = (cache.batch, cache.capacity)
        if cache.length >= cache.capacity:
            return self.decoder.forward(tokens, positions, cache)  # grows the cache: eager this once
        stat = self.stats.get(shape)
        if stat is None:
            return self._first_call(shape, tokens, positions, cache)
        if not stat["ok"]:
            return self.decoder.forward(tokens, positions, cache)
        return self._call(self.runners[shape], tokens, positions, cache)


def _transformers_version() -> str:
    """transformers' version: the traced step calls the model's own rotary-embedding module."""
    import transformers

    return transformers.__version__


def _code_version() -> str:
    """sha256 (16 hex digits) of the code the compiled graph is traced from: every module of the
    :mod:`decodelab.fastpath` package (the decoder's forward, its projection modules, the static row plan, the
    kernel choice, the cache), whatever file a change lands in."""
    from . import fastpath

    h = hashlib.sha256()
    for path in sorted(pathlib.Path(fastpath.__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
