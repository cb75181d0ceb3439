"""The bench's cases: each runs decodelab and transformers' ``model.generate`` on the same model, prompt and
settings, alternating which goes first, and records tokens/s per run, peak RSS and the load average.

A case function returns ``(ids, new_tokens)``: the generated ids (compared between the two sides for
deterministic settings) and how many tokens were generated (for tokens/s).
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Callable

import torch

from probes import PeakRSS, loadavg, summary

Side = Callable[[], tuple[list[list[int]], int]]


def decodelab_side(lm, prompt: str, **kw) -> Side:
    """``lm.generate(prompt, **kw)``: returns the new ids of every sequence and their total count."""

    def run():
        gen = lm.generate(prompt, **kw)
        ids = [s.new_ids for s in gen.sequences]
        return ids, sum(len(x) for x in ids)

    return run


def generate_side(model, tokenizer, prompt: str, seed: int | None = None, **kw) -> Side:
    """``model.generate`` with the attention mask and pad id set; returns the new ids of every row, cut after the
    first eos (what decodelab returns), and their total count. ``seed``: ``torch.manual_seed`` before sampling."""
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    width = enc.input_ids.shape[1]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])

    def run():
        if seed is not None:
            torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, **kw)
        rows = []
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            rows.append(row[:cut])
        return rows, sum(len(r) for r in rows)

    return run


def timed(fn: Side) -> dict:
    """One run of ``fn`` under :class:`PeakRSS`: seconds, tokens, tokens/s, peak RSS (MiB), load average."""
    load = loadavg()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as peak:
        start = time.perf_counter()
        ids, n = fn()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    out = {"seconds": seconds, "tokens": n, "tok_s": n / seconds, "peak_rss_mb": round(peak.peak, 1),
           "load": load, "ids": ids}
    if cuda:
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def side_by_side(sides: dict[str, Side], runs: int, warmup: int = 1,
                 probe: Callable[[], float] | None = None) -> dict:
    """Run every side ``warmup`` times, then ``runs`` rounds, rotating the order each round so that every side sees
    the same machine load. Returns per side: a tok/s :func:`summary`, the tok/s of each round (``per_round``),
    seconds, peak RSS, the loads seen, the ids of the last run; ``same_ids`` (True when every run of every side
    returned the same ids); with ``probe`` (a bandwidth probe returning GB/s, ``probes.GemvProbe``), also
    ``probe_gbs``: its value measured at the end of each round."""
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    results: dict[str, list[dict]] = {name: [] for name in names}
    probed: list[float] = []
    for r in range(runs):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            results[name].append(timed(sides[name]))
        if probe is not None:
            probed.append(probe())
    all_ids = [run["ids"] for name in names for run in results[name]]
    out = {"same_ids": all(ids == all_ids[0] for ids in all_ids)}
    if probe is not None:
        out["probe_gbs"] = probed
    for name in names:
        rs = results[name]
        out[name] = {
            "tok_s": summary([x["tok_s"] for x in rs]),
            "per_round": [x["tok_s"] for x in rs],
            "seconds": summary([x["seconds"] for x in rs]),
            "tokens": rs[-1]["tokens"],
            "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
            "peak_cuda_mb": max((x.get("peak_cuda_mb", 0.0) for x in rs), default=0.0) or None,
            "load": [x["load"][0] for x in rs],
            "ids": rs[-1]["ids"],
        }
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def round_fraction(res: dict, side: str, weight_bytes: int) -> float | None:
    """Median over rounds of ``tok/s x weight_bytes / probe bandwidth`` for ``side`` of a :func:`side_by_side`
    result run with a probe (``None`` without): the fraction of the bandwidth ceiling, each run set against the
    bandwidth measured in its own round."""
    gbs = res.get("probe_gbs")
    if not gbs:
        return None
    return statistics.median(t * weight_bytes / (g * 1e9) for t, g in zip(res[side]["per_round"], gbs))
