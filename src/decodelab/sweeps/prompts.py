"""Prompts for a sweep: JSONL, TXT or Parquet files, or the built-in set.

Formats (each prompt may carry a human ``reference`` continuation, used for the "reference" row and MAUVE):

- ``.jsonl``: one JSON object per line: ``{"prompt": str, "reference"?: str | null, "id"?: str | int,
  "lang"?: str}``; other keys are ignored; blank lines are skipped. The default id is the line number.
- ``.txt``: one prompt per non-blank line; a tab separates the prompt from its reference. Id: the line number.
- ``.parquet``: columns ``prompt`` (required), ``reference``, ``id``, ``lang`` (optional). Id: the row number.
- ``builtin`` (also ``builtin:en`` / ``builtin:pl``): 315 short story openings written for decodelab, 155 in English
  and 160 in Polish, each with a one-sentence human continuation as its reference (``sweep/data/prompts.jsonl``).

Errors are one line naming the file and, where there is one, the line (:class:`~decodelab.errors.InputError`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from importlib import resources

from ..config import unencodable_at
from ..errors import InputError

BUILTIN = "builtin"


@dataclass(frozen=True)
class Prompt:
    """One prompt: ``id`` (unique in the set), ``text``, an optional human ``reference`` continuation (text that
    follows the prompt directly, leading space included) and an optional language tag."""

    id: str
    text: str
    reference: str | None = None
    lang: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _check_text(where: str, field: str, value, *, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise InputError(f"{where}: {field!r} must be a non-empty string, got {str(value)[:40]!r}", param="prompts")
    at = unencodable_at(value)
    if at >= 0:
        raise InputError(f"{where}: {field!r} is not valid Unicode text (a lone surrogate at character {at})",
                         param="prompts")
    return value


def _prompt(where: str, default_id: str, obj: dict) -> Prompt:
    text = _check_text(where, "prompt", obj.get("prompt"), required=True)
    ref = _check_text(where, "reference", obj.get("reference"), required=False)
    pid = obj.get("id", default_id)
    if pid is None or isinstance(pid, bool) or not isinstance(pid, (str, int)) or str(pid) == "":
        raise InputError(f"{where}: 'id' must be a non-empty string or an integer, got {pid!r}", param="prompts")
    lang = obj.get("lang")
    return Prompt(id=str(pid), text=text, reference=ref or None, lang=str(lang) if lang is not None else None)


def _read_jsonl(path: str, lines) -> list[Prompt]:
    out = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})", param="prompts") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object with a 'prompt', got {type(obj).__name__}",
                             param="prompts")
        out.append(_prompt(where, str(no), obj))
    return out


def _read_txt(path: str, lines) -> list[Prompt]:
    out = []
    for no, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        text, _, ref = line.partition("\t")
        out.append(_prompt(f"{path} line {no}", str(no), {"prompt": text, "reference": ref or None}))
    return out


def _read_parquet(path: str) -> list[Prompt]:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise InputError("reading .parquet prompts needs pyarrow: pip install 'decodelab[sweep]'",
                         param="prompts") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise InputError(f"{path}: not a readable Parquet file ({' '.join(str(exc).split())[:120]})",
                         param="prompts") from None
    if "prompt" not in table.column_names:
        raise InputError(f"{path}: no 'prompt' column (columns: {', '.join(table.column_names)})", param="prompts")
    rows = table.select([c for c in ("prompt", "reference", "id", "lang") if c in table.column_names]).to_pylist()
    return [_prompt(f"{path} row {i}", str(i), row) for i, row in enumerate(rows, 1)]


def _builtin(spec: str) -> list[Prompt]:
    lang = spec.partition(":")[2] or None
    if lang not in (None, "en", "pl"):
        raise InputError(f"invalid prompts={spec!r}: expected builtin, builtin:en or builtin:pl", param="prompts")
    text = resources.files("decodelab.sweeps").joinpath("data/prompts.jsonl").read_text(encoding="utf-8")
    prompts = _read_jsonl("builtin", text.splitlines())
    return [p for p in prompts if lang is None or p.lang == lang]


def load_prompts(source: str | os.PathLike = BUILTIN, *, limit: int | None = None) -> list[Prompt]:
    """Read prompts from ``source`` (a path, or ``builtin[:en|:pl]``); keep the first ``limit`` when given.

    Raises:
        InputError: a missing or unreadable file, an unknown extension, a malformed line (named by its number), a
            prompt that is not a non-empty string, a duplicate id, a file with no prompts, or a bad ``limit``.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"invalid limit={limit!r}: expected an integer >= 1", param="limit")
    spec = os.fspath(source)
    if spec == BUILTIN or spec.startswith(BUILTIN + ":"):
        prompts = _builtin(spec)
    else:
        if not os.path.isfile(spec):
            raise InputError(f"prompts file {spec!r} does not exist", param="prompts")
        ext = os.path.splitext(spec)[1].lower()
        if ext == ".parquet":
            prompts = _read_parquet(spec)
        elif ext in (".jsonl", ".txt"):
            try:
                with open(spec, encoding="utf-8") as fh:
                    lines = fh.read().splitlines()
            except UnicodeDecodeError as exc:
                raise InputError(f"{spec}: not UTF-8 text (byte {exc.start})", param="prompts") from None
            prompts = _read_jsonl(spec, lines) if ext == ".jsonl" else _read_txt(spec, lines)
        else:
            raise InputError(f"prompts file {spec!r}: unknown extension {ext or '(none)'!r}; expected .jsonl, .txt "
                             "or .parquet", param="prompts")
    if not prompts:
        raise InputError(f"prompts file {spec!r} has no prompts", param="prompts")
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise InputError(f"{spec}: duplicate prompt id {p.id!r}", param="prompts")
        seen.add(p.id)
    return prompts[:limit] if limit is not None else prompts


def fingerprint(prompts: list[Prompt]) -> str:
    """SHA-256 (hex, first 16 digits) of the prompts' ids, texts and references: a resumed sweep must see the same."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.id, p.text, p.reference], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]
