"""Matrix-vector (and few-row matrix) kernels on the weights of one decode step, without the model around them.

Streams a set of random matrices shaped like SmolLM2-135M's decoder (30 layers of q/k/v/o/gate/up/down plus the
49152 x 576 output layer, ~538 MB in float32: far larger than the caches) through each way decodelab can multiply
by them, interleaving the variants round by round so that all see the same machine load. Reports milliseconds per
"step" (one pass over all matrices with ``--rows`` rows: 1 is one request's decode step, 16 a batched step of 16
requests), the tokens/s that would allow if nothing else cost time, and GFLOP/s (2 x rows x weights per pass).
With more than one row only the float32 products that can take them run (``F.linear`` and the ``kernels="fast"``
candidates: oneDNN's prepacked GEMM, weight-first ``mm``, decodelab's ``panels`` where it is built here).

Run alone: ``python bench/matvec_kernels.py [--threads 2] [--rounds 5] [--rows 1]``; ``bench/run.py`` includes it
(case ``kernels``, one row).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def _variants(layers: int, rows: int = 1):
    from decodelab.fastpath import kernel_choice
    from decodelab.fastpath.decoder import can_pack
    from decodelab.fastpath.projections import Dense, MeasuredDense, PackedDense
    from decodelab.quantize import Int4Linear, Int8Linear

    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(n, k, generator=gen) * 0.05 for _ in range(layers) for n, k in SHAPES]
    head = torch.randn(49152, 576, generator=gen) * 0.05
    w16 = [w.bfloat16() for w in mats]
    h16 = head.bfloat16()
    dense16 = PackedDense if can_pack(torch.bfloat16, torch.device("cpu")) else Dense
    from decodelab.fastpath.projections import half_linear

    class Halves:
        def __init__(self, weight):
            self.dense = Dense(weight)
            self.weight = weight

        def __call__(self, x):
            return half_linear(self.dense, x.reshape(1, 1, -1))

    def measured(weight, name):  # the fast path's projection with ``name`` chosen at every row count
        return MeasuredDense(weight, None, {str(b): name for b in kernel_choice.BUCKETS})

    fast = [name for name in ("weight_halves", "weight_first", "onednn", "panels")
            if all(kernel_choice.applies(name, rows, w) for w in [*mats, head])]
    candidates = {f"float32 {name} (fast candidate)": ([measured(w, name) for w in mats] + [measured(head, name)],
                                                       torch.float32) for name in fast}
    if rows > 1:
        return {"float32 F.linear": ([Dense(w) for w in mats] + [Dense(head)], torch.float32), **candidates}
    out = {
        "float32 F.linear": ([Dense(w) for w in mats] + [Dense(head)], torch.float32),
        "float32 bmm halves": ([Halves(w) for w in mats] + [Halves(head)], torch.float32),
        **candidates,
        "bfloat16 F.linear": ([Dense(w) for w in w16] + [Dense(h16)], torch.bfloat16),
        "bfloat16 oneDNN prepacked": ([dense16(w) for w in w16] + [dense16(h16)], torch.bfloat16),
        "int8, bfloat16 act.": ([Int8Linear.from_weight(w) for w in w16] + [dense16(h16)], torch.bfloat16),
        "int4, bfloat16 act.": ([Int4Linear.from_weight(w) for w in w16] + [dense16(h16)], torch.bfloat16),
        "int4 + int8 head, bf16 act.": ([Int4Linear.from_weight(w) for w in w16] + [Int8Linear.from_weight(h16)],
                                        torch.bfloat16),
        "int8, float32 act.": ([Int8Linear.from_weight(w) for w in mats] + [Dense(head)], torch.float32),
        "int4, float32 act.": ([Int4Linear.from_weight(w) for w in mats] + [Dense(head)], torch.float32),
    }
    return out


@torch.inference_mode()
def run(rounds: int = 5, layers: int = 30, rows: int = 1) -> list[dict]:
    """Median / min milliseconds per pass for each kernel variant over ``rows`` rows, the tokens/s bound
    (``rows`` / median seconds) and GFLOP/s at the median. Returns one dict per variant."""
    variants = _variants(layers, rows)
    flop = 2 * rows * (layers * sum(n * k for n, k in SHAPES) + 49152 * 576)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds + 1):
        for name, (fns, dtype) in variants.items():
            x = {576: torch.randn(rows, 576).to(dtype), 1536: torch.randn(rows, 1536).to(dtype)}
            start = time.perf_counter()
            for fn in fns:
                w = getattr(fn, "weight", None)
                k = w.shape[1] if w is not None else (fn.q.shape[1] if hasattr(fn, "q") else fn.packed.shape[1] * 2)
                fn(x[k])
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    out = []
    for name, ts in times.items():
        med = statistics.median(ts)
        out.append({"kernel": name, "rows": rows, "ms_median": med * 1000, "ms_min": min(ts) * 1000,
                    "tok_s_bound": rows / med, "gflop_s": flop / med / 1e9})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="decode-step matrix-vector kernels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=1, help="rows per product (default 1: one request's decode step)")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.rounds < 1 or args.rows < 1:
        print("error: --threads, --rounds and --rows must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    from decodelab.fastpath.kernel_choice import cpu_model

    print(f"CPU: {cpu_model()}; torch threads {args.threads}; torch {torch.__version__}; rows {args.rows}")
    for row in run(args.rounds, rows=args.rows):
        print(f"{row['kernel']:38s} {row['ms_median']:8.1f} ms (min {row['ms_min']:.1f})  "
              f"<= {row['tok_s_bound']:.1f} tok/s  {row['gflop_s']:6.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
