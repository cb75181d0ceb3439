"""The compiled-package directory's size budget (decodelab.compile_cache.prune / max_bytes): no compilation here,
packages are stand-in files with chosen sizes and modification times."""

from __future__ import annotations

import os
import sys

import pytest

from decodelab.compile_cache import DEFAULT_MAX_GB, STALE_TMP_S, max_bytes, prune
from decodelab.errors import ConfigError


def package(directory, name: str, size: int, mtime: float):
    path = directory / name
    path.write_bytes(b"x" * size)
    os.utime(path, (mtime, mtime))
    return path


def test_prune_drops_least_recently_used_packages_until_the_rest_fit(tmp_path):
    old = package(tmp_path, "a.pt2", 400, 1000.0)
    mid = package(tmp_path, "b.pt2", 400, 2000.0)
    new = package(tmp_path, "c.pt2", 400, 3000.0)
    other = package(tmp_path, "notes.txt", 10_000, 500.0)  # not a package: never touched
    removed = prune(tmp_path, budget=900, now=4000.0)
    assert removed == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pt2", "c.pt2", "notes.txt"]
    assert prune(tmp_path, budget=800, now=4000.0) == []  # 800 bytes left: within budget
    assert prune(tmp_path, budget=0, keep=mid, now=4000.0) == [new]  # keep wins even when oldest
    assert mid.exists() and other.exists()


def test_prune_removes_only_stale_temporary_packages(tmp_path):
    now = 10 * STALE_TMP_S
    stale = package(tmp_path, "k.tmp123.pt2", 10, now - STALE_TMP_S - 1)
    live = package(tmp_path, "k.tmp456.pt2", 10, now - 60)  # another process is compiling into it
    assert prune(tmp_path, budget=10**9, now=now) == [stale]
    assert live.exists()


def test_prune_of_a_missing_directory_is_a_no_op(tmp_path):
    assert prune(tmp_path / "absent", budget=0) == []


def test_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("DECODELAB_COMPILED_MAX_GB", raising=False)
    assert max_bytes() == int(DEFAULT_MAX_GB * 1e9)
    monkeypatch.setenv("DECODELAB_COMPILED_MAX_GB", "2.5")
    assert max_bytes() == 2_500_000_000
    monkeypatch.setenv("DECODELAB_COMPILED_MAX_GB", "0")
    assert max_bytes() == 0
    monkeypatch.setenv("DECODELAB_COMPILED_MAX_GB", "inf")
    assert max_bytes() == sys.maxsize


@pytest.mark.parametrize("raw", ["-1", "lots", "nan", "1e400x"])
def test_bad_budget_is_a_one_line_config_error(monkeypatch, raw):
    monkeypatch.setenv("DECODELAB_COMPILED_MAX_GB", raw)
    with pytest.raises(ConfigError, match="DECODELAB_COMPILED_MAX_GB must be a number of GB >= 0") as err:
        max_bytes()
    assert "\n" not in str(err.value) and err.value.param == "DECODELAB_COMPILED_MAX_GB"


def test_bad_budget_fails_when_the_compiled_engine_is_built(tiny_llama, monkeypatch):
    """Before any compilation: building the engine reads the budget."""
    from decodelab.engine import Engine

    monkeypatch.setenv("DECODELAB_COMPILED_MAX_GB", "-3")
    with pytest.raises(ConfigError, match="DECODELAB_COMPILED_MAX_GB"):
        Engine(tiny_llama.model, compile=True)


def test_a_new_package_pushes_out_the_least_recently_used_one(tiny_llama, tmp_path, monkeypatch):
    """With a budget of 0 bytes only the package just compiled is kept: compiling the beam shape (batch 3) removes
    the greedy one (batch 1), says so, and the engine keeps working."""
    from decodelab import LM
    from decodelab.compile_cache import artifact_dir
    from decodelab.engine import Engine

    monkeypatch.setenv("DECODELAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DECODELAB_COMPILED_MAX_GB", "0")
    lm = LM(tiny_llama.model, tiny_llama.tokenizer, "tiny",
            engine=Engine(tiny_llama.model, compile={"freezing": True}))
    messages: list[str] = []
    lm.engine.compiled.progress = messages.append
    lm.generate("It was a dark and stormy", max_new_tokens=4)
    first = sorted(artifact_dir().iterdir())
    assert len(first) == 1 and first[0].suffix == ".pt2"
    lm.generate("It was a dark and stormy", max_new_tokens=4, num_beams=3)
    second = sorted(artifact_dir().iterdir())
    assert len(second) == 1 and second != first
    assert any("removed 1 least recently used compiled package" in m for m in messages)
    assert all(s["ok"] for s in lm.engine.compiled.stats.values())


def test_load_checks_the_budget_before_loading_the_model(monkeypatch):
    import decodelab
    import decodelab.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad budget was reported")

    monkeypatch.setattr(decodelab.models, "load_model", no_load)
    monkeypatch.setenv("DECODELAB_COMPILED_MAX_GB", "abc")
    with pytest.raises(ConfigError, match="DECODELAB_COMPILED_MAX_GB"):
        decodelab.load(compile=True)
