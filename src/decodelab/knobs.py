"""Knob metadata: what each :class:`~decodelab.config.GenerationConfig` field is, and where it is exposed.

Every field of ``GenerationConfig`` is declared with :func:`knob`, which stores a :class:`Knob` in the field's
``metadata["knob"]``. That one declaration is the source of truth for

- validation: ``GenerationConfig.from_kwargs`` checks ``int`` / ``float`` / ``bool`` fields against the bounds written
  here (``lo`` / ``hi``, open or closed), so a bound is written once;
- the CLI: ``decodelab generate`` builds one option per knob from ``cli`` (:mod:`decodelab.cli`);
- the OpenAI routes: every ``openai="extension"`` knob becomes a field of the request models with the same name and
  ``doc`` as its description, and every other OpenAI name maps back to the knob (:mod:`decodelab.server.schemas`,
  :mod:`decodelab.server.routes_openai`);
- the inspection API: ``POST /api/generate`` takes every knob with ``api=True``
  (:mod:`decodelab.server.routes_inspect`);
- the playground: ``GET /api/knobs`` serves :func:`knob_table`, from which the page builds or bounds its controls.

A surface that leaves a knob out says why, in ``*_why`` (tests/test_surfaces.py walks every field and fails when a
knob is neither exposed nor excused). Style after vLLM's ``SamplingParams`` (a doc line per field) and simonw/llm's
``Options`` (one pydantic description per option, shown in help).

This module knows nothing of the config class itself (``config.py`` imports it, not the reverse).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["int", "float", "bool", "ids", "id_lists", "strings", "early_stopping", "text", "json_schema",
               "sequence_bias", "logit_bias"]
"""The JSON shape of a knob's value: ``ids`` a token id or a list of them; ``id_lists`` a list of token-id lists;
``strings`` a string or a list of strings; ``early_stopping`` true / false / "never"; ``text`` a string;
``json_schema`` a JSON Schema (object, boolean or its JSON text); ``sequence_bias`` ``[[ids], bias]`` pairs;
``logit_bias`` ``{"token id": bias}``."""

Control = Literal["number", "checkbox", "select", "text", "json", "strategy", "constraint"]
"""A playground control: the first five are built from the metadata by ``app.js`` (when the page has no
hand-made control of that name); ``strategy`` is the greedy / sampling / beam select (``do_sample``, ``num_beams``);
``constraint`` is the constraint kind select and its text box (``json_schema``, ``regex``, ``grammar``)."""


@dataclass(frozen=True)
class Knob:
    """One generation knob's metadata (the default lives on the dataclass field itself).

    Bounds: a value ``x`` must satisfy ``lo <= x`` (``lo < x`` when ``lo_open``) and ``x <= hi`` (``x < hi`` when
    ``hi_open``); ``None`` means unbounded. For ``logit_bias`` the bounds apply to each bias value.

    Surfaces: ``cli`` is the ``decodelab generate`` flag (``"auto"``: ``--`` + the name with dashes; ``cli_input``:
    ``value`` as typed, ``file`` a file whose text is the value, ``json`` JSON text); ``openai`` is ``"extension"``
    (accepted under the knob's own name), the OpenAI field that carries it (``max_tokens``, ``n``, ``stop``, ...),
    or ``None``; ``api`` whether ``/api/generate`` accepts it; ``playground`` the page's control. ``None`` / ``False``
    must come with a reason in the matching ``*_why``.
    """

    doc: str
    kind: Kind
    group: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    cli: str | None = "auto"
    cli_input: Literal["value", "file", "json"] = "value"
    cli_why: str = ""
    openai: str | None = "extension"
    openai_why: str = ""
    api: bool = True
    api_why: str = ""
    playground: Control | None = None
    playground_why: str = ""

    def __post_init__(self) -> None:
        for surface, why in (("cli", self.cli_why), ("openai", self.openai_why), ("playground", self.playground_why)):
            if getattr(self, surface) is None and not why:
                raise ValueError(f"a knob without {surface} exposure needs {surface}_why: {self.doc!r}")
        if not self.api and not self.api_why:
            raise ValueError(f"a knob not on /api/generate needs api_why: {self.doc!r}")

    def bounds_text(self) -> str:
        """The bounds in words, e.g. ``in (0, 1]``, ``>= 0``; empty when unbounded."""
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return f"in {'(' if self.lo_open else '['}{_num(lo)}, {_num(hi)}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(lo)}"
        if hi is not None:
            return f"{'<' if self.hi_open else '<='} {_num(hi)}"
        return ""

    def json_bounds(self) -> dict[str, float]:
        """The bounds as JSON Schema keywords (``minimum`` / ``exclusiveMinimum`` / ...), for numeric knobs only."""
        if self.kind not in ("int", "float"):
            return {}
        out: dict[str, float] = {}
        if self.lo is not None:
            out["exclusiveMinimum" if self.lo_open else "minimum"] = self.lo
        if self.hi is not None:
            out["exclusiveMaximum" if self.hi_open else "maximum"] = self.hi
        return out


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def knob(default: Any, doc: str, kind: Kind, group: str, **meta: Any) -> Any:
    """A dataclass field with ``default`` whose ``metadata["knob"]`` is ``Knob(doc, kind, group, **meta)``."""
    return dataclasses.field(default=default, metadata={"knob": Knob(doc, kind, group, **meta)})


def knobs_of(cls: type) -> dict[str, Knob]:
    """``{field name: Knob}`` of a dataclass declared with :func:`knob`, in field order, with ``cli="auto"``
    resolved to ``--name-with-dashes``."""
    out = {}
    for f in dataclasses.fields(cls):
        k = f.metadata["knob"]
        if k.cli == "auto":
            k = dataclasses.replace(k, cli="--" + f.name.replace("_", "-"))
        out[f.name] = k
    return out


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls``."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default


def knob_table(cls: type) -> list[dict[str, Any]]:
    """Every knob as a JSON-ready dict (``GET /api/knobs``): name, doc, kind, group, default (tuples as lists),
    lo / hi / lo_open / hi_open (infinite bounds as ``None``), bounds (in words), cli, openai, api, playground and
    the reasons of the surfaces that leave it out."""

    def plain(x: Any) -> Any:
        if isinstance(x, tuple):
            return [plain(i) for i in x]
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x

    rows = []
    for name, k in knobs_of(cls).items():
        row = {"name": name, "default": plain(default_of(cls, name)), "bounds": k.bounds_text()}
        row.update({key: plain(value) for key, value in dataclasses.asdict(k).items()})
        rows.append(row)
    return rows
