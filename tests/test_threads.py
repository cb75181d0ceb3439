"""One OpenMP team per process: request threads run single-threaded, the batching scheduler's loop can run in the
caller's thread, and ``decodelab serve`` runs the model in its main thread (see :mod:`decodelab.threads`).

Speed is measured in bench/ (``bench/load.py``); these tests check the mechanics and that answers do not change.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import torch

import decodelab
from decodelab.engine import Engine
from decodelab.scheduler import Scheduler
from decodelab.threads import limit_current_thread, single_threaded


def in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_single_threaded_limits_only_the_calling_thread_and_restores():
    before = torch.get_num_threads()

    def job():
        with single_threaded():
            inside = torch.get_num_threads()
            x = torch.randn(200_000)
            total = float(x.exp().sum())  # a parallel-sized operator runs (inline) and gives a number
        return inside, torch.get_num_threads(), total

    inside, after, total = in_thread(job)
    assert inside == 1 and after == before and total > 0
    assert torch.get_num_threads() == before  # the main thread was not touched
    assert in_thread(lambda: (limit_current_thread(), torch.get_num_threads())[1]) == 1
    assert in_thread(torch.get_num_threads) == before  # nor are new threads (no process-wide default changed)


def test_scheduler_loop_runs_in_the_callers_thread_until_its_condition(tiny_llama):
    lm = decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, "tiny-llama")
    lm.engine = Engine(tiny_llama.model)
    alone = lm.generate("It was a dark and stormy", max_new_tokens=6).sequences[0].new_ids
    scheduler = lm.engine.start_batching(4, thread=False)
    try:
        # this thread drives the loop: its own calls run directly while the loop is paused
        assert isinstance(scheduler, Scheduler) and scheduler.owns_current_thread()
        result = []
        worker = threading.Thread(target=lambda: result.append(
            lm.generate("It was a dark and stormy", max_new_tokens=6).sequences[0].new_ids))
        worker.start()
        time.sleep(0.2)
        assert not result and scheduler.steps == 0  # nothing runs the loop yet: the request waits in the queue
        seen = []

        def done():
            seen.append(scheduler.owns_current_thread())
            return not worker.is_alive()

        finished = threading.Thread(target=lambda: (worker.join(), scheduler.wake()))
        finished.start()
        scheduler.run(until=done)
        finished.join()
        assert result == [alone] and scheduler.steps == len(alone) - 1 and all(seen)
        assert not in_thread(scheduler.owns_current_thread)  # another thread's calls are queued for the loop
    finally:
        lm.engine.stop_batching()
    assert lm.engine.scheduler is None


def test_generate_many_drives_the_scheduler_from_the_calling_thread(tiny_llama):
    lm = decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, "tiny-llama")
    lm.engine = Engine(tiny_llama.model)
    prompts = ["It was a dark and stormy", "Hello", "1, 2, 3,"]
    alone = [lm.generate(p, max_new_tokens=5).sequences[0].new_ids for p in prompts]
    threads_that_stepped = set()
    original = lm.engine.step_many

    def spy(states, tokens):
        threads_that_stepped.add(threading.current_thread().name)
        return original(states, tokens)

    lm.engine.step_many = spy
    got = [g.sequences[0].new_ids for g in lm.generate_many(prompts, max_new_tokens=5)]
    assert got == alone
    assert threads_that_stepped == {threading.current_thread().name}
    assert lm.engine.scheduler is None
    # a consumer that stops early: the other requests end, batching is off again
    it = lm.generate_iter(prompts, max_new_tokens=5)
    first = next(it)
    it.close()
    assert first[1].sequences[0].new_ids == alone[first[0]] and lm.engine.scheduler is None


def test_a_generate_iter_consumer_may_use_the_model_between_results(tiny_llama):
    """The thread that drives the loop runs its own model calls directly while the loop waits for it (queueing them
    would wait for the loop this thread runs): scoring or generating between two results neither hangs nor changes
    a number."""
    lm = decodelab.LM(tiny_llama.model, tiny_llama.tokenizer, "tiny-llama")
    lm.engine = Engine(tiny_llama.model)
    prompts = ["It was a dark and stormy", "Hello", "1, 2, 3,"]
    alone = [lm.generate(p, max_new_tokens=4) for p in prompts]
    checks = []

    def consume():
        for i, g in lm.generate_iter(prompts, max_new_tokens=4):
            again = lm.generate(prompts[i], max_new_tokens=4)  # while the other requests wait
            scored = lm.score_ids(alone[i].sequences[0].ids)
            checks.append((g.sequences[0].new_ids == alone[i].sequences[0].new_ids == again.sequences[0].new_ids,
                           scored is not None))

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "generate_iter deadlocked"
    assert checks == [(True, True)] * 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_the_model_in_its_main_thread_and_stops_on_sigint(embedded):
    """The real ``decodelab serve`` (embedded model): a streamed and a plain completion equal ``lm.generate`` alone,
    ``/health`` shows the scheduler (also at ``--max-batch-size 1``), and SIGINT ends the process with status 0."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "decodelab", "serve", "--port", str(port), "--max-batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
            assert proc.poll() is None, proc.stdout.read()
        health = httpx.get(url + "/health").json()
        assert health["batching"]["max_batch_size"] == 1
        body = {"prompt": "It was a dark and stormy", "max_tokens": 8, "temperature": 0}
        plain = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        chunks = []
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:])["choices"][0]["text"])
        expected = decodelab.LM(embedded.model, embedded.tokenizer, embedded.name).generate(
            "It was a dark and stormy", max_new_tokens=8).sequences[0].new_text
        assert plain["choices"][0]["text"] == "".join(chunks) == expected
        assert httpx.get(url + "/health").json()["batching"]["steps"] >= 14  # both requests stepped in the loop
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0
