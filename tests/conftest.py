"""Shared test setup and fixtures.

For the whole session decodelab's cache is a fresh temporary directory (``DECODELAB_CACHE_DIR``), so the embedded
model's one-time GGUF -> safetensors conversion (~20 s) happens once per session and every test file reuses it; set
``DECODELAB_TEST_CACHE_DIR`` to a directory of your own to keep that cache between sessions. The hub is switched off
(``HF_HUB_OFFLINE=1``) so that no test ever waits on the network, and a user's ``DECODELAB_MODEL`` /
``DECODELAB_DEVICE`` do not leak in.

Fixtures: ``embedded`` (the default model, a ``LoadedModel``), ``embedded_cache_entry`` (its cache directory),
``tiny_llama`` and ``tiny_qwen2`` (seeded tiny random models with the real SmolLM2 / Qwen2 tokenizers), all
session-scoped: treat them as read-only.
"""

from __future__ import annotations

import ast
import os
import shutil
import tempfile
import threading
import time

import pytest

# CPython 3.11 keeps the AST builder's recursion counter per interpreter, not per thread (python/cpython#106905 and
# the reports under it): two threads building an AST at once make one of them fail with "SystemError: AST constructor
# recursion depth mismatch". pytest parses every module it rewrites (the tests and the whole distributions of its
# plugins: schemathesis, hypothesis, anyio, ...) with ``ast.parse`` when it is imported, on every run where no rewritten
# bytecode is kept (PYTHONDONTWRITEBYTECODE, a fresh clone), and such imports also happen lazily while a test's server
# threads run (a fresh clone's `make test` failed the three schemathesis tests this way once). One lock around
# ``ast.parse`` for the session serialises them.
_AST_LOCK = threading.RLock()
_ast_parse = ast.parse


def _parse_one_at_a_time(*args, **kwargs):
    with _AST_LOCK:
        return _ast_parse(*args, **kwargs)


ast.parse = _parse_one_at_a_time

_ENV: dict[str, str | None] = {}
_SESSION_CACHE: str | None = None
_OWN_CACHE = False


def pytest_configure(config):
    global _SESSION_CACHE, _OWN_CACHE
    persistent = os.environ.get("DECODELAB_TEST_CACHE_DIR", "").strip()
    _OWN_CACHE = not persistent
    _SESSION_CACHE = persistent or tempfile.mkdtemp(prefix="decodelab-test-cache-")
    wanted = {"DECODELAB_CACHE_DIR": _SESSION_CACHE, "HF_HUB_OFFLINE": "1", "DECODELAB_MODEL": None,
              "DECODELAB_DEVICE": None, "DECODELAB_ALLOW_PICKLE": None}
    for key, value in wanted.items():
        _ENV[key] = os.environ.get(key)
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def pytest_unconfigure(config):
    for key, value in _ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if _OWN_CACHE and _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def session_cache_dir() -> str:
    """The session's ``DECODELAB_CACHE_DIR``."""
    return _SESSION_CACHE


@pytest.fixture(scope="session")
def embedded_load_seconds() -> dict:
    """Filled by ``embedded``: ``{"first": seconds of the first load this session, "built": bool}``."""
    return {}


@pytest.fixture(scope="session")
def embedded(embedded_load_seconds):
    """The embedded SmolLM2-135M-Instruct (``load_model()``), loaded once per session (building the cache)."""
    from decodelab import models

    entry_before = models._gguf_entry(models.embedded_gguf_path(), "models")
    built = models.verify_cache(entry_before) is not None
    start = time.perf_counter()
    loaded = models.load_model()
    embedded_load_seconds.update(first=time.perf_counter() - start, built=built)
    return loaded


@pytest.fixture(scope="session")
def embedded_cache_entry(embedded):
    """The (valid) cache directory the embedded model was loaded from."""
    from decodelab import models

    entry = models._gguf_entry(models.embedded_gguf_path(), "models")
    assert models.verify_cache(entry) is None
    return entry


@pytest.fixture(scope="session")
def tiny_llama():
    """A seeded tiny random LlamaForCausalLM with SmolLM2's tokenizer (vocab 49152)."""
    from tiny_models import tiny_random_model

    return tiny_random_model("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2():
    """A seeded tiny random Qwen2ForCausalLM with the offline Qwen2 tokenizer (vocab 151936)."""
    from tiny_models import tiny_random_model

    return tiny_random_model("qwen2", seed=0)


CHROMIUM = os.environ.get("DECODELAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium (``$DECODELAB_CHROMIUM``, default /usr/bin/chromium) through Playwright, headless, one per
    test module; never a browser download. Fails (not skips) when chromium is missing: ``make browser`` installs it.
    Screenshots go to ``test-artifacts/screenshots`` (created here)."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: run `make browser` (apt-get install chromium, as root)")
    from pathlib import Path

    from playwright.sync_api import sync_playwright

    (Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots").mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
