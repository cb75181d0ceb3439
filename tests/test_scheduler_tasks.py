"""Requests as tasks of the batching scheduler (``Scheduler.spawn``): greenlets in the scheduler's own thread.

A task runs until it calls the engine, hands the thread back, and is resumed with the answer; tasks that ask for a
step together share it (no gather wait: the loop knows they all asked). A task can pause until another thread wakes
it (a stream's consumer that has not taken its items yet); closing the scheduler fails a paused task instead of
leaving it hanging; a task cancelled before it starts never runs; a task runs with its own context variables, grad
mode on, inference mode off and one OpenMP thread, and the loop gets its own settings back for the model. The
server's stream backpressure (``_Room``) pauses a task instead of blocking the model's thread.
"""

from __future__ import annotations

import contextvars
import threading

import pytest
import torch

from decodelab.scheduler import Scheduler
from decodelab.server.runner import _Room


class RecordingEngine:
    """A fake engine: each row's logits are its token plus the step number; records the thread and OpenMP count."""

    def __init__(self) -> None:
        self.threads: set[str] = set()
        self.omp: set[int] = set()
        self.inference: set[bool] = set()
        self.calls = 0

    def step_many(self, states, tokens):
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        self.omp.add(torch.get_num_threads())
        self.inference.add(torch.is_inference_mode_enabled())
        return [t.float().unsqueeze(1) + self.calls for t in tokens]


def test_spawned_tasks_run_in_the_loop_thread_and_share_steps():
    engine = RecordingEngine()
    scheduler = Scheduler(engine, max_batch_size=8, gather_s=30.0)  # a gather wait would make this test hang
    seen_threads: set[str] = set()

    def request(token: int) -> list[float]:
        state = object()
        seen_threads.add(threading.current_thread().name)
        assert scheduler.current_task() is not None and not scheduler.owns_current_thread()
        out = [scheduler.step(state, torch.tensor([token]))[0, 0].item() for _ in range(5)]
        scheduler.release(state)
        return out

    futures = [scheduler.spawn(lambda t=t: request(t)) for t in range(4)]
    results = [f.result(timeout=30) for f in futures]
    scheduler.close()
    assert seen_threads == engine.threads == {"decodelab-scheduler"}
    assert scheduler.steps == 5 and scheduler.max_rows == 4  # every step carried all four tasks
    assert scheduler.tasks == 4 and scheduler.task_s > 0 and scheduler.wait_s == 0  # nobody to wait for
    assert results == [[t + step for step in range(1, 6)] for t in range(4)]
    assert scheduler.current_task() is None  # outside a task


