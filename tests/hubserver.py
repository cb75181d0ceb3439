"""A Hugging Face hub on loopback, for tests: the routes huggingface_hub uses to resolve and download a model.

Routes (what ``snapshot_download`` / ``hf_hub_download`` / ``HfApi.model_info`` call):

- ``HEAD /``: 200 (decodelab's reachability probe);
- ``GET /api/models/{org}/{name}[/revision/{rev}]``: model info (``sha``, ``siblings`` with sizes, ``gated``);
- ``GET /api/models/{org}/{name}/tree/{rev}``: the file listing (``path``, ``size``, ``oid``, ``lfs``);
- ``HEAD|GET /{org}/{name}/resolve/{rev}/{file}``: the file, with ``X-Repo-Commit``, ``ETag``, ``Content-Length``
  and ``Accept-Ranges`` headers; ``Range: bytes=a-[b]`` gets a 206 with ``Content-Range``.

Errors as the hub sends them: an unknown repository is a 404 with ``X-Error-Code: RepoNotFound``; a private one a 401
for every route; a gated one answers its info but a 403 ``X-Error-Code: GatedRepo`` for its files unless the request
carries ``Authorization: Bearer <token>``. Test knobs: :meth:`HubServer.drop` (send part of a file, then close the
connection), :meth:`HubServer.stall` (send part of a file, then wait), and ``requests`` (every request seen).
HTTP/1.0, one connection per request, so :meth:`HubServer.stop` leaves no connection behind.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_INFO = re.compile(r"^/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?/?$")
_TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)/?$")
_FILE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


@dataclass
class Repo:
    """One model repository: ``files`` (name -> bytes), ``access`` ("public", "gated" or "private")."""

    files: dict[str, bytes]
    access: str = "public"
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + bytes.fromhex(self.entries[name]["oid"]))
        self.sha = digest.hexdigest()

    @cached_property
    def entries(self) -> dict[str, dict]:
        """Each file's tree entry (git blob id as ``oid``), LFS-style for weights as on the real hub."""
        out = {}
        for name, data in self.files.items():
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            out[name] = {"type": "file", "path": name, "size": len(data), "oid": blob}
            if name.endswith((".safetensors", ".bin")):
                out[name]["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return out

    def entry(self, name: str) -> dict:
        """The tree entry of file ``name``."""
        return self.entries[name]

    def etag(self, name: str) -> str:
        entry = self.entry(name)
        return entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]


class HubServer:
    """Serve ``repos`` (id -> :class:`Repo`) on 127.0.0.1 (a free port): ``url`` is the value for ``HF_ENDPOINT``.
    ``token`` opens gated repositories."""

    token = "hf_decodelab_test_token"

    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._drops: dict[str, list[int]] = {}
        self._stalls: dict[str, tuple[int, threading.Event, threading.Event]] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the port: later connections are refused."""
        self._httpd.shutdown()
        self._httpd.server_close()
        for _, released, _ in self._stalls.values():
            released.set()

    def drop(self, name: str, after: int, times: int = 1) -> None:
        """The next ``times`` GETs of file ``name`` send ``after`` bytes of the body, then close the connection."""
        self._drops[name] = [after] * times

    def stall(self, name: str, after: int) -> threading.Event:
        """GETs of file ``name`` send ``after`` bytes (Range requests none), set the returned event, then wait until
        :meth:`release`."""
        sent = threading.Event()
        self._stalls[name] = (after, threading.Event(), sent)
        return sent

    def release(self, name: str) -> None:
        """End the stall of ``name``: a stalled request closes its connection; later ones are served whole."""
        _, released, _ = self._stalls.pop(name)
        released.set()

    def gets(self, name: str) -> list[str | None]:
        """The Range header of every GET of file ``name`` (None: the whole file)."""
        return [rng for method, path, rng in self.requests if method == "GET" and path.endswith("/" + name)
                and "/resolve/" in path]


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        # --- responses ------------------------------------------------------------------------------------------
        def _send(self, status: int, payload: bytes = b"", headers: dict | None = None, body: bool = True) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(payload)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def _json(self, obj, body: bool) -> None:
            self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, body)

        def _error(self, status: int, code: str | None, message: str, body: bool) -> None:
            headers = {"X-Error-Message": message, "Content-Type": "application/json"}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers, body)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if path == "/":
                return self._send(200, b"", body=body)
            match = _INFO.match(path) or _TREE.match(path) or _FILE.match(path)
            repo = hub.repos.get(match.group(1)) if match else None
            if match is None:
                return self._error(404, None, "Not Found", body)
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found", body)
            if repo.access == "private":
                return self._error(401, None, "Invalid username or password.", body)
            if match.re is _INFO:
                return self._json({"id": match.group(1), "modelId": match.group(1), "sha": repo.sha,
                                   "private": False, "gated": "manual" if repo.access == "gated" else False,
                                   "siblings": [{"rfilename": n, "size": len(d), "blobId": repo.entry(n)["oid"]}
                                                for n, d in sorted(repo.files.items())]}, body)
            if match.re is _TREE:
                return self._json([repo.entry(n) for n in sorted(repo.files)], body)
            name = match.group(3)
            if repo.access == "gated" and self.headers.get("Authorization") != f"Bearer {hub.token}":
                return self._error(403, "GatedRepo", "Access to model is restricted.", body)
            if name not in repo.files:
                return self._error(404, "EntryNotFound", "Entry not found", body)
            self._file(repo, name, body)

        def _file(self, repo: Repo, name: str, body: bool) -> None:
            data = repo.files[name]
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{repo.etag(name)}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            start, status = 0, 200
            rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            if rng:
                start, end = int(rng.group(1)), int(rng.group(2) or len(data) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start:end + 1], 206
            if not body:
                return self._send(status, data, headers, body=False)
            cut = None
            if self.command == "GET" and hub._drops.get(name):
                cut = hub._drops[name].pop(0)
            stall = hub._stalls.get(name) if self.command == "GET" else None
            if stall is not None:
                cut = stall[0] if start == 0 else 0  # a resumed request (after a client timeout) stalls at once
            if cut is None:
                return self._send(status, data, headers)
            self._send(status, data[:cut], {**headers, "Content-Length": str(len(data))})
            self.wfile.flush()
            if stall is not None:
                stall[2].set()
                stall[1].wait(60)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    return Handler
