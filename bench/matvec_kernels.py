"""Matrix-vector kernels on the weights of one decode step, without the model around them.

Streams a set of random matrices shaped like SmolLM2-135M's decoder (30 layers of q/k/v/o/gate/up/down plus the
49152 x 576 output layer, ~538 MB in float32: far larger than the caches) through each way decodelab can multiply
by them, interleaving the variants round by round so that all see the same machine load. Reports milliseconds per
"step" (one pass over all matrices, batch 1) and the tokens/s that would allow if nothing else cost time.

Run alone: ``python bench/matvec_kernels.py [--threads 2] [--rounds 5]``; ``bench/run.py`` includes it (case ``kernels``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def _variants(layers: int):
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

    out = {
        "float32 F.linear": ([Dense(w) for w in mats] + [Dense(head)], torch.float32),
        "float32 bmm halves": ([Halves(w) for w in mats] + [Halves(head)], torch.float32),
        **{f"float32 {name} (fast candidate)": ([MeasuredDense(w, None, {"1": name}) for w in mats]
                                                + [MeasuredDense(head, None, {"1": name})], torch.float32)
           for name in ("weight_halves", "weight_first", "onednn")},
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
def run(rounds: int = 5, layers: int = 30) -> list[dict]:
    """Median / min milliseconds per pass for each kernel variant (batch 1). Returns one dict per variant."""
    variants = _variants(layers)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds + 1):
        for name, (fns, dtype) in variants.items():
            x = {576: torch.randn(1, 576).to(dtype), 1536: torch.randn(1, 1536).to(dtype)}
            start = time.perf_counter()
            for fn in fns:
                w = getattr(fn, "weight", None)
                k = w.shape[1] if w is not None else (fn.q.shape[1] if hasattr(fn, "q") else fn.packed.shape[1] * 2)
                fn(x[k])
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"kernel": name, "ms_median": med * 1000, "ms_min": min(ts) * 1000, "tok_s_bound": 1 / med})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="decode-step matrix-vector kernels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    if args.threads < 1 or args.rounds < 1:
        print("error: --threads and --rounds must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    from decodelab.fastpath.kernel_choice import cpu_model

    print(f"CPU: {cpu_model()}; torch threads {args.threads}; torch {torch.__version__}")
    for row in run(args.rounds):
        print(f"{row['kernel']:30s} {row['ms_median']:8.1f} ms (min {row['ms_min']:.1f})  "
              f"<= {row['tok_s_bound']:.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
