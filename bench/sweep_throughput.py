"""``make bench-sweep``: how long a ``decodelab sweep`` takes locally and on a local Ray cluster (1 and 2 actors).

The same sweep (the ``degeneration`` grid: greedy, beam 5, beam 5 + repetition penalty 2.0, pure sampling, T=0.7,
top-k 40, top-p 0.95, min-p 0.1; ``--limit`` built-in English prompts; ``--tokens`` new tokens; the embedded model
unless ``--model``) runs as one ``decodelab sweep`` process per case, each into a fresh directory, cases interleaved
round by round (``--rounds``): local, Ray with 1 actor, Ray with 2 actors. A case's time is the whole command's wall
time (model loading, Ray start-up, generation, metrics, report), so Ray's overhead includes its start-up. After each
round the three ``generations.jsonl`` files are compared: deterministic and seeded strategies must give the same
texts everywhere.

Ray's overhead over local = ray time / local time - 1 (the issue's target: <= 25 % for one actor).
With two or more ``--limit`` sizes, each case's time is fitted as ``fixed + per_prompt x prompts`` (least squares;
fixed: loading, Ray start-up, report) and extrapolated to 200 prompts, the issue's size: an estimate, printed as such.

The CPU model is printed and stored with the results in ``bench/results/sweep-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from decodelab.fastpath.kernel_choice import cpu_model  # noqa: E402

CASES = {"local": [], "ray1": ["--ray", "--ray-actors", "1"], "ray2": ["--ray", "--ray-actors", "2"]}


def _texts(out: pathlib.Path) -> dict[tuple, str]:
    """``(strategy, seed, prompt id, sample) -> text`` of a sweep's ``generations.jsonl``."""
    rows = {}
    with open(out / "generations.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows[(r["strategy"], r.get("seed"), r["prompt_id"], r.get("sample", 0))] = r["text"]
    return rows


def run_case(name: str, limit: int, args: argparse.Namespace, where: pathlib.Path) -> float:
    """Run one ``decodelab sweep`` of ``limit`` prompts into ``where``; return its wall time in seconds."""
    cmd = [sys.executable, "-m", "decodelab", "sweep", "builtin:en", "--limit", str(limit), "--max-new-tokens",
           str(args.tokens), "-o", str(where), "--no-progress", *CASES[name]]
    if args.model:
        cmd += ["--model", args.model]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return wall


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``(fixed_s, per_prompt_s)`` of ``time = fixed + per_prompt x prompts``."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", default="6,18", help="built-in English prompt counts, comma-separated (200 is the "
                                                     "issue's size)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cases", default="local,ray1,ray2")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    limits = [int(x) for x in args.limit.split(",")]
    cpu = cpu_model()
    print(f"CPU: {cpu}, {os.cpu_count()} cores; sweep: degeneration grid x {limits} prompts x {args.tokens} "
          "tokens", flush=True)
    cases = args.cases.split(",")
    times: dict[str, dict[int, list[float]]] = {c: {n: [] for n in limits} for c in cases}
    differing: list[int] = []
    with tempfile.TemporaryDirectory(prefix="decodelab-sweep-bench-") as tmp:
        for r in range(args.rounds):
            for n in limits:
                outs = {}
                for c in cases:
                    outs[c] = pathlib.Path(tmp) / f"{c}-{n}-{r}"
                    times[c][n].append(run_case(c, n, args, outs[c]))
                    print(f"round {r}, {n} prompts: {c:6s} {times[c][n][-1]:7.1f} s", flush=True)
                ref = _texts(outs[cases[0]])
                differing.append(sum(1 for c in cases[1:] for k, v in _texts(outs[c]).items() if ref.get(k) != v))
    med = {c: {n: sorted(t)[len(t) // 2] for n, t in by_n.items()} for c, by_n in times.items()}
    result = {"cpu": cpu, "cores": os.cpu_count(), "limits": limits, "tokens": args.tokens, "rounds": args.rounds,
              "times_s": times, "median_s": med, "differing_rows": differing}
    if "local" in med:
        result["ray_overhead"] = {c: {n: med[c][n] / med["local"][n] - 1 for n in limits} for c in cases
                                  if c != "local"}
    if len(limits) > 1:
        fits = {c: fit(sorted(med[c].items())) for c in cases}
        result["fit_fixed_s_per_prompt_s"] = fits
        result["estimated_200_prompts_s"] = {c: a + b * 200 for c, (a, b) in fits.items()}
        if "local" in fits:
            base = fits["local"][0] + fits["local"][1] * 200
            result["estimated_ray_overhead_200"] = {c: (a + b * 200) / base - 1 for c, (a, b) in fits.items()
                                                    if c != "local"}
    print(json.dumps(result, indent=1))
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = ROOT / "bench" / "results" / f"sweep-{stamp}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
