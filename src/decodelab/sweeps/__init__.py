"""Decoding experiments at scale: a grid of strategies over a prompt set, the degeneration metrics of Holtzman et al.
(2019), locally through the batched engine or on a Ray cluster (``decodelab sweep``, ``decodelab.sweep(...)``).

Modules: ``prompts`` (JSONL / TXT / Parquet / built-in prompts), ``strategies`` (the grid, validated by
``GenerationConfig``), ``worker`` (one model replica: tasks -> rows), ``ray_run`` (Ray Data, one actor per
replica), ``store`` (the output directory: atomic writes, resume), ``metrics`` (definitions and sources),
``report`` (CSV / JSON / HTML / plots / rich table), ``run`` (:func:`sweep`).
"""

from __future__ import annotations

from .prompts import Prompt, load_prompts
from .run import SweepResult, sweep
from .strategies import GRIDS, PRESETS, Strategy, build_grid

__all__ = ["sweep", "SweepResult", "Prompt", "load_prompts", "Strategy", "build_grid", "PRESETS", "GRIDS"]
