"""EngineConfig: how the model runs (device, dtype, kernels, quantization, compilation), validated here and only here.

:class:`~decodelab.config.GenerationConfig` says *what* to generate; :class:`EngineConfig` says *how the engine
computes* it. One object travels from the surfaces (``decodelab.load(...)``, the CLI's ``--device`` / ``--dtype`` /
``--kernels`` / ``--batch-invariant`` / ``--quantize`` / ``--quantize-lm-head`` / ``--compile``, ``decodelab serve``) to
:func:`decodelab.models.load_model` (device, dtype) and :class:`decodelab.engine.Engine` (the rest); nothing on the
way re-checks a value. Shape of the idea: vLLM's ``EngineArgs`` -> ``VllmConfig`` (one validated object per engine),
with the ``x must be ..., got y`` one-line messages of vLLM's ``SamplingParams._verify_args``.

``torch`` is imported only inside the functions that need it, so ``import decodelab`` stays fast.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

KERNELS = ("exact", "fast")
"""``kernels`` values: bit-exact float32 products, or products measured fastest (see :class:`~decodelab.engine.Engine`)."""

QUANTIZE = ("int8", "int4")
"""``quantize`` schemes (:mod:`decodelab.quantize`)."""

DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}
"""Accepted ``dtype`` spellings (also ``torch.<name>`` and torch dtypes) -> the canonical name."""

_OFF = {"", "none", "no", "off"}  # quantize values meaning "no quantization"


@dataclass(frozen=True)
class EngineConfig:
    """Validated engine settings. Build with :meth:`from_kwargs` (``EngineConfig(...)`` validates the same way);
    fields are read-only and normalised.

    Attributes:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``: where the weights live. Given as ``None``:
            ``$DECODELAB_DEVICE``, else ``"cpu"``; ``"auto"``: ``"cuda"`` when available, else ``"cpu"``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (aliases ``bf16``, ``fp16``, ``half``, ``torch.float32``
            and torch dtypes accepted). Given as ``None``: ``"bfloat16"`` with ``quantize`` (PyTorch's int8/int4 CPU
            kernels are many times slower with float32 activations), else ``"float32"``.
        kernels: ``"exact"`` (float32 logits bit-for-bit transformers') or ``"fast"`` (fused projections and the
            kernel measured fastest per product; logits equal to ~1e-6 relative, log-probabilities to ~1e-5
            absolute, alone or batched). ``None``: ``"exact"``, or ``"fast"`` with ``batch_invariant``.
        batch_invariant: every request's logits the same bit for bit alone and in any batch (continuous batching),
            also off the exact path: with ``kernels="fast"``, every product runs decodelab's own ``panels`` GEMM
            (each row computed alone, whatever the other rows: :mod:`decodelab.fastpath.panels`) instead of the
            kernel measured fastest per row count, and every decode step attends through decodelab's own kernel
            (:mod:`decodelab.fastpath.slot_attention`). Needs float32 on the CPU, no ``quantize`` / ``compile``
            (a compiled step is another kernel), and those kernels built on the machine (checked when the engine
            is made). ``kernels="exact"`` is batch-invariant already: there it changes nothing. What vLLM calls
            batch-invariant mode (``VLLM_BATCH_INVARIANT``), after Thinking Machines' "Defeating Nondeterminism in
            LLM Inference" (2025).
        quantize: ``None``, ``"int8"`` or ``"int4"``: weight-only quantization of the decoder's linear layers
            (CPU only). ``"none"`` / ``"off"`` / ``""`` mean ``None``.
        quantize_lm_head: with ``quantize``, also the output layer (int8 per row).
        compile: ``False``, ``True`` (AOTInductor with :func:`decodelab.compile_cache.compile_options`) or a dict of
            Inductor options. Validated together with ``$DECODELAB_COMPILED_MAX_GB``.
        fast: ``None``: the fast path where the model supports it, unless ``$DECODELAB_FASTPATH=0``; ``True``: where
            supported; ``False``: always transformers' own forward (``quantize`` / ``compile`` / ``kernels="fast"``
            still take the fast path, which they need).
        pack: prepack bfloat16 weights for oneDNN on the fast path (``None``: where supported).

    Raises:
        ConfigError: an unknown keyword (:meth:`from_kwargs`) or a bad value; the one-line message names the field
            and the value received.
    """

    device: str = None  # type: ignore[assignment]  # None becomes $DECODELAB_DEVICE or "cpu" in __post_init__
    dtype: str = None  # type: ignore[assignment]  # None becomes "float32" (or "bfloat16" with quantize)
    kernels: str = None  # type: ignore[assignment]  # None becomes "exact" (or "fast" with batch_invariant)
    batch_invariant: bool = False
    quantize: str | None = None
    quantize_lm_head: bool = False
    compile: bool | dict = False
    fast: bool | None = None
    pack: bool | None = None

    def __post_init__(self) -> None:
        quantize = _quantize(self.quantize)
        invariant = _flag("batch_invariant", self.batch_invariant)
        values = {
            "quantize": quantize,
            "kernels": "fast" if self.kernels is None and invariant else _kernels(self.kernels),
            "batch_invariant": invariant,
            "device": _device(self.device),
            "dtype": _dtype(self.dtype, quantize),
            "quantize_lm_head": _flag("quantize_lm_head", self.quantize_lm_head),
            "compile": _compile(self.compile),
            "fast": _optional_flag("fast", self.fast),
            "pack": _optional_flag("pack", self.pack),
        }
        if values["quantize_lm_head"] and quantize is None:
            raise ConfigError("quantize_lm_head needs quantize='int8' or 'int4'", param="quantize_lm_head")
        if quantize is not None and not values["device"].startswith("cpu"):
            raise ConfigError(f"quantize={quantize!r} uses PyTorch's CPU kernels; device is {values['device']!r}",
                              param="quantize")
        if invariant and values["kernels"] == "fast":
            _check_invariant(values)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def names(cls) -> frozenset[str]:
        """Every keyword :meth:`from_kwargs` accepts."""
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Validate and normalise engine keywords (``None`` for any of them means its default).

        Raises:
            ConfigError: an unknown keyword or a bad value (one line naming the field and the value).
        """
        unknown = sorted(set(kwargs) - cls.names())
        if unknown:
            raise ConfigError(f"unknown engine option {unknown[0]}={kwargs[unknown[0]]!r} (valid: "
                              f"{', '.join(f.name for f in dataclasses.fields(cls))})", param=unknown[0])
        given = {k: v for k, v in kwargs.items() if v is not None}
        return cls(**given)

    def replace(self, **changes: Any) -> "EngineConfig":
        """A validated copy with some fields changed (same rules as :meth:`from_kwargs`)."""
        return EngineConfig.from_kwargs(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-friendly unless ``compile`` holds non-JSON Inductor options)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def torch_device(self):
        """``device`` as a ``torch.device``."""
        import torch

        return torch.device(self.device)

    @property
    def torch_dtype(self):
        """``dtype`` as a ``torch.dtype``."""
        import torch

        return getattr(torch, self.dtype)


