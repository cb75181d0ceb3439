"""``make bench-load``: the server under concurrent clients, continuous batching against one request at a time.

Two servers run as ``decodelab serve`` processes on loopback (as a class would run it; ``--in-process``: both in this
process through ``create_app`` and a background uvicorn thread, the setting of figures before 2026-12-02 noon), over
the same model weights (the embedded SmolLM2-135M-Instruct unless ``--model``): one with continuous batching
(``--max-batch-size``, default 32) and one with ``--max-batch-size 1`` (one request at a time). The clients run in
this process. For each client count (default 1, 4, 16, 32) both servers get the same workload, in
alternating order per round: every client streams ``--requests`` greedy completions of ``--tokens`` new tokens
(``ignore_eos``, so every answer has exactly that length), prompts of mixed lengths (5 to ~120 tokens). Recorded per
case: aggregate tokens/s, time to first token and inter-token latency (p50 / p95, from the SSE chunk arrival times),
peak RSS of the server, and whether every answer equals the same request made alone (the serial server's answer).

``--hf`` adds transformers' own continuous batching (``model.generate_batch``) on the same prompts and lengths, in
the same process (aggregate tokens/s only: it has no streaming clients).

``--llama-server BIN`` adds llama.cpp's server (built from the sources in the llama-cpp-python source package:
``cmake -B build -DGGML_NATIVE=ON && cmake --build build --target llama-server llama-quantize``; never in CI) with
one parallel slot per client (``-np N``, continuous batching on) and 2 threads, on the same weights: the embedded
GGUF requantized to ``--llama-type`` (default F32, decodelab's precision) with ``llama-quantize`` from the same
build; one server per client count, warmed up like decodelab's, run in the same rounds as the two decodelab
servers (each of the three first in turn), so all see the same machine load. Same clients, prompts and streamed
workload (llama.cpp's ``ignore_eos`` and ``temperature: 0``), with llama.cpp's prompt cache off
(``cache_prompt: false``): like decodelab, it prefills every request.

``differing`` counts the answers that are not the same request's answer from the serial server (kernel paths that
are not batch-invariant, e.g. ``--kernels fast`` without ``--batch-invariant``, can resolve near-ties differently;
for llama.cpp: another implementation's float32 greedy answers against decodelab's).

The CPU model is printed and stored with the results in ``bench/results/load-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

import decodelab  # noqa: E402
from decodelab.engine import Engine  # noqa: E402
from decodelab.fastpath.kernel_choice import cpu_model  # noqa: E402
from decodelab.server import Settings, create_app  # noqa: E402
from decodelab.server.background import BackgroundServer  # noqa: E402
from results_io import write_results  # noqa: E402

BASE = ["It was a dark and stormy night", "The capital of France is", "Once upon a time, in a small village,",
        "def fibonacci(n):", "The three laws of robotics are", "My favourite recipe for soup starts with"]


def prompts(n: int) -> list[str]:
    """``n`` prompts of mixed lengths: a base sentence repeated 1, 2, 4 or 8 times."""
    return [" ".join([BASE[i % len(BASE)]] * (1 << (i % 4))) for i in range(n)]


async def stream_one(client: httpx.AsyncClient, url: str, prompt: str, tokens: int,
                     extra: dict | None = None) -> dict:
    """One streamed greedy completion (``extra``: more body fields, for one server); arrival times of its chunks."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            **(extra or {})}
    start = time.perf_counter()
    times, text = [], ""
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            piece = chunk["choices"][0]["text"] if chunk.get("choices") else ""
            if piece:
                times.append(time.perf_counter() - start)
                text += piece
    return {"times": times, "text": text, "elapsed": time.perf_counter() - start}


async def run_clients(url: str, clients: int, per_client: int, tokens: int, extra: dict | None = None) -> dict:
    """``clients`` concurrent clients, each streaming ``per_client`` requests one after another (``extra``: more
    body fields for every request)."""
    work = prompts(clients * per_client)
    results: dict[int, dict] = {}
    async with httpx.AsyncClient(timeout=3600) as client:
        async def client_loop(c: int) -> None:
            for j in range(per_client):
                i = c * per_client + j
                results[i] = await stream_one(client, url, work[i], tokens, extra)

        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for c in range(clients)))
        wall = time.perf_counter() - start
    ttft = sorted(r["times"][0] for r in results.values() if r["times"])
    itl = sorted(b - a for r in results.values() for a, b in zip(r["times"], r["times"][1:]))
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")  # noqa: E731
    return {
        "clients": clients, "requests": len(results), "wall_s": wall,
        "tokens_per_s": len(results) * tokens / wall,
        "ttft_ms_p50": statistics.median(ttft) * 1000, "ttft_ms_p95": pct(ttft, 0.95),
        "itl_ms_p50": statistics.median(itl) * 1000 if itl else float("nan"), "itl_ms_p95": pct(itl, 0.95),
        "texts": [results[i]["text"] for i in range(len(results))],
    }


