"""``make bench-step``: the engine's batched decode step alone, by number of requests in it (no server, no search).

What continuous batching can gain at most on this machine: ``Engine.step_many`` over R one-row requests (greedy
streams), R = 1, 2, 4, 8, 16, 32, each request with its own prompt (the mixed-length prompts of ``bench/load.py``,
prefilled first with room for ``--steps`` more tokens; batching on, as in a server, so off the exact path their caches
are slots of one pool: :mod:`decodelab.fastpath.slots`). Every row count is timed in every round, rounds interleave
the kernel modes (``--kernels``, default ``exact,fast``), and the median over rounds counts. Reported per mode and
row count: milliseconds per step, tokens per second (R / step time), and the ratio to the one-row step of the same
mode (the ceiling of "batched / serial" in ``bench/load.py``, which adds prefills, the requests' own search steps,
HTTP and the clients on the same cores).

The CPU model is printed and stored with the results in ``bench/results/step-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import decodelab  # noqa: E402
from decodelab.engine import Engine  # noqa: E402
from decodelab.fastpath.kernel_choice import cpu_model  # noqa: E402
from load import prompts  # noqa: E402
from results_io import write_results  # noqa: E402


def prefilled(lm: decodelab.LM, texts: list[str], room: int) -> list:
    """One decode state per prompt, prefilled alone, with ``room`` positions left for decode steps."""
    states = []
    for text in texts:
        ids = torch.tensor([lm.tokenize(text).ids])
        _, state = lm.engine.prefill(ids, torch.ones_like(ids), room)
        states.append(state)
    return states


def time_steps(engine: Engine, states: list, steps: int) -> float:
    """Seconds per ``step_many`` over ``states`` (one token each), the mean of ``steps`` steps after one warm-up."""
    tokens = [torch.tensor([5]) for _ in states]
    engine.step_many(states, tokens)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step_many(states, tokens)
    return (time.perf_counter() - start) / steps


MODES = {"exact": dict(kernels="exact"), "fast": dict(kernels="fast"),
         "invariant": dict(kernels="fast", batch_invariant=True)}
"""``--kernels`` modes -> engine options."""


def parse_rows(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``.

    Raises:
        ValueError: not comma-separated integers >= 1.
    """
    rows = [int(r) for r in text.split(",")]
    if not rows or min(rows) < 1:
        raise ValueError(text)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--kernels", default="exact,fast", help="comma-separated kernel modes: exact, fast, invariant "
                    "(kernels='fast' with batch_invariant=True; default exact,fast)")
    ap.add_argument("--rows", default="1,2,4,8,16,32", help="requests per step (default 1,2,4,8,16,32)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per row count and round (default 8)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    try:
        counts = parse_rows(args.rows)
    except ValueError:
        print(f"error: invalid --rows={args.rows!r}: expected comma-separated integers >= 1", file=sys.stderr)
        return 2
    modes = args.kernels.split(",")
    if args.steps < 1 or args.rounds < 1 or any(m not in MODES for m in modes):
        print("error: --steps and --rounds must be >= 1 and --kernels a list of exact / fast / invariant",
              file=sys.stderr)
        return 2
    cpu = cpu_model()
    print(f"CPU: {cpu}; torch threads {torch.get_num_threads()}; kernels {modes}; rows {counts}")
    lms = {mode: decodelab.load(args.model, **MODES[mode]) for mode in modes}
    for lm in lms.values():  # as a server's step: batching on, driven from this thread (one-row requests in slots
        lm.engine.start_batching(max(counts), thread=False)  # of one pool where the mode allows)
    room = (args.steps + 1) * len(counts) + 1  # states are prefilled each round; the first is stepped for every count
    texts = prompts(max(counts))
    ms: dict[str, dict[int, list[float]]] = {mode: {n: [] for n in counts} for mode in modes}
    with torch.inference_mode():
        for r in range(args.rounds):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                lm = lms[mode]
                states = prefilled(lm, texts, room)
                for n in counts:
                    ms[mode][n].append(1000 * time_steps(lm.engine, states[:n], args.steps))
                del states  # frees their slots for the next round
    rows = []
    for mode in modes:
        one = statistics.median(ms[mode][counts[0]]) if counts[0] == 1 else None
        for n in counts:
            med = statistics.median(ms[mode][n])
            row = {"kernels": mode, "rows": n, "ms_per_step": med, "ms_rounds": ms[mode][n],
                   "tokens_per_s": n * 1000 / med}
            if one is not None:
                row["vs_one_row"] = row["tokens_per_s"] / (1000 / one)
            rows.append(row)
            ratio = f"  {row['vs_one_row']:.2f}x one row" if one is not None else ""
            print(f"{mode:9s} rows={n:3d} {med:7.1f} ms/step {row['tokens_per_s']:7.1f} tok/s{ratio}")
    out = write_results("step", {"cpu": cpu, "threads": torch.get_num_threads(), "args": vars(args), "rows": rows})
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
