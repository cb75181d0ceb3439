"""The strategy grid of a sweep: named sets of transformers ``GenerationConfig`` keywords, with seeds.

Every setting is validated by :class:`decodelab.config.GenerationConfig` (the one validator); this module only parses
and names. Three ways to give strategies:

- presets by name (``--strategy greedy``): see :data:`PRESETS`; ``--strategy degeneration`` (the default grid) is
  the eight strategies of the README's experiment;
- inline specs: ``--strategy 'NAME:key=value,key=value'`` (values read as JSON: ``true``, ``0.95``, ``[0,1,2]``,
  anything else a string); without ``NAME:`` the spec itself is the name;
- a TOML or JSON file (``--strategies grid.toml``)::

      [defaults]              # applied to every strategy (a strategy's own value wins)
      max_new_tokens = 64

      [[strategy]]
      name = "top_p_0.95"
      do_sample = true
      top_p = 0.95
      top_k = 0
      seeds = [0, 1, 2]       # sampling strategies run once per seed (default [0]); others run once

  JSON: ``{"defaults": {...}, "strategy": [{...}, ...]}`` (``"strategies"`` also accepted) or a bare list. A strategy
  object that holds only the ``name`` of a preset is that preset.

Seeds: each sampling request of a run is seeded with the run's seed (``GenerationConfig.seed``: an explicit
``torch.Generator`` per row), so every row can be reproduced with ``decodelab generate PROMPT --seed S ...`` and is
the same locally and on Ray.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import GenerationConfig
from ..errors import ConfigError, DecodelabError, InputError

REFERENCE = "reference"
"""The name of the pseudo-strategy whose rows are the human references (reserved)."""

PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {},
    "beam5": {"num_beams": 5},
    "beam5_rep2": {"num_beams": 5, "repetition_penalty": 2.0},
    "pure": {"do_sample": True, "top_k": 0},
    "temp0.7": {"do_sample": True, "temperature": 0.7, "top_k": 0},
    "topk40": {"do_sample": True, "top_k": 40},
    "topp0.95": {"do_sample": True, "top_p": 0.95, "top_k": 0},
    "minp0.1": {"do_sample": True, "min_p": 0.1, "top_k": 0},
    "typical0.95": {"do_sample": True, "typical_p": 0.95, "top_k": 0},
    "rep1.2": {"repetition_penalty": 1.2},
    "norepeat3": {"no_repeat_ngram_size": 3},
}
"""Named strategies. Sampling presets set ``top_k=0`` (transformers' default top-k of 50 would otherwise also
apply), so that "pure" is pure ancestral sampling and top-p / min-p / temperature act alone."""

GRIDS: dict[str, list[str]] = {
    "degeneration": ["greedy", "beam5", "beam5_rep2", "pure", "temp0.7", "topk40", "topp0.95", "minp0.1"],
}
"""Named groups of presets; ``degeneration`` is the default grid."""

DEFAULT_GRID = "degeneration"
_NAME = re.compile(r"^[A-Za-z0-9_.,+=-]{1,80}$")


@dataclass(frozen=True)
class Strategy:
    """One strategy: a ``name``, its ``settings`` (GenerationConfig keywords, defaults merged in, no seed) and its
    ``seeds`` (``(None,)`` for a deterministic strategy)."""

    name: str
    settings: dict = field(default_factory=dict)
    seeds: tuple = (None,)

    @property
    def sampling(self) -> bool:
        return self.seeds != (None,)

    def request(self, seed: int | None) -> dict[str, Any]:
        """The GenerationConfig keywords of one run (``seed`` added for sampling strategies)."""
        return {**self.settings, **({"seed": seed} if seed is not None else {})}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings, "seeds": list(self.seeds)}


def _strategy(name: Any, settings: dict[str, Any], defaults: dict[str, Any], where: str) -> Strategy:
    """Validate one strategy through GenerationConfig; the error names the strategy."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: invalid strategy name {name!r}: use 1-80 letters, digits and _ . , + = -",
                          param="strategy")
    if name == REFERENCE:
        raise ConfigError(f"{where}: the strategy name {REFERENCE!r} is reserved for the human references",
                          param="strategy")
    settings = dict(settings)
    seeds = settings.pop("seeds", None)
    if "seed" in settings:
        if seeds is not None:
            raise ConfigError(f"strategy {name!r}: give seed or seeds, not both", param="seeds")
        seeds = [settings.pop("seed")]
    merged = {**defaults, **settings}
    try:
        cfg = GenerationConfig.from_kwargs(**merged)
        if seeds is not None:
            if isinstance(seeds, int) and not isinstance(seeds, bool):
                seeds = [seeds]
            if not isinstance(seeds, (list, tuple)) or not seeds:
                raise ConfigError(f"invalid seeds={seeds!r}: expected a non-empty list of integers", param="seeds")
            for s in seeds:
                GenerationConfig.from_kwargs(seed=s)  # the seed's own rules (an integer in [0, 2**63))
            if len(set(seeds)) != len(seeds):
                raise ConfigError(f"invalid seeds={seeds!r}: repeated seed", param="seeds")
    except ConfigError as exc:
        raise ConfigError(f"strategy {name!r}: {exc}", param=exc.param) from None
    if cfg.trace:
        merged["trace"] = True
    if not cfg.do_sample:
        run_seeds: tuple = (None,)  # deterministic: one run, whatever seeds were given
    else:
        run_seeds = tuple(int(s) for s in seeds) if seeds is not None else (0,)
    return Strategy(name=name, settings=merged, seeds=run_seeds)