def scheduler_delta(before: dict | None, after: dict | None) -> dict:
    """What the batching scheduler did between two ``/health`` readings (``{}`` without batching): decode
    ``steps``, ``mean_rows`` per step, ``ms_per_step``, seconds in steps (``step_s``), in prefills (``pass_s``), prompts
    prefilled in a joined pass (``joined``: with a decode step or with other prompts) and
    waiting for decoding requests to ask for their next step (``wait_s``) and running the requests' own work in the
    model's thread (``task_s``); 0 where the server does not report them."""
    if not before or not after:
        return {}
    steps = after["steps"] - before["steps"]
    step_s = after["step_s"] - before["step_s"]
    return {"steps": steps, "mean_rows": (after["rows_stepped"] - before["rows_stepped"]) / max(steps, 1),
            "ms_per_step": 1000 * step_s / max(steps, 1), "step_s": step_s,
            "pass_s": after["pass_s"] - before["pass_s"], "wait_s": after.get("wait_s", 0) - before.get("wait_s", 0),
            "task_s": after.get("task_s", 0) - before.get("task_s", 0),
            "joined": after.get("joined", 0) - before.get("joined", 0)}


def run_clients_sync(url: str, clients: int, per_client: int, tokens: int, extra: dict | None = None) -> dict:
    """:func:`run_clients` to completion (the entry point of the client process)."""
    return asyncio.run(run_clients(url, clients, per_client, tokens, extra))


