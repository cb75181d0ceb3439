"""decodelab's on-disk cache: atomic, self-checking entries (a directory plus a ``manifest.json`` written last).

An entry is built in a temporary directory beside its final place and renamed into place, so a reader never sees a
half-written one; :func:`verify_cache` checks the manifest (sizes; sha256 with ``deep=True``) and every safetensors
header, and :func:`cached` removes and rebuilds an entry that fails the check or fails to load. Concurrent builders
each write their own temporary directory; the first rename wins and the others keep the winner's entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import struct
import tempfile
import time
import uuid
import warnings
from typing import Any, Callable

from decodelab.errors import ModelLoadError

CACHE_FORMAT = 1
_STALE_S = 6 * 3600
log = logging.getLogger("decodelab")


def env_flag(name: str) -> bool:
    """Return True when environment variable ``name`` is 1/true/yes/on. Raises nothing."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def short_reason(err: BaseException) -> str:
    """Return the first non-empty line of ``str(err)`` (at most 200 characters), else the exception's type name."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def cache_dir() -> pathlib.Path:
    """Return decodelab's cache directory: ``$DECODELAB_CACHE_DIR``, else the platform user cache dir (honours
    ``XDG_CACHE_HOME``). The directory is not created here. Raises nothing."""
    env = os.environ.get("DECODELAB_CACHE_DIR", "").strip()
    if env:
        return pathlib.Path(env).expanduser()
    import platformdirs

    return pathlib.Path(platformdirs.user_cache_dir("decodelab"))


def package_dir(package: str, hint: str) -> pathlib.Path:
    """Return the directory of an installed package, found with ``importlib.util.find_spec`` (never imported).
    Raises :class:`ModelLoadError` with the install ``hint`` when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package '{package}' is not installed; install it with: {hint}", param="model")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def content_key(path: pathlib.Path, extra: str = "") -> str:
    """12 hex digits from the file's size and its first and last 4 MiB (stable across copies and reinstalls)."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{CACHE_FORMAT}:{extra}:{size}:".encode())
    with open(path, "rb") as f:
        digest.update(f.read(4 << 20))
        if size > 8 << 20:
            f.seek(-(4 << 20), os.SEEK_END)
            digest.update(f.read())
    return digest.hexdigest()[:12]


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def safetensors_reason(path: pathlib.Path) -> str | None:
    """Why a safetensors file is unusable (unreadable header, truncated data), or None when it looks whole.
    Raises nothing."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                return f"'{path.name}' has a bad header length"
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as err:
        return f"'{path.name}' header is unreadable ({short_reason(err)})"
    if 8 + n + end != size:
        return f"'{path.name}' is {size} bytes, its header describes {8 + n + end}"
    return None


def verify_cache(entry: os.PathLike | str, *, deep: bool = False) -> str | None:
    """Check a cache entry. Return None when it is complete, else a one-line reason (missing manifest, size
    mismatch, unreadable safetensors header; with ``deep=True`` also a sha256 mismatch). Raises nothing."""
    entry = pathlib.Path(entry)
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        files = manifest["files"]
        if manifest.get("format") != CACHE_FORMAT or not files:
            return "manifest format differs"
    except (OSError, ValueError, KeyError, TypeError):
        return "manifest.json is missing or unreadable"
    for rel, info in files.items():
        path = entry / rel
        try:
            size = path.stat().st_size
        except OSError:
            return f"'{rel}' is missing"
        if size != info.get("size"):
            return f"'{rel}' is {size} bytes, the manifest says {info.get('size')}"
        if path.suffix == ".safetensors" and (reason := safetensors_reason(path)):
            return reason
        if deep and info.get("sha256") and _sha256(path) != info["sha256"]:
            return f"'{rel}' does not match its sha256"
    return None


def remove(entry: pathlib.Path) -> None:
    """Move an entry aside (one atomic rename), then delete it; tolerate another process doing the same."""
    trash = entry.with_name(f".trash-{entry.name}-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(OSError):
        os.rename(entry, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _sweep(parent: pathlib.Path) -> None:
    """Delete temp/trash dirs left by interrupted builds (only old ones, so live builders are never touched)."""
    now = time.time()
    for child in parent.glob(".[tT]*"):
        with contextlib.suppress(OSError):
            if child.name.startswith((".tmp-", ".trash-")) and now - child.stat().st_mtime > _STALE_S:
                shutil.rmtree(child, ignore_errors=True)


def build_entry(entry: pathlib.Path, build: Callable[[pathlib.Path], None], meta: dict) -> None:
    """Build into a temp dir next to ``entry``, write the manifest last, rename into place. If another builder
    finished first, keep its (valid) entry."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    _sweep(entry.parent)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        with quiet():
            build(tmp)
        files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"format": CACHE_FORMAT, **meta, "created": time.time(), "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the entry should read like any other cache directory
        try:
            os.rename(tmp, entry)
        except OSError:
            if verify_cache(entry) is None:
                return  # a concurrent builder won; its entry is as good as ours
            remove(entry)
            os.rename(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached(entry: pathlib.Path, build: Callable[[pathlib.Path], None], load: Callable[[pathlib.Path], Any],
            meta: dict, direct: Callable[[], Any]) -> Any:
    """Load ``entry`` (building it first when missing or broken); rebuild once when loading it fails. When the
    cache directory cannot be written, fall back to ``direct()`` (no cache)."""
    for attempt in range(2):
        reason = verify_cache(entry) if entry.exists() else "absent"
        if reason is not None:
            if entry.exists():
                log.warning("decodelab: cache entry %s is unusable (%s); rebuilding it", entry, reason)
                remove(entry)
            log.info("decodelab: building cache entry %s (once)", entry)
            try:
                build_entry(entry, build, meta)
            except OSError as err:  # read-only or full disk: still load, just without the cache
                log.warning("decodelab: cannot write cache %s (%s); loading without it", entry, short_reason(err))
                return direct()
        try:
            return load(entry)
        except Exception as err:  # a cache that passed its check but does not load: rebuild it once
            if attempt:
                raise ModelLoadError(f"cannot load cache entry '{entry}': {short_reason(err)}",
                                     param="model") from err
            log.warning("decodelab: cache entry %s failed to load (%s); rebuilding it", entry, short_reason(err))
            remove(entry)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------ quiet transformers
@contextlib.contextmanager
def quiet():
    """Silence transformers' logging and progress bars (GGUF dequantization included) while loading, then restore."""
    from transformers.utils import logging as tlog

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils  # its tqdm ignores transformers' switch
    except ImportError:
        gguf_utils = None

    verbosity, bar = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    old_tqdm = getattr(gguf_utils, "tqdm", None) if gguf_utils is not None else None
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    if old_tqdm is not None:
        gguf_utils.tqdm = lambda iterable, *a, **k: iterable
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.set_verbosity(verbosity)
        if bar:
            tlog.enable_progress_bar()
        if old_tqdm is not None:
            gguf_utils.tqdm = old_tqdm