# --- helpers: each returns the normalised value or raises ConfigError naming the field -------------------------------
def _kernels(value) -> str:
    name = "exact" if value is None else str(value).strip().lower()
    if name not in KERNELS:
        raise ConfigError(f"invalid kernels={value!r}: expected one of {', '.join(KERNELS)}", param="kernels")
    return name


def _check_invariant(values: dict) -> None:
    """``batch_invariant`` with ``kernels="fast"``: decodelab's own float32 CPU kernels, nothing else."""
    if values["quantize"] is not None:
        why = f"quantize={values['quantize']!r}"
    elif values["compile"]:
        why = "compile (a compiled step runs other kernels than a batched eager step)"
    elif values["dtype"] != "float32":
        why = f"dtype={values['dtype']!r}"
    elif not values["device"].startswith("cpu"):
        why = f"device={values['device']!r}"
    else:
        return
    raise ConfigError(f"batch_invariant=True with kernels='fast' runs decodelab's own float32 CPU kernels; it cannot "
                      f"be combined with {why}", param="batch_invariant")


def _quantize(value) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in _OFF):
        return None
    if not isinstance(value, str) or value.strip().lower() not in QUANTIZE:
        raise ConfigError(f"invalid quantize={value!r}: expected 'int8', 'int4' or None", param="quantize")
    return value.strip().lower()


def _device(value) -> str:
    import torch

    if value is None:
        value = os.environ.get("DECODELAB_DEVICE", "").strip() or "cpu"
    if isinstance(value, str) and value.strip().lower() == "auto":
        value = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(value.strip().lower() if isinstance(value, str) else value)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto', got {value!r}",
                          param="device") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(dev)!r} is not available: torch.cuda.is_available() is False", param="device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' is not available on this machine", param="device")
    return str(dev)


def _dtype(value, quantize: str | None) -> str:
    if value is None:
        return "bfloat16" if quantize is not None else "float32"
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
    elif type(value).__name__ == "dtype" and type(value).__module__ == "torch":
        name = str(value).removeprefix("torch.")
    else:
        name = ""
    if name not in DTYPES:
        raise ConfigError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {value!r}", param="dtype")
    return DTYPES[name]


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"invalid {name}={value!r}: expected true or false", param=name)
    return value


def _optional_flag(name: str, value) -> bool | None:
    return None if value is None else _flag(name, value)


def _compile(value) -> bool | dict:
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"invalid compile={value!r}: expected true, false or a dict of Inductor options",
                              param="compile")
    elif not isinstance(value, bool):
        raise ConfigError(f"invalid compile={value!r}: expected true, false or a dict of Inductor options",
                          param="compile")
    if value:
        from .compile_cache import max_bytes

        max_bytes()  # a bad $DECODELAB_COMPILED_MAX_GB fails here, before any model is loaded
    return dict(value) if isinstance(value, dict) else value
