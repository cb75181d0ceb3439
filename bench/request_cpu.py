"""``make bench-requests``: the requests' own CPU per token under continuous batching (no server).

With continuous batching the model runs a decode step once every decoding request has asked for its next one, and
each request's own work per token (its search step; with ``--events`` also the streaming detokenizer and events)
runs in its own thread under the GIL, one request after another, while the model waits. This measures that work:
``--requests`` greedy requests of ``--tokens`` tokens (the mixed prompts of ``bench/load.py``), each in its own
thread, the scheduler's loop in the main thread as in ``decodelab serve``. Reported per round: microseconds of the
request threads' CPU (``time.thread_time``) per request and token, and the model's wait per step (the scheduler's
``wait_s``) against its step time.

The CPU model is printed and stored with the results in ``bench/results/requests-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import decodelab  # noqa: E402
from decodelab.fastpath.kernel_choice import cpu_model  # noqa: E402
from decodelab.threads import limit_current_thread  # noqa: E402
from load import prompts  # noqa: E402
from results_io import write_results  # noqa: E402


def consume(lm: decodelab.LM, prompt: str, tokens: int, events: bool) -> float:
    """Run one greedy request to the end; returns the calling thread's CPU seconds."""
    start = time.thread_time()
    if events:
        for _ in lm.events(prompt, max_new_tokens=tokens, ignore_eos=True):
            pass
    else:
        lm.generate(prompt, max_new_tokens=tokens, ignore_eos=True)
    return time.thread_time() - start


def batched(lm: decodelab.LM, texts: list[str], tokens: int, events: bool) -> dict:
    """Every request in its own thread, the scheduler's loop in this one; the request threads' CPU per token and the
    scheduler's step and wait times."""
    cpu: list[float] = []

    def request(text: str) -> None:
        limit_current_thread()  # as the server's request threads
        cpu.append(consume(lm, text, tokens, events))

    scheduler = lm.engine.start_batching(len(texts), thread=False)
    threads = [threading.Thread(target=request, args=(t,)) for t in texts]
    try:
        for t in threads:
            t.start()

        def wake_when_done() -> None:
            for t in threads:
                t.join()
            scheduler.wake()

        waker = threading.Thread(target=wake_when_done)
        waker.start()
        scheduler.run(until=lambda: all(not t.is_alive() for t in threads))
        waker.join()
    finally:
        lm.engine.stop_batching()
    return {"cpu_us_per_token": 1e6 * sum(cpu) / (len(texts) * tokens), "steps": scheduler.steps,
            "ms_per_step": 1000 * scheduler.step_s / max(scheduler.steps, 1),
            "wait_ms_per_step": 1000 * scheduler.wait_s / max(scheduler.steps, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--kernels", default="fast", choices=["exact", "fast"])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--events", action="store_true", help="consume LM.events (detokenizer, events) instead of generate")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.tokens < 1 or args.rounds < 1:
        print("error: --requests, --tokens and --rounds must be >= 1", file=sys.stderr)
        return 2
    cpu = cpu_model()
    print(f"CPU: {cpu}; kernels {args.kernels}; {args.requests} requests x {args.tokens} tokens; "
          f"{'events' if args.events else 'generate'}")
    lm = decodelab.load(args.model, kernels=args.kernels)
    texts = prompts(args.requests)
    consume(lm, texts[0], 4, args.events)  # warm-up
    rows = []
    for r in range(args.rounds):
        b = batched(lm, texts, args.tokens, args.events)
        print(f"round {r} batched: {b['cpu_us_per_token']:6.0f} us CPU per request and token; the model waited "
              f"{b['wait_ms_per_step']:5.1f} ms per step of {b['ms_per_step']:5.1f} ms")
        rows.append({"round": r, "batched": b})
    med = statistics.median(row["batched"]["cpu_us_per_token"] for row in rows)
    print(f"median batched: {med:.0f} us CPU per request and token")
    out = write_results("requests", {"cpu": cpu, "args": vars(args), "rows": rows})
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
