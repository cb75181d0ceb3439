"""``make bench-requests``: the requests' own CPU per token under continuous batching (no server).

With continuous batching the model runs a decode step once every decoding request has asked for its next one, and
each request's own work per token (its search step; with ``--events`` also the streaming detokenizer and events)
runs one request after another, while the model waits. This measures that work: ``--requests`` greedy requests of
``--tokens`` tokens (the mixed prompts of ``bench/load.py``), the scheduler's loop in the main thread as in
``decodelab serve``, the requests run two ways, alternating in each round:

- ``tasks``: as tasks in the loop's own thread (:meth:`decodelab.scheduler.Scheduler.spawn`, what ``generate_many``
  and the server do); their work is the scheduler's ``task_s``;
- ``threads``: each in its own thread (what ``lm.batching()`` gives callers that bring their own threads); their
  work is the request threads' CPU (``time.thread_time``).

Reported per round and way: microseconds of request work per request and token, the model's idle time per step (the
scheduler's ``wait_s``, plus ``task_s`` for tasks, which run in the model's thread) against its step time, and
tokens per second over the whole run.

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


def batched(lm: decodelab.LM, texts: list[str], tokens: int, events: bool, way: str) -> dict:
    """Every request as a task (``way="tasks"``) or in its own thread (``"threads"``), the scheduler's loop in this
    thread; the requests' work per token and the scheduler's step and idle times."""
    cpu: list[float] = []
    scheduler = lm.engine.start_batching(len(texts), thread=False)
    started = time.perf_counter()
    try:
        if way == "tasks":
            futures = [scheduler.spawn(lambda t=t: consume(lm, t, tokens, events)) for t in texts]
            for f in futures:
                f.add_done_callback(lambda _: scheduler.wake())
            scheduler.run(until=lambda: all(f.done() for f in futures))
            for f in futures:
                f.result()
            work = scheduler.task_s
        else:
            def request(text: str) -> None:
                limit_current_thread()  # as request threads that hand the model to the scheduler
                cpu.append(consume(lm, text, tokens, events))

            threads = [threading.Thread(target=request, args=(t,)) for t in texts]
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
            work = sum(cpu)
    finally:
        lm.engine.stop_batching()
    wall = time.perf_counter() - started
    steps = max(scheduler.steps, 1)
    return {"way": way, "cpu_us_per_token": 1e6 * work / (len(texts) * tokens), "steps": scheduler.steps,
            "ms_per_step": 1000 * scheduler.step_s / steps,
            "wait_ms_per_step": 1000 * scheduler.wait_s / steps,
            "idle_ms_per_step": 1000 * (scheduler.wait_s + scheduler.task_s) / steps,
            "tokens_per_s": len(texts) * tokens / wall}


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
        for way in ("tasks", "threads") if r % 2 == 0 else ("threads", "tasks"):
            b = batched(lm, texts, args.tokens, args.events, way)
            print(f"round {r} {way:7}: {b['cpu_us_per_token']:6.0f} us per request and token; the model was idle "
                  f"{b['idle_ms_per_step']:5.1f} ms per step of {b['ms_per_step']:5.1f} ms; "
                  f"{b['tokens_per_s']:6.1f} tok/s")
            rows.append({"round": r, "batched": b})
    for way in ("tasks", "threads"):
        mine = [row["batched"] for row in rows if row["batched"]["way"] == way]
        print(f"median {way:7}: {statistics.median(b['cpu_us_per_token'] for b in mine):.0f} us per request and "
              f"token, idle {statistics.median(b['idle_ms_per_step'] for b in mine):.1f} ms per step, "
              f"{statistics.median(b['tokens_per_s'] for b in mine):.1f} tok/s")
    out = write_results("requests", {"cpu": cpu, "args": vars(args), "rows": rows})
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