def test_a_task_runs_with_its_own_settings_and_the_loop_gets_its_own_back():
    engine = RecordingEngine()
    scheduler = Scheduler(engine, max_batch_size=4, gather_s=0.01)
    who = contextvars.ContextVar("who", default="nobody")
    who.set("caller")  # copied into the task when spawned
    torch_threads = torch.get_num_threads()

    def request():
        state = object()
        inside = (who.get(), torch.get_num_threads(), torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        scheduler.step(state, torch.tensor([1]))
        after = (who.get(), torch.get_num_threads(), torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        who.set("task")  # the task's own copy
        scheduler.release(state)
        return inside, after

    inside, after = scheduler.spawn(request).result(timeout=30)
    scheduler.close()
    expected_threads = 1 if torch_threads > 1 else torch_threads
    assert inside == after == ("caller", expected_threads, True, False)
    assert who.get() == "caller"
    assert engine.inference == {True} and engine.omp == {torch.get_num_threads()}


def test_a_task_exception_reaches_its_future_and_the_others_go_on():
    scheduler = Scheduler(RecordingEngine(), max_batch_size=4, gather_s=0.01)

    def bad():
        scheduler.step(object(), torch.tensor([1]))
        raise ValueError("the request's own error")

    def good():
        state = object()
        out = [scheduler.step(state, torch.tensor([2]))[0, 0].item() for _ in range(3)]
        scheduler.release(state)
        return len(out)

    failing, fine = scheduler.spawn(bad), scheduler.spawn(good)
    with pytest.raises(ValueError, match="the request's own error"):
        failing.result(timeout=30)
    assert fine.result(timeout=30) == 3
    scheduler.close()


def test_pause_waits_for_wake_task_and_an_early_wake_is_kept():
    scheduler = Scheduler(RecordingEngine(), max_batch_size=4, gather_s=0.01)
    log: list[str] = []
    paused = threading.Event()
    holder: dict = {}

    def sleeper():
        holder["task"] = scheduler.current_task()
        log.append("pause")
        paused.set()
        scheduler.pause()
        log.append("woken")
        scheduler.wake_task(scheduler.current_task())  # woken before its next pause: that one returns at once
        scheduler.pause()
        log.append("done")
        return "ok"

    def stepper():
        state = object()
        for _ in range(4):
            scheduler.step(state, torch.tensor([1]))
        scheduler.release(state)
        log.append("stepper done")

    fut = scheduler.spawn(sleeper)
    assert paused.wait(30)
    scheduler.spawn(stepper).result(timeout=30)  # runs while the sleeper is paused
    assert log == ["pause", "stepper done"]
    scheduler.wake_task(holder["task"])
    assert fut.result(timeout=30) == "ok"
    assert log == ["pause", "stepper done", "woken", "done"]
    with pytest.raises(RuntimeError, match="own tasks"):
        scheduler.pause()  # not a task
    scheduler.close()


def test_closing_fails_a_paused_task_and_refuses_new_ones():
    scheduler = Scheduler(RecordingEngine(), max_batch_size=4, gather_s=0.01)
    paused = threading.Event()

    def waits_forever():
        paused.set()
        scheduler.pause()

    fut = scheduler.spawn(waits_forever)
    assert paused.wait(30)
    scheduler.close()
    with pytest.raises(RuntimeError, match="closed"):
        fut.result(timeout=30)
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.spawn(lambda: None)


def test_a_task_cancelled_before_it_starts_never_runs():
    scheduler = Scheduler(RecordingEngine(), max_batch_size=4, gather_s=0.01, thread=False)  # loop not running yet
    ran: list[int] = []
    cancelled = scheduler.spawn(lambda: ran.append(1))
    kept = scheduler.spawn(lambda: ran.append(2) or "kept")
    assert cancelled.cancel()
    scheduler.run(until=kept.done)
    assert ran == [2] and kept.result() == "kept" and cancelled.cancelled()
    scheduler.close()
    scheduler.run()


def test_a_stream_task_waiting_for_its_consumer_pauses_without_holding_the_model():
    """``_Room`` (the server's stream backpressure): a task with no room left pauses, the other tasks keep stepping,
    and the consumer's ``give`` resumes it."""
    scheduler = Scheduler(RecordingEngine(), max_batch_size=4, gather_s=0.01)
    room = _Room(1, scheduler)
    pulled: list[int] = []

    def producer():
        for i in range(3):
            room.take()
            pulled.append(i)
        return "produced"

    def other():
        state = object()
        for _ in range(6):
            scheduler.step(state, torch.tensor([3]))
        scheduler.release(state)
        return "stepped"

    produced = scheduler.spawn(producer)
    assert scheduler.spawn(other).result(timeout=30) == "stepped"  # not held by the paused producer
    assert pulled == [0] and not produced.done()
    room.give()
    room.give()
    assert produced.result(timeout=30) == "produced"
    assert pulled == [0, 1, 2]
    scheduler.close()
    # without a scheduler, _Room is a plain semaphore for a worker thread
    plain = _Room(1)
    plain.take()
    threading.Timer(0.05, plain.give).start()
    plain.take()


def test_deferred_callbacks_run_once_after_the_ready_tasks_and_before_the_next_step():
    """``defer`` (how the server wakes its event loop once per step for all streams): the same callable deferred by
    four tasks runs once, after all four have run, before the step they asked for; outside a task it runs at once."""

    class LoggingEngine(RecordingEngine):
        def step_many(self, states, tokens):
            log.append("step")
            return super().step_many(states, tokens)

    log: list[str] = []
    scheduler = Scheduler(LoggingEngine(), max_batch_size=4, gather_s=30.0, thread=False)

    def flush() -> None:
        log.append("flush")

    def bad() -> None:
        raise ValueError("a deferred callback's own bug")

    def request(name: str) -> None:
        state = object()
        for _ in range(2):
            log.append(name)
            scheduler.defer(flush)
            scheduler.defer(bad)  # logged and dropped: the loop goes on
            scheduler.step(state, torch.tensor([1]))
        scheduler.release(state)

    futures = [scheduler.spawn(lambda n=n: request(n)) for n in "abcd"]
    scheduler.run(until=lambda: all(f.done() for f in futures))
    assert [f.result() for f in futures] == [None] * 4
    assert log == ["a", "b", "c", "d", "flush", "step"] * 2
    scheduler.defer(lambda: log.append("now"))  # not in a task
    assert log[-1] == "now"
    scheduler.close()
    scheduler.run()


def test_a_suspended_task_s_single_threaded_block_does_not_leak_into_its_thread():
    """``single_threaded`` / ``model_threads`` keep their state per context, not per thread: a task suspended inside
    ``single_threaded`` shares its thread with whatever runs next there (a ``generate_iter`` consumer scoring between
    two results). With a per-thread stack, the consumer's model call saw the task's block and left the thread at 1
    OpenMP thread for good (found by the full suite: a sweep, then tests/test_threads.py)."""
    from decodelab.threads import model_threads, single_threaded

    scheduler = Scheduler(RecordingEngine(), max_batch_size=4, gather_s=0.01, thread=False)
    before = torch.get_num_threads()

    def request():
        state = object()
        with single_threaded():
            for _ in range(2):
                scheduler.step(state, torch.tensor([1]))
        scheduler.release(state)
        return "done"

    fut = scheduler.spawn(request)
    scheduler.run(until=lambda: scheduler.steps >= 1)  # the task is suspended inside single_threaded
    assert not fut.done()
    with model_threads():  # not inside a single_threaded block of this context: a no-op
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before
    with single_threaded():
        with model_threads():
            assert torch.get_num_threads() == before
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    scheduler.run(until=fut.done)
    assert fut.result() == "done" and torch.get_num_threads() == before
    scheduler.close()
    scheduler.run()
