"""The playground's static files: only the files shipped in the package, looked up by exact name.

:class:`PackageFiles` lists the regular files under its directory once, when the app is built (symbolic links,
whether to files or to directories, and dot-files are left out). A request's path is then a key into that list and
never part of a filesystem path: ``..`` in any encoding, absolute paths, backslashes, NUL bytes, symbolic links and
paths longer than :data:`MAX_PATH` all miss the list and get a 404. A listed file that was since replaced by a
symbolic link or removed is a 404 too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse
from starlette.staticfiles import NotModifiedResponse
from starlette.types import Receive, Scope, Send

MAX_PATH = 255  # characters of a request path the static route considers at all


def shipped_files(directory: Path) -> dict[str, Path]:
    """``{"index.html": Path, "app.js": Path, ...}``: every regular file under ``directory`` (names relative, with
    ``/``), skipping symbolic links and names that start with a dot."""
    root = Path(directory)
    found: dict[str, Path] = {}
    for here, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".") and not os.path.islink(os.path.join(here, d))]
        for name in files:
            path = Path(here) / name
            if name.startswith(".") or path.is_symlink() or not path.is_file():
                continue
            found[path.relative_to(root).as_posix()] = path
    return found


class PackageFiles:
    """ASGI app serving the files :func:`shipped_files` found in ``directory``; ``/`` serves ``index``.

    Args:
        directory: the folder shipped in the package (``server/static``).
        index: the file served for the mount's root.

    Raises (to the app's error handlers): ``HTTPException(404)`` for any path not listed, ``HTTPException(405)`` for
    a method other than GET or HEAD.
    """

    def __init__(self, directory: Path, index: str = "index.html") -> None:
        self.directory = Path(directory)
        self.index = index
        self.files = shipped_files(self.directory)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise HTTPException(status_code=404)
        if scope["method"] not in ("GET", "HEAD"):
            raise HTTPException(status_code=405, headers={"Allow": "GET, HEAD"})
        path = self.lookup(_route_path(scope))
        try:
            st = os.lstat(path) if path is not None else None
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):  # gone, or replaced by a link since the app was built
            raise HTTPException(status_code=404)
        response = FileResponse(path, stat_result=st)
        if _not_modified(Headers(scope=scope), response):
            response = NotModifiedResponse(response.headers)
        await response(scope, receive, send)

    def lookup(self, route_path: str) -> Path | None:
        """The shipped file for a request path (``"/"`` -> the index), or ``None``."""
        route_path = route_path or "/"
        if len(route_path) > MAX_PATH or "\x00" in route_path or not route_path.startswith("/"):
            return None
        name = route_path[1:] or self.index
        return self.files.get(name)


def _route_path(scope: Scope) -> str:
    """The request path below the mount point (Starlette keeps the full path in ``path``, the mount's in
    ``root_path``)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _not_modified(request: Headers, response: FileResponse) -> bool:
    """Whether the client's ``If-None-Match`` already names this file's ETag."""
    etag = response.headers.get("etag")
    wanted = request.get("if-none-match")
    if not etag or not wanted:
        return False
    return etag.strip(" W/") in [tag.strip(" W/") for tag in wanted.split(",")]
