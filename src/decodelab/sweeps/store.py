"""The sweep's output directory: what is written, how it survives a kill, and how a sweep resumes.

Layout::

    OUT/sweep.json          the manifest: model, prompts (source, count, fingerprint), strategies, options
    OUT/generations.jsonl   one JSON object per generated (or reference) row, appended as rows finish
    OUT/metrics.csv         one line per strategy (written at the end, atomically)
    OUT/metrics.json        the same, with the metric definitions and the run's facts
    OUT/report.html         self-contained report: the table, the plots (embedded PNG), sample generations
    OUT/plots/*.png         the same plots as files

Atomicity: every whole file is written to a temporary file in ``OUT`` and moved over the old one with
``os.replace`` (atomic on POSIX). ``generations.jsonl`` is append-only: each batch of rows is one ``write`` of
complete lines, flushed and ``fsync``-ed before the rows count as done. A kill can only leave a torn *last* line;
:meth:`Store.open` cuts it off (that row is simply generated again), so a resumed sweep neither redoes a finished
row nor loses one.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable

from ..errors import InputError

MANIFEST = "sweep.json"
ROWS = "generations.jsonl"
IDENTITY_KEYS = ("model", "judge_model", "prompts", "strategies", "reference_rows")
"""Manifest entries that must match for a sweep to resume in an existing directory."""


def row_key(row: dict[str, Any]) -> tuple:
    """The identity of a row: (strategy, seed, prompt id, sample index)."""
    return (row["strategy"], row.get("seed"), row["prompt_id"], row.get("sample", 0))


def atomic_write(path: str, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Store:
    """An open output directory (see the module docstring). Build with :meth:`open`."""

    def __init__(self, out: str, manifest: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        self.out = out
        self.manifest = manifest
        self.rows = rows  # every complete row, in file order
        self.done = {row_key(r) for r in rows}

    @classmethod
    def check(cls, out: str | os.PathLike, manifest: dict[str, Any], *, overwrite: bool = False) -> int:
        """Check that ``out`` can hold this sweep, writing nothing: a new or empty directory, or one holding the
        same sweep (resumed). Returns the number of rows already done (0 for a new directory).

        Raises:
            InputError: ``out`` is a file, a non-empty directory that is not a sweep, or holds a different sweep
                (unless ``overwrite``).
        """
        out = os.fspath(out)
        if os.path.exists(out) and not os.path.isdir(out):
            raise InputError(f"--out {out!r} is a file, not a directory", param="out")
        if not os.path.isdir(out) or not os.listdir(out):
            return 0
        path = os.path.join(out, MANIFEST)
        if not os.path.isfile(path):
            raise InputError(f"--out {out!r} is a non-empty directory without {MANIFEST}; choose a new or empty "
                             "directory", param="out")
        if overwrite:
            return 0
        try:
            with open(path, encoding="utf-8") as fh:
                old = json.load(fh)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: unreadable manifest ({exc})", param="out") from None
        for key in IDENTITY_KEYS:
            if old.get(key) != manifest.get(key):
                raise InputError(f"--out {out!r} holds a different sweep ({key} differs); use another --out, or "
                                 "--overwrite to start it again", param="out")
        return len(_read_rows(os.path.join(out, ROWS), repair=False))

    @classmethod
    def open(cls, out: str | os.PathLike, manifest: dict[str, Any], *, overwrite: bool = False) -> "Store":
        """Create or reopen ``out`` (after :meth:`check`): write the manifest, read the finished rows, cut a torn
        last line. ``overwrite`` removes the old rows first."""
        out = os.fspath(out)
        cls.check(out, manifest, overwrite=overwrite)
        os.makedirs(out, exist_ok=True)
        rows_path = os.path.join(out, ROWS)
        if overwrite and os.path.exists(rows_path):
            os.unlink(rows_path)
        rows = _read_rows(rows_path, repair=True)
        atomic_write(os.path.join(out, MANIFEST), json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        return cls(out, manifest, rows)

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def append(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append ``rows`` (skipping any already done) as complete lines in one write, flushed and fsync-ed."""
        fresh = []
        for row in rows:
            key = row_key(row)
            if key not in self.done:
                self.done.add(key)
                fresh.append(row)
        if not fresh:
            return 0
        data = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in fresh)
        with open(self.path(ROWS), "ab") as fh:
            fh.write(data.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.extend(fresh)
        return len(fresh)


def _read_rows(path: str, *, repair: bool) -> list[dict[str, Any]]:
    """The complete rows of ``path``. A last line without its newline or not valid JSON is a torn write: cut off
    (``repair``) or ignored. A bad line elsewhere is corruption.

    Raises:
        InputError: a malformed line before the last one.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as fh:
        data = fh.read()
    rows, good_end, pos = [], 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        line = data[pos:] if nl < 0 else data[pos:nl]
        end = len(data) if nl < 0 else nl + 1
        try:
            row = json.loads(line) if nl >= 0 else None
        except ValueError:
            row = None
        if row is None or not isinstance(row, dict):
            if end < len(data):
                raise InputError(f"{path}: line {len(rows) + 1} is not a JSON row; the file is damaged", param="out")
            break  # a torn last line
        rows.append(row)
        good_end = pos = end
    if repair and good_end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    return rows
