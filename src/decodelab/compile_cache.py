"""``compile=True``: the fast path's decode step compiled by Inductor, with the compiled artifacts kept on disk.

What is compiled is :class:`decodelab.fastpath.static.StaticStep` (one token per row, fixed batch and cache
capacity), on CPU with ``max_autotune`` + ``coordinate_descent_tuning`` (``mode="max-autotune-no-cudagraphs"``)
and ``freezing`` (weights become constants that Inductor can prepack); on CUDA with ``mode="reduce-overhead"``
(CUDA graphs; untested: this project's machines have no GPU. The KV cache is a fresh input per request and is
mutated in place, so Inductor may skip the graphs and run the compiled kernels without them; pooling caches per
shape and marking them static would be the next step). The prefill stays eager.

Compiling costs minutes on a small CPU. To pay that once per machine rather than once per process, the first
process saves PyTorch's portable cache artifacts (``torch.compiler.save_cache_artifacts``: Inductor's FX graph
cache, AOTAutograd cache and autotuning results) to ``<decodelab cache>/compiled/<key>.bin``; a later process
loads them (``torch.compiler.load_cache_artifacts``) before compiling, so only Dynamo's tracing runs again. The
key hashes everything the code depends on: the model's config and a fingerprint of its weights, dtype,
quantization, batch size, cache capacity, device, CPU capability, torch version and the compile options.

Compiled graphs reorder float arithmetic: their logits are close to the eager path's, not bit-for-bit. Each newly
compiled shape is checked once against the eager step (argmax equal, logits within ``CHECK_ATOL`` after scaling);
on a mismatch the engine falls back to the eager step for that shape and says so on stderr.
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
CHECK_ATOL = 1e-2  # max |compiled - eager| / max(1, max |eager|) accepted by the first-use check


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
    """``torch.compile`` keyword arguments for the decode step on ``device``."""
    if device.type == "cuda":
        return {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False}
    return {"options": {"max_autotune": True, "coordinate_descent_tuning": True, "freezing": True},
            "fullgraph": True, "dynamic": False}


def artifact_dir() -> pathlib.Path:
    """``<decodelab cache>/compiled`` (see :func:`decodelab.modelcache.cache_dir`)."""
    from .modelcache import cache_dir

    return cache_dir() / "compiled"


class CompiledStep:
    """The compiled decode step of one :class:`FastDecoder`.

    Args:
        decoder: the engine's fast decoder (its quantization, if any, is compiled in).
        model: the transformers model (its config goes into the cache key).
        progress: called with one-line messages while compiling / loading (default: print to stderr).
        options: ``torch.compile`` keyword arguments (default :func:`compile_options`).

    Call :meth:`step` in place of ``decoder.forward`` for decode steps; ``stats`` records, per (batch, capacity),
    ``{"seconds": first-call seconds, "loaded": artifacts found on disk, "ok": passed the first-use check}``.
    """

    def __init__(self, decoder: FastDecoder, model, *, progress: Callable[[str], None] | None = None,
                 options: dict | None = None) -> None:
        self.decoder = decoder
        self.module = StaticStep(decoder).eval()
        self.options = options or compile_options(decoder.device)
        self.fn = torch.compile(self.module, **self.options)
        self.progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.stats: dict[tuple[int, int], dict] = {}
        cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
        self._base_key = {
            "config": {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool, type(None)))},
            "weights": weights_fingerprint(decoder), "dtype": str(decoder.dtype), "quantized": decoder.quantized,
            "device": decoder.device.type, "capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "options": json.dumps(self.options, sort_keys=True, default=str),
            "code": _code_version(),
        }

    def key(self, batch: int, capacity: int) -> str:
        """The on-disk key of the compiled step for (batch, capacity)."""
        blob = json.dumps(self._base_key | {"batch": batch, "capacity": capacity}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def capacity_for(self, total: int) -> int:
        """The cache capacity a request of ``total`` positions should allocate (a compiled bucket)."""
        return bucket(total)

    def _first_call(self, shape, tokens, positions, cache: StaticKVCache) -> torch.Tensor:
        path = artifact_dir() / f"{self.key(*shape)}.bin"
        loaded = False
        if path.is_file():
            try:
                torch.compiler.load_cache_artifacts(path.read_bytes())
                loaded = True
            except Exception as err:  # a stale or corrupt file: compile from scratch
                self.progress(f"decodelab: ignoring compiled cache {path.name}: {type(err).__name__}")
        self.progress(f"decodelab: {'loading' if loaded else 'compiling'} the decode step for batch {shape[0]}, "
                      f"{shape[1]} cache positions" + ("" if loaded else " (minutes, once; cached on disk)"))
        # reference: the eager step on a copy of the cache
        ref_cache = cache.clone()
        ref = self.decoder.forward(tokens, positions, ref_cache)
        start = time.perf_counter()
        out = self._call(tokens, positions, cache)
        seconds = time.perf_counter() - start
        scale = max(1.0, float(ref.float().abs().max()))
        err = float((out.float() - ref.float()).abs().max()) / scale
        ok = bool(torch.equal(out.argmax(-1), ref.argmax(-1))) and err <= CHECK_ATOL
        self.stats[shape] = {"seconds": seconds, "loaded": loaded, "ok": ok, "max_rel_err": err}
        if not ok:
            self.progress(f"decodelab: the compiled step differs from the eager one (max error {err:.2e}); "
                          f"using the eager step for this shape")
            return ref
        if not loaded or seconds > 60:  # new, or the stored artifacts did not cover this graph: (re)save
            try:
                saved = torch.compiler.save_cache_artifacts()
                if saved is not None:
                    _atomic_write(path, saved[0])
            except Exception as err2:
                self.progress(f"decodelab: could not save the compiled cache: {type(err2).__name__}: {err2}")
        self.progress(f"decodelab: decode step ready in {seconds:.1f} s")
        return out

    def _call(self, tokens, positions, cache: StaticKVCache) -> torch.Tensor:
        # Dynamo guards on inference-mode-ness: make every input an inference tensor, as the cache buffers are
        with torch.inference_mode():
            tokens = tokens if tokens.is_inference() else tokens.clone()
            positions = positions if positions.is_inference() else positions.clone()
            index = torch.tensor([cache.length], dtype=torch.long, device=cache.pad.device)
            out = self.fn(tokens, positions, index, cache.keys, cache.values, cache.pad)
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
        return self._call(tokens, positions, cache)


def _code_version() -> str:
    """sha256 (16 hex digits) of the code the compiled graph is traced from: :mod:`decodelab.fastpath.static`
    and the functions it calls."""
    import inspect

    from .fastpath import decoder, static

    h = hashlib.sha256(pathlib.Path(static.__file__).read_bytes())
    for fn in (decoder.rms_norm, decoder.rope):
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()[:16]


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