def _scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_spec(spec: str, defaults: dict[str, Any] | None = None) -> list[Strategy]:
    """Strategies of one ``--strategy`` value: a preset name, a grid name, or ``[NAME:]key=value,...``.

    Raises:
        ConfigError: an unknown preset, a ``key=value`` part without ``=``, or a setting GenerationConfig refuses.
    """
    defaults = defaults or {}
    spec = spec.strip()
    if spec in GRIDS:
        return [_strategy(n, PRESETS[n], defaults, f"--strategy {spec}") for n in GRIDS[spec]]
    if spec in PRESETS:
        return [_strategy(spec, PRESETS[spec], defaults, f"--strategy {spec}")]
    name, sep, body = spec.partition(":")
    if not sep or "=" in name:
        name, body = spec, spec
    if "=" not in body:
        known = ", ".join([*GRIDS, *PRESETS])
        raise ConfigError(f"unknown strategy {spec!r}: expected a preset ({known}) or NAME:key=value,...",
                          param="strategy")
    settings: dict[str, Any] = {}
    for part in re.split(r",(?![^\[]*\])", body):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"strategy {name!r}: expected key=value, got {part!r}", param="strategy")
        settings[key.strip()] = _scalar(value.strip())
    return [_strategy(name, settings, defaults, f"--strategy {spec}")]


def read_spec_file(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(defaults, strategy objects)`` of a TOML (``.toml``) or JSON (``.json``) strategy file.

    Raises:
        InputError: a missing file, an unknown extension or a file that does not parse.
        ConfigError: an unknown top-level key, or strategies that are not objects.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"strategies file {path!r} does not exist", param="strategies")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            import tomllib

            with open(path, "rb") as fh:
                data: Any = tomllib.load(fh)
        elif ext == ".json":
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        else:
            raise InputError(f"strategies file {path!r}: unknown extension {ext or '(none)'!r}; expected .toml or "
                             ".json", param="strategies")
    except DecodelabError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise InputError(f"strategies file {path!r}: {' '.join(str(exc).split())}", param="strategies") from None
    if isinstance(data, list):
        data = {"strategy": data}
    if not isinstance(data, dict):
        raise ConfigError(f"strategies file {path!r}: expected a table/object or a list", param="strategies")
    unknown = sorted(set(data) - {"defaults", "strategy", "strategies"})
    if unknown:
        raise ConfigError(f"strategies file {path!r}: unknown key {unknown[0]!r} (expected defaults, strategy)",
                          param="strategies")
    defaults = data.get("defaults", {})
    items = data.get("strategy", data.get("strategies", []))
    if not isinstance(defaults, dict) or not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"strategies file {path!r}: 'defaults' must be a table and 'strategy' a list of tables",
                          param="strategies")
    return defaults, items


def build_grid(specs: list[str] | None = None, file: str | os.PathLike | None = None,
               defaults: dict[str, Any] | None = None) -> list[Strategy]:
    """The strategies of a sweep: those of ``file`` then those of ``specs`` (``--strategy`` values); the default grid
    when neither gives any. ``defaults`` (e.g. ``max_new_tokens`` from the command line) override the file's.

    Raises:
        ConfigError: a bad spec or setting (the message names the strategy), or two strategies with one name.
        InputError: an unreadable strategies file.
    """
    merged_defaults: dict[str, Any] = {}
    out: list[Strategy] = []
    if file is not None:
        file_defaults, items = read_spec_file(file)
        merged_defaults = {**file_defaults, **(defaults or {})}
        for i, item in enumerate(items):
            item = dict(item)
            name = item.pop("name", None)
            if name is None:
                name = ",".join(f"{k}={json.dumps(v)}" for k, v in item.items()) or f"strategy{i + 1}"
            if not item and name in PRESETS:
                item = dict(PRESETS[name])
            out.append(_strategy(name, item, merged_defaults, f"{os.fspath(file)} strategy {i + 1}"))
    else:
        merged_defaults = dict(defaults or {})
    for spec in specs or []:
        out.extend(parse_spec(spec, merged_defaults))
    if not out:
        out = parse_spec(DEFAULT_GRID, merged_defaults)
    names = [s.name for s in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"two strategies are named {dup!r}; give each a name (NAME:key=value)", param="strategy")
    return out