class ServeProcess:
    """``decodelab serve`` in a process of its own on a free loopback port, as a class would run it (its model in the
    main thread: :mod:`decodelab.threads`). Context manager; ``url`` and ``peak_rss_mb`` (VmHWM) while it runs. Its
    stderr goes to a temporary file (a pipe nobody reads would stall a server that logs), quoted when it fails."""

    name = "decodelab serve"
    body_extra: dict = {}  # fields every request to this server carries beyond the common workload

    def __init__(self, model: str | None, kernels: str, max_batch_size: int, compile: bool = False,
                 batch_invariant: bool = False) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "decodelab", "serve", "--port", str(self.port), "--kernels", kernels,
                    "--max-batch-size", str(max_batch_size), "--max-tokens", "4096", "--max-queue", "256"]
        if model:
            self.cmd += ["--model", model]
        if compile:
            self.cmd += ["--compile"]
        if batch_invariant:
            self.cmd += ["--batch-invariant"]

    def __enter__(self) -> "ServeProcess":
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        for _ in range(1200):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log.read()[-2000:]}")
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"{self.name} did not answer /health within 120 s")

    @property
    def peak_rss_mb(self) -> float:
        for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class InProcessServer:
    """``--in-process``: the server (``create_app`` + :class:`BackgroundServer`) in this process, its model driven
    from the scheduler's or a worker's thread: the setting of the figures before 2026-12-02 (noon)."""

    def __init__(self, lm, max_batch_size: int) -> None:
        self.bg = BackgroundServer(create_app(lm, Settings(max_batch_size=max_batch_size, max_tokens=4096,
                                                           max_queue=256)))

    def __enter__(self) -> "InProcessServer":
        self.bg.__enter__()
        self.url = self.bg.url
        return self

    @property
    def peak_rss_mb(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def __exit__(self, *exc) -> None:
        self.bg.__exit__(*exc)


def hf_generate_batch(loaded, n: int, tokens: int) -> dict:
    """transformers' continuous batching on the same prompts: aggregate tokens/s."""
    from transformers import GenerationConfig

    ids = [loaded.tokenizer(p).input_ids for p in prompts(n)]
    cfg = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    start = time.perf_counter()
    out = loaded.model.generate_batch(inputs=ids, generation_config=cfg, progress_bar=False)
    wall = time.perf_counter() - start
    produced = sum(len(o.generated_tokens) for o in out.values())
    return {"clients": n, "requests": n, "wall_s": wall, "tokens_per_s": produced / wall}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def llama_gguf(server_bin: str, ftype: str, workdir: pathlib.Path) -> pathlib.Path:
    """The embedded GGUF requantized to ``ftype`` (e.g. F32) with the ``llama-quantize`` beside ``server_bin``."""
    from decodelab import models

    src = models.embedded_gguf_path()
    quantize = pathlib.Path(server_bin).with_name("llama-quantize")
    dst = workdir / f"smollm2-{ftype.lower()}.gguf"
    subprocess.run([str(quantize), "--allow-requantize", str(src), str(dst), ftype], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dst


class LlamaServerProcess(ServeProcess):
    """llama.cpp's server with ``clients`` parallel slots (``-np``, each 1024 positions, continuous batching on), 2
    threads, on loopback: the same streamed workload as the decodelab servers, in the same rounds. Started, watched
    and stopped as :class:`ServeProcess`; ``health()`` has no scheduler counters (``{"batching": None}``)."""

    name = "llama-server"
    # llama.cpp keeps each slot's last prompt and reuses its KV for a request sharing a prefix (cache_prompt, on by
    # default): the warm-up and earlier rounds send the same prompts, so its prefills were skipped. decodelab
    # prefills every request, so llama.cpp is asked to as well (BENCHMARKS.md figures before the ninth session had
    # the reuse).
    body_extra = {"cache_prompt": False}

    def __init__(self, server_bin: str, gguf: pathlib.Path, clients: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [server_bin, "-m", str(gguf), "-np", str(clients), "-c", str(1024 * clients), "-t", "2",
                    "-tb", "2", "--host", "127.0.0.1", "--port", str(self.port), "--no-webui"]

    def health(self) -> dict:
        return {"batching": None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", default="1,4,16,32")
    ap.add_argument("--requests", type=int, default=1, help="requests per client (default 1)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--kernels", default="exact")
    ap.add_argument("--compile", action="store_true",
                    help="both decodelab servers with --compile (the warm-up compiles the one-request step once)")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="both decodelab servers with --batch-invariant (with --kernels fast: the fast products "
                         "made batch-invariant)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--hf", action="store_true", help="add transformers' generate_batch")
    ap.add_argument("--llama-server", default=None, metavar="BIN", help="add llama.cpp's server (path to llama-server)")
    ap.add_argument("--llama-type", default="F32", help="llama.cpp weight type for --llama-server (default F32)")
    ap.add_argument("--in-process", action="store_true",
                    help="servers in this process (create_app + BackgroundServer) instead of `decodelab serve` processes")
    args = ap.parse_args(argv)
    try:
        counts = [int(c) for c in args.clients.split(",")]
    except ValueError:
        print(f"error: invalid --clients={args.clients!r}: expected comma-separated integers", file=sys.stderr)
        return 2
    server_bin = None
    if args.llama_server:  # checked before anything starts: a bad path is a one-line error, not a traceback later
        server_bin = shutil.which(args.llama_server) or args.llama_server
        if not (os.access(server_bin, os.X_OK) and os.access(pathlib.Path(server_bin).with_name("llama-quantize"),
                                                              os.X_OK)):
            print(f"error: invalid --llama-server={args.llama_server!r}: expected the llama-server executable of a "
                  "llama.cpp build, with llama-quantize beside it", file=sys.stderr)
            return 2
    from decodelab import models

    loaded = models.load_model(args.model)
    cpu = cpu_model()
    print(f"CPU: {cpu}; torch threads {__import__('torch').get_num_threads()}; model {loaded.name}; "
          f"kernels {args.kernels}{' compiled' if args.compile else ''}"
          f"{' batch-invariant' if args.batch_invariant else ''}; {args.tokens} new tokens per request")

    def lm_for() -> decodelab.LM:
        lm = decodelab.LM(loaded.model, loaded.tokenizer, loaded.name)
        lm.engine = Engine(loaded.model, kernels=args.kernels, compile=args.compile,
                           batch_invariant=args.batch_invariant)
        return lm

    if args.in_process:
        batched_srv, serial_srv = InProcessServer(lm_for(), args.max_batch_size), InProcessServer(lm_for(), 1)
    else:
        batched_srv = ServeProcess(args.model, args.kernels, args.max_batch_size, args.compile, args.batch_invariant)
        serial_srv = ServeProcess(args.model, args.kernels, 1, args.compile, args.batch_invariant)
    rows = []
    with contextlib.ExitStack() as stack:
        gguf = None
        if server_bin is not None:
            workdir = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory()))
            try:
                gguf = llama_gguf(server_bin, args.llama_type, workdir)
            except subprocess.CalledProcessError:
                print(f"error: invalid --llama-type={args.llama_type!r}: llama-quantize could not write that type "
                      "(e.g. F32, BF16, Q8_0)", file=sys.stderr)
                return 2
        batched, serial = stack.enter_context(batched_srv), stack.enter_context(serial_srv)
        # warm-up both with the largest client count: a fresh server's first steps of a new size pay for oneDNN's
        # kernels for that row count and first-touch page faults (cache slots, activations); a class's server is warm
        run_clients_sync(batched.url, max(counts), 1, 8)
        run_clients_sync(serial.url, max(counts), 1, 2)
        for n in counts:
            servers = [("batched", batched), ("serial", serial)]
            with contextlib.ExitStack() as per_count:
                if gguf is not None:  # one llama.cpp server per client count (its slots), warmed up like ours
                    llama = per_count.enter_context(LlamaServerProcess(server_bin, gguf, n))
                    run_clients_sync(llama.url, n, 1, 8, llama.body_extra)
                    servers.append((f"llama.cpp {args.llama_type}", llama))
                for r in range(args.rounds):
                    order = servers[r % len(servers):] + servers[: r % len(servers)]  # each server first in turn
                    got, counters = {}, {}
                    for name, srv in order:
                        before = srv.health()["batching"]
                        got[name] = run_clients_sync(srv.url, n, args.requests, args.tokens, srv.body_extra)
                        counters[name] = scheduler_delta(before, srv.health()["batching"])
                    for name, srv in servers:
                        same = got[name]["texts"] == got["serial"]["texts"]
                        differing = sum(a != b for a, b in zip(got[name]["texts"], got["serial"]["texts"]))
                        res = {k: v for k, v in got[name].items() if k != "texts"}
                        res.update(server=name, round=r, same_as_alone=same, differing=differing,
                                   peak_rss_mb=srv.peak_rss_mb, in_process=bool(args.in_process), **counters[name])
                        rows.append(res)
                        print(f"{name:13s} clients={n:3d} {res['tokens_per_s']:7.1f} tok/s  ttft p50 "
                              f"{res['ttft_ms_p50']:7.0f} p95 {res['ttft_ms_p95']:7.0f} ms  itl p50 "
                              f"{res['itl_ms_p50']:6.0f} p95 {res['itl_ms_p95']:6.0f} ms  "
                              f"rss {res['peak_rss_mb']:.0f} MB"
                              f"  same_as_serial={same} differing={differing}/{len(got[name]['texts'])}")
                    for name, _ in servers:
                        if name != "batched":
                            ratio = got["batched"]["tokens_per_s"] / got[name]["tokens_per_s"]
                            print(f"           clients={n:3d} batched / {name}: {ratio:.2f}x")
                    c = counters["batched"]
                    if c:
                        print(f"           batched scheduler: {c['steps']} steps, {c['mean_rows']:.1f} rows each, "
                              f"{c['ms_per_step']:.1f} ms per step, {c['step_s']:.1f} s in steps, {c['pass_s']:.1f} s "
                              f"in prefills ({c['joined']} prompts joined), {c['wait_s']:.1f} s waiting for requests, "
                              f"{c['task_s']:.1f} s in their "
                              f"own work")
        print(f"batching counters: {batched.health()['batching']}")
    if args.hf:
        for n in counts:
            try:
                res = hf_generate_batch(loaded, n, args.tokens)
            except Exception as exc:  # report, do not hide: transformers' API may change
                res = {"clients": n, "error": f"{type(exc).__name__}: {exc}"}
            res["server"] = "transformers generate_batch"
            rows.append(res)
            print(f"transformers generate_batch n={n}: {res.get('tokens_per_s', float('nan')):.1f} tok/s "
                  f"{res.get('error', '')}")
    out = write_results("load", {"cpu": cpu, "args": vars(args), "rows": rows})
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
