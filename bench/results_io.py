"""Where the bench scripts keep what they measured: ``bench/results/<kind>-<YYYYmmdd-HHMMSS>.json``."""

from __future__ import annotations

import datetime as dt
import json
import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def write_results(kind: str, data: dict) -> pathlib.Path:
    """Write ``data`` (with the CPU model in it, as every bench stores) as indented JSON to a new time-stamped file
    ``results/<kind>-<stamp>.json``; returns its path."""
    out = RESULTS / f"{kind}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    return out
