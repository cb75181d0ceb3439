"""The playground's static route against path tricks, over a real socket (uvicorn parses the raw request line).

The app under test serves a copy of the package's ``static/`` folder in a temporary directory that also holds a
``secret.txt`` next to it, a symbolic link to that secret inside the folder, a symbolic link to the parent folder and
a dot-file. Every trick below must answer 404 with the OpenAI-style error object, and no answer may hold the
secret's text or a line of ``/etc/passwd``.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest

import decodelab
from decodelab.server import Settings, app as app_module, create_app
from decodelab.server.background import BackgroundServer
from decodelab.server.files import MAX_PATH, PackageFiles

pytestmark = pytest.mark.timeout(120)

SECRET = "decodelab-secret-4e1f0b: this file is outside the static folder"

# at least 20 encoded forms of "a path outside the folder" (raw request targets, sent byte for byte)
TRICKS = [
    "/../secret.txt",
    "/../../../../../../etc/passwd",
    "/%2e%2e/secret.txt",
    "/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
    "/%2e%2e%2fsecret.txt",
    "/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/.%2e/secret.txt",
    "/%2e./secret.txt",
    "/..%2fsecret.txt",
    "/%252e%252e%252fsecret.txt",  # double-encoded
    "/%252e%252e/%252e%252e/etc/passwd",
    "/..%5csecret.txt",  # backslash
    "/..%5c..%5c..%5cetc%5cpasswd",
    "/%5c..%5csecret.txt",
    "/..%255csecret.txt",
    "/%c0%ae%c0%ae/secret.txt",  # over-long UTF-8 dots
    "/%c0%ae%c0%ae%c0%afsecret.txt",
    "/..%c0%afsecret.txt",
    "/%e0%80%ae%e0%80%ae/secret.txt",
    "/%u002e%u002e/secret.txt",  # IIS-style
    "/..;/secret.txt",
    "/....//....//secret.txt",
    "/index.html/../../secret.txt",
    "/index.html%2f..%2f..%2fsecret.txt",
    "//etc/passwd",  # absolute paths
    "/%2fetc%2fpasswd",
    "/%2F%2Fetc%2Fpasswd",
    "/file:///etc/passwd",
    "/C:%5cWindows%5cwin.ini",
    "/index.html%00",  # NUL bytes
    "/index.html%00.png",
    "/%00../secret.txt",
    "/../secret.txt%00index.html",
    "/link.txt",  # a symbolic link to ../secret.txt inside the folder
    "/up/secret.txt",  # a symbolic link to the parent folder inside the folder
    "/up/static/index.html",
    "/.hidden",  # a dot-file
    "/./index.html",
    "/index.html/",
    "/" + "a" * (MAX_PATH + 1),  # over-long
    "/" + "../" * 400 + "etc/passwd",
    "/" + "%2e%2e%2f" * 300 + "etc/passwd",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``root/static`` (a copy of the package's files, a link to ``root/secret.txt``, a link to ``root``, a
    dot-file) beside ``root/secret.txt``."""
    root = tmp_path_factory.mktemp("served")
    static = root / "static"
    shutil.copytree(app_module.STATIC_DIR, static)
    (root / "secret.txt").write_text(SECRET)
    (static / ".hidden").write_text(SECRET)
    os.symlink(root / "secret.txt", static / "link.txt")
    os.symlink(root, static / "up")
    return static


@pytest.fixture(scope="module")
def server(folder, tiny_llama):
    saved = app_module.STATIC_DIR
    app_module.STATIC_DIR = folder
    try:
        app = create_app(decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.name), Settings(max_tokens=8))
    finally:
        app_module.STATIC_DIR = saved
    with BackgroundServer(app) as srv:
        yield srv


def raw_get(server, target: str) -> tuple[int, str]:
    """Send ``GET <target> HTTP/1.1`` exactly as written (no client-side normalisation); (status, body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode("utf-8", "replace")


def test_there_are_at_least_20_tricks():
    assert len(TRICKS) >= 20 and len(set(TRICKS)) == len(TRICKS)


@pytest.mark.parametrize("target", TRICKS)
def test_path_tricks_get_404_and_nothing_outside(server, target):
    status, body = raw_get(server, target)
    assert status == 404, (target, status, body[:200])
    assert SECRET not in body and "root:" not in body
    assert body.startswith('{"error":') and '"code":"not_found"' in body, body[:200]


def test_shipped_files_are_served(server, folder):
    for name in ("index.html", "app.js", "api.js", "app.css", "i18n.js"):
        status, body = raw_get(server, "/" + name)
        assert status == 200 and body == (folder / name).read_text(), name
    status, body = raw_get(server, "/")
    assert status == 200 and body == (folder / "index.html").read_text()
    status, body = raw_get(server, "/%69ndex.html")  # percent-encoding of an ordinary letter is still that name
    assert status == 200 and body == (folder / "index.html").read_text()


def test_listing_skips_links_and_dot_files(folder):
    files = PackageFiles(folder).files
    assert {"index.html", "app.js"} <= set(files)
    assert not {name for name in files if name.startswith(("link", "up/", ".")) or "secret" in name}


def test_a_file_replaced_by_a_link_after_start_is_404(tmp_path):
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<p>hi</p>")
    (static / "extra.js").write_text("ok")
    (tmp_path / "secret.txt").write_text(SECRET)
    files = PackageFiles(static)
    assert files.lookup("/extra.js") == static / "extra.js"
    (static / "extra.js").unlink()
    os.symlink(tmp_path / "secret.txt", static / "extra.js")

    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    with TestClient(Starlette(routes=[Mount("/", files)])) as client:
        assert client.get("/index.html").text == "<p>hi</p>"
        r = client.get("/extra.js")
        assert r.status_code == 404 and SECRET not in r.text
        assert client.post("/index.html").status_code == 405


@pytest.mark.parametrize("route_path", ["", "/", "/index.html", "index.html", "/a\x00", "/" + "x" * 300, "/../x"])
def test_lookup(folder, route_path):
    found = PackageFiles(folder).lookup(route_path)
    expected = folder / "index.html" if route_path in ("", "/", "/index.html") else None
    assert found == expected
