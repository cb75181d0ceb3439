"""Continuous batching: one thread owns the model and runs one decode step for every active request together.

That thread is the scheduler's own (``Scheduler(thread=True)``, what ``lm.batching()`` and an in-process server
use) or one the owner chooses and hands to :meth:`Scheduler.run`: ``decodelab serve`` runs the loop in its main
thread and ``generate_many`` in the calling thread, the thread that loaded the model, where PyTorch's OpenMP runs
at full speed (:mod:`decodelab.threads`).

What it does:

1. Requests run their own search loops (processors, seeded generators, stop rules, tracer, stream) exactly as
   alone: the search code does not know it is batched. Their calls into the :class:`~decodelab.engine.Engine`
   (``prefill``, ``step``, ``full_logits``) are handed to the scheduler thread, the only thread that calls the
   model. A request runs either in a thread of its own, which blocks until the scheduler answers, or (what
   ``generate_many`` and the server do) as a task of the scheduler (:meth:`Scheduler.spawn`): a greenlet in the
   scheduler's own thread that hands the thread back at each engine call and is resumed with the answer, so a
   token costs no thread wake-up and no GIL handoff per request (``bench/request_cpu.py`` measures both).
2. Decode steps are gathered: the scheduler runs one step when every active request has asked for its next step,
   when ``max_batch_size`` rows are waiting, or ``gather_s`` after the first one asked, counted from the end of the
   previous step (a request that is slow to come back, e.g. a stream whose client reads slowly, joins the next
   step; one that asked while a step ran does not run alone right after it, out of phase with the others). One
   step feeds one token per row of every gathered request through :meth:`Engine.step_many`: on the fast path one
   forward pass (:meth:`decodelab.fastpath.FastDecoder.forward_many`) whose logits are, on the default exact
   float32 engine, bit for bit those of each request alone (:mod:`decodelab.fastpath.rows` explains how); on the
   plain path one forward over the requests' merged left-padded caches (:mod:`decodelab.padded_batch`, within
   float rounding).
3. Prompts join between steps, the waiting ones taken round-robin between their owners (:data:`PASS_OWNER`: the server's
   clients), so one client's burst of prompts does not hold another's first token. After a decode step that took d
   seconds, the scheduler spends at most about d more (:data:`PASS_SHARE` times d, at least :data:`MIN_PASS_S`) on
   prefills and other whole-sequence passes before the next step, so running streams' inter-token latency at most
   roughly doubles while prompts join, whatever their number and length; except that when more prompts wait than
   :data:`WAITING_SERVED_RATIO` times the requests decoding (a burst), they are all prefilled first, so that they
   join the batch together rather than one per step. Off the exact path, short prompts (:data:`JOIN_TOKENS`) join
   the next decode step instead: one forward pass for the step's rows and the prompts' tokens; a burst's prompts run
   together (:data:`BURST_JOIN_TOKENS`). A fast-path prefill is cut between decoder
   layers, not between tokens (:meth:`Engine._prefill_slices`): each layer sees the whole prompt at once, exactly as
   alone, so the answer is unchanged (cutting the prompt into token chunks would change the sums, so the answer would no
   longer equal the request alone), and a long prompt holds the streams for one layer's share at a time, never for the
   whole prefill. Passes that cannot be cut (the plain path's prefill, full-sequence logits) run in one piece. With no
   decode step waiting, passes run back to back, and a step that becomes due stops them at the next cut.
4. Requests leave when their search loop ends or is closed (a client that went away): the loop's ``finally``
   calls :meth:`Engine.release`, and its rows are not waited for at the next step. Each request's KV cache is its
   own, freed with it.

What it does not know: anything of processors, search or text. It sees decode states, token tensors and logits.
"""

from __future__ import annotations

import collections
import contextvars
import functools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import greenlet
import torch

from .threads import set_thread_count

DEFAULT_GATHER_S = 0.05  # longest wait for the slowest active request before a step runs without it
PASS_SHARE = 1.0  # time for prefills between two decode steps, as a multiple of the last decode step's time
MIN_PASS_S = 0.02  # ... but at least this many seconds
WAITING_SERVED_RATIO = 1.2
"""When more prompts wait for their prefill than this times the requests decoding, they are all prefilled before the
next decode step (the rule and default of text-generation-inference's router, ``--waiting-served-ratio``): a burst of
new requests joins the running batch at once instead of one per step. Measured on an AMD EPYC (AVX-512), 16 and 32
clients sending together, ``kernels="fast"``: 87 steps of 11.6 rows and 111 of 18.2 rows for 64 tokens before, 65 of
15.5 and 66 of 30.5 with every prefill first; throughput against one request at a time 3.28x -> 4.01x (16) and
4.53x -> 5.25x (32)."""
JOIN_TOKENS = 128
"""Off the exact path, waiting prompts of at most this many tokens in all join the next decode step: one forward pass
runs the step's rows and the prompts' tokens through every product together (:meth:`Engine.step_and_prefill
<decodelab.engine.Engine.step_and_prefill>`), so the weights are read once for both, instead of the prefills running
between steps. Longer prompts (and those beyond the budget) are prefilled between steps as before. 0 turns joining
off. Measured on an AMD EPYC (AVX2, 2 threads, SmolLM2-135M float32, ``kernels="fast"``): see BENCHMARKS.md."""
BURST_JOIN_TOKENS = 512
"""While a burst of prompts is prefilled before the next step (:data:`WAITING_SERVED_RATIO`), or no request is
decoding, waiting prompts of at most this many tokens in all run as one forward pass (no stream waits on it, so it is
not cut between layers): the products multiply all their tokens at once. 0 turns it off."""
# Who a pass is for (the server sets the client: its API key's place or its address). Waiting passes are served
# round-robin between owners, oldest first within one owner, so one client's burst of prompts cannot queue ahead of
# another client's prompt; with no owner set (the Python API), passes run in arrival order.
PASS_OWNER: contextvars.ContextVar[str | None] = contextvars.ContextVar("decodelab_pass_owner", default=None)


@dataclass(eq=False)
class Task:
    """A request running inside the scheduler's thread (:meth:`Scheduler.spawn`); opaque to callers, who only hand it
    back to :meth:`Scheduler.wake_task`."""

    fn: Callable[[], Any]
    context: contextvars.Context
    future: Future = field(default_factory=Future)
    glet: Any = None  # its greenlet, once started
    wake_pending: bool = False  # wake_task came before pause
    failure: BaseException | None = None  # raised in the task when it resumes from pause (the scheduler closed)


class _TaskGreenlet(greenlet.greenlet):
    """The greenlet of a :class:`Task`: how the scheduler recognises its own tasks' calls."""

    def __init__(self, run: Callable[[], Any], parent, scheduler: "Scheduler", task: Task) -> None:
        super().__init__(run, parent)
        self.scheduler, self.task = scheduler, task


@dataclass
class _PassOp:
    fn: Callable[[], Any]
    sliced: bool
    owner: str | None = None
    future: Future = field(default_factory=Future)
    slices: Any = None  # the running generator of a sliced pass
    join: Callable[[], Any] | None = None  # a prefill that may join a decode step: makes its engine.JoiningPrompt
    join_tokens: int = 0  # ... of this many tokens


@dataclass
class _StepOp:
    state: Any
    tokens: torch.Tensor
    future: Future = field(default_factory=Future)

    @property
    def rows(self) -> int:
        return int(self.tokens.shape[0])


class Scheduler:
    """The model-owning thread of continuous batching.

    Args:
        engine: the :class:`~decodelab.engine.Engine` whose model this thread owns.
        max_batch_size: most rows (beam search: ``num_beams`` per request; ``n`` samples: ``n``) in one decode
            step; >= 1. A single request with more rows still runs, alone.
        gather_s: seconds to wait, after the first request of a step asked (counted from the end of the previous
            step at the earliest), for the other active requests.
        thread: start the scheduler's own thread (default). ``False``: the owner runs the loop in a thread of its own
            choosing with :meth:`run` (the thread where the model was loaded: see :mod:`decodelab.threads` for why
            that is faster); until then, work waits in the queue.

    Counters (read-only): ``steps`` (decode steps run), ``rows_stepped`` (rows fed in them; ``rows_stepped / steps`` is
    the mean batch), ``max_rows`` (largest step), ``passes`` (prefills and other whole passes finished;
    ``passes_started``: begun), ``joined`` (prefills run in a joined pass, with a decode step or with other prompts:
    counted in ``passes`` too), ``slices`` (pieces of cut passes run), ``steps_within_passes`` (decode steps run while a
    cut pass was under way: the streams it did not hold up), ``step_s`` and ``pass_s`` (seconds spent in decode steps
    and in passes: ``step_s / steps`` is the mean step time), ``wait_s`` (seconds the loop waited for requests to ask
    while some were decoding: the model idle during their own search steps), ``tasks`` (requests started as tasks:
    :meth:`spawn`) and ``task_s`` (seconds the loop's thread ran them: their own search steps, the model idle).

    Raises:
        ConfigError: ``max_batch_size`` < 1 or ``gather_s`` < 0.
    """

    def __init__(self, engine, max_batch_size: int = 16, gather_s: float = DEFAULT_GATHER_S, *,
                 thread: bool = True) -> None:
        from .errors import ConfigError

        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ConfigError(f"invalid max_batch_size={max_batch_size!r}: expected an integer >= 1",
                              param="max_batch_size")
        if not isinstance(gather_s, (int, float)) or isinstance(gather_s, bool) or not gather_s >= 0:
            raise ConfigError(f"invalid gather_s={gather_s!r}: expected a number >= 0", param="gather_s")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.gather_s = float(gather_s)
        self._cond = threading.Condition()
        self._steps: list[_StepOp] = []
        self._waiting_rows = 0  # rows of the steps in self._steps
        self._first_step_at = 0.0
        self._step_done_at = 0.0  # monotonic end of the last decode step
        self._due_now = False  # steps left over by a full step run at once
        self._passes: collections.deque[_PassOp] = collections.deque()
        self._current: _PassOp | None = None  # the pass under way (only the scheduler thread touches it)
        self._served: dict[str | None, int] = {}  # owner -> number of the last pass started for it
        self._active: set[int] = set()  # id() of the decode states that have stepped and not been released
        self._closed = False
        self._new_tasks: collections.deque[Task] = collections.deque()  # spawned, not started
        self._resumable: collections.deque[Task] = collections.deque()  # to resume: their op is settled, or woken
        self._paused: set[Task] = set()  # in pause(), waiting for wake_task
        self._deferred: list[Callable[[], None]] = []  # defer(): to run once the ready tasks have run (loop thread)
        self.steps = self.rows_stepped = self.max_rows = self.passes = self.slices = self.steps_within_passes = 0
        self.passes_started = self.joined = 0
        self.tasks = 0
        self.step_s = self.pass_s = self.wait_s = self.task_s = 0.0
        self._thread: threading.Thread | None = None  # the thread running the loop
        self._own_thread: threading.Thread | None = None
        self._driver = None if thread else threading.current_thread()  # who runs the loop (thread=False)
        if thread:
            self._own_thread = threading.Thread(target=self.run, name="decodelab-scheduler", daemon=True)
            self._own_thread.start()

    # --- called from request threads ---------------------------------------------------------------------------
    def owns_current_thread(self) -> bool:
        """Whether the caller's engine calls run directly: it is the thread running the loop, or, for a scheduler
        without its own thread, the thread that drives it (its creator) while the loop is paused (a
        ``generate_iter`` consumer scoring or generating between two results: queueing that call would wait for
        the loop this very thread runs)."""
        if self.current_task() is not None:  # a task's model calls go through the queue like any request's
            return False
        current = threading.current_thread()
        return current is self._thread or (self._thread is None and current is self._driver)

    def current_task(self) -> Task | None:
        """The :class:`Task` of this scheduler the caller runs in (:meth:`spawn`), else ``None``."""
        current = greenlet.getcurrent()
        return current.task if isinstance(current, _TaskGreenlet) and current.scheduler is self else None

    def spawn(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` (a request: a search loop and whatever consumes it) as a task inside the loop's own thread
        and return a ``concurrent.futures.Future`` of its result.

        A task runs until it calls the engine (``prefill``, ``step``, ``full_logits``): its call is queued as any
        request's, and the loop goes on with other work (a greenlet switch, no thread handoff) and resumes the task
        with the answer. After a decode step the loop resumes each task of the step in turn, each runs its own
        search step and asks for the next, and the next step is due at once. Compared with a thread per request,
        this removes a thread wake-up and a GIL handoff per request and token (measured in ``bench/request_cpu.py``).
        A task runs as a request thread would: its own context variables (a copy of the caller's), one OpenMP
        thread for its own tensor work, grad mode on and inference mode off; the loop switches those back for the
        model. A task must not block on anything but the engine and :meth:`pause` (it would hold the model's
        thread). Cancelling the future before the task starts skips it.

        Raises:
            RuntimeError: the scheduler is closed.
        """
        task = Task(fn, contextvars.copy_context())
        with self._cond:
            self._check_open()
            self._new_tasks.append(task)
            self._cond.notify_all()
        return task.future

    def pause(self) -> None:
        """Suspend the calling task until :meth:`wake_task` is called for it (from any thread; at once if that
        already happened since its last pause). The loop goes on meanwhile.

        Raises:
            RuntimeError: not called from a task of this scheduler, or the scheduler closed while it waited.
        """
        task = self.current_task()
        if task is None:
            raise RuntimeError("Scheduler.pause() is for the scheduler's own tasks (Scheduler.spawn)")
        with self._cond:
            if task.wake_pending:
                task.wake_pending = False
                return
            self._paused.add(task)
        self._park(None)
        if task.failure is not None:
            failure, task.failure = task.failure, None
            raise failure

    def wake_task(self, task: Task) -> None:
        """Resume ``task`` from :meth:`pause` (or let its next pause return at once). Thread-safe."""
        with self._cond:
            if task in self._paused:
                self._paused.discard(task)
                self._resumable.append(task)
                self._cond.notify_all()
            else:
                task.wake_pending = True

    def defer(self, fn: Callable[[], None]) -> None:
        """In a task: run ``fn()`` in the loop's thread once every task ready now has run, before the model's next
        call (once, however many times it was deferred meanwhile: callables are compared with ``==``). Outside a
        task: at once. The server hands the tokens of all its streams to the event loop this way, with one wake-up
        per decode step: one per stream and token made the event loop's thread take the GIL from the tasks 16 times
        per step (``_write_to_self`` was 39 % of the tasks' py-spy samples, AMD EPYC, 16 streaming clients). ``fn``
        must not raise (an exception is logged and dropped, never reaches the loop)."""
        if self.current_task() is None:
            fn()
        elif fn not in self._deferred:  # only the loop's thread touches the list
            self._deferred.append(fn)

    def run_pass(self, fn: Callable[[], Any], sliced: bool = False, join: Callable[[], Any] | None = None,
                 join_tokens: int = 0) -> Any:
        """Run ``fn()`` (a prefill or a full forward pass) in the scheduler thread between decode steps; block
        until it is done and return its result (or raise its exception). ``sliced``: ``fn()`` returns a generator
        whose ``yield`` statements are the points where decode steps may run, and whose return value is the result.
        ``join``: the pass is a prefill of ``join_tokens`` tokens that may instead join a decode step
        (:data:`JOIN_TOKENS`): ``join()`` returns its :class:`~decodelab.engine.JoiningPrompt`, or ``None`` when it
        cannot join (the pass then runs as ``fn``)."""
        op = _PassOp(fn, sliced, PASS_OWNER.get(), join=join, join_tokens=join_tokens)
        with self._cond:
            self._check_open()
            self._passes.append(op)
            self._cond.notify_all()
        return self._park(op) if self.current_task() is not None else op.future.result()

    def step(self, state, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` (B,) to ``state`` in the next batched decode step; block until it ran and return the
        (B, V) float32 logits, as :meth:`Engine.step` does."""
        op = _StepOp(state, tokens)
        task = self.current_task()
        with self._cond:
            self._check_open()
            first = not self._steps
            if first:
                self._first_step_at = time.monotonic()
            self._steps.append(op)
            self._waiting_rows += op.rows
            self._active.add(id(state))
            # Wake the loop only when this request starts a gather (the loop then waits until it is due) or
            # completes one: a notification per request made the loop take the GIL 16 times per 16-row step. A task
            # runs in the loop's thread: nobody to wake.
            if task is None and (first or self._waiting_rows >= self.max_batch_size or self._all_asked()):
                self._cond.notify_all()
        return self._park(op) if task is not None else op.future.result()

    def release(self, state) -> None:
        """``state``'s request is finished (or gone): the next steps no longer wait for it."""
        with self._cond:
            self._active.discard(id(state))
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake the loop so that :meth:`run`'s ``until`` is checked again (call it when that condition may have
        changed, e.g. from a future's done-callback)."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the loop after the work already queued (its own thread is joined); later calls raise
        ``RuntimeError``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._own_thread is not None and not self.owns_current_thread():
            self._own_thread.join(timeout=30)

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Run the scheduler loop in the calling thread until :meth:`close` (and the queued work is done), or until
        ``until()`` is true (checked whenever the loop is woken: new work, a finished request, :meth:`wake`). Model
        calls from other threads wait in the queue while no thread runs the loop; run it again to go on.

        Raises:
            RuntimeError: another thread is running the loop.
        """
        with self._cond:
            if self._thread is not None and self._thread is not threading.current_thread():
                raise RuntimeError("the batching scheduler's loop is already running in another thread")
            self._thread = threading.current_thread()
        try:
            self._loop(until)
        finally:
            with self._cond:
                self._thread = None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the batching scheduler is closed")

    # --- the scheduler thread ----------------------------------------------------------------------------------
    def _due_at(self) -> float:
        """When the waiting steps run even if some active requests have not asked yet: ``gather_s`` after the first
        of them asked, counted from the end of the last decode step at the earliest. A request that asked while a
        step ran was waiting for the model, not for the others; counting that time ran it alone right after the
        step, before the requests of that step could ask again, and two streams then took turns, one row per step,
        for good (measured: two clients, 14 steps of 1 row for 14 tokens)."""
        return max(self._first_step_at, self._step_done_at) + self.gather_s

    def _all_asked(self) -> bool:
        """Whether every active request has a step waiting (lock held)."""
        return len(self._steps) >= len(self._active) and self._active <= {id(op.state) for op in self._steps}

    def _ready(self) -> bool:
        """Whether the gathered steps should run now (see the class docstring)."""
        return (self._due_now or self._waiting_rows >= self.max_batch_size or self._all_asked()
                or time.monotonic() >= self._due_at())

    def _take_steps(self) -> list[_StepOp]:
        """The waiting steps, oldest first, up to ``max_batch_size`` rows (at least one request)."""
        taken, rows = [], 0
        while self._steps and (not taken or rows + self._steps[0].rows <= self.max_batch_size):
            op = self._steps.pop(0)
            taken.append(op)
            rows += op.rows
        self._waiting_rows -= rows
        self._due_now = bool(self._steps)  # the rest are due at once
        return taken

    def _loop(self, until: Callable[[], bool] | None = None) -> None:
        with torch.inference_mode():
            while True:
                self._run_tasks()
                if until is not None and until():
                    return
                with self._cond:
                    while not (self._steps or self._passes or self._current is not None or self._resumable
                               or self._new_tasks or self._closed):
                        if until is not None and until():
                            return
                        self._wait(None)
                    if self._resumable or self._new_tasks:
                        continue
                    if self._closed and not self._steps and not self._passes and self._current is None:
                        if not self._paused:
                            return
                        for task in self._paused:  # waiting for a wake that will not come: end them
                            task.failure = RuntimeError("the batching scheduler is closed")
                            self._resumable.append(task)
                        self._paused.clear()
                        continue
                    steps: list[_StepOp] = []
                    if self._steps and (self._closed or self._ready()):
                        steps = self._take_steps()
                    elif not self._runnable() and self._current is None:  # nothing, or prompts waiting to join
                        self._wait(max(self._due_at() - time.monotonic(), 1e-4))
                        continue
                deadline = None  # no step ran: passes run until a step is due
                drain = 0
                if steps:
                    started = time.monotonic()
                    self._run_steps(steps)
                    steps.clear()  # else the idle loop keeps the last step's decode states (and cache slots) alive
                    if self._current is not None:
                        self.steps_within_passes += 1
                    now = self._step_done_at = time.monotonic()
                    self.step_s += now - started
                    deadline = now + max(PASS_SHARE * (now - started), MIN_PASS_S)
                    with self._cond:
                        waiting = len(self._passes) + (self._current is not None)
                        if waiting > WAITING_SERVED_RATIO * len(self._active):
                            drain = self.passes + waiting  # the passes waiting now, all of them, before a step
                started, task_s = time.monotonic(), self.task_s
                self._run_passes(deadline, drain)
                self.pass_s += time.monotonic() - started - (self.task_s - task_s)  # tasks run between passes

    # --- tasks (Scheduler.spawn) -------------------------------------------------------------------------------
    def _park(self, op: _PassOp | _StepOp | None) -> Any:
        """In a task: hand the loop's thread back until ``op`` (queued by the caller) is settled, then return its
        result or raise its exception; ``op=None``: until :meth:`wake_task`."""
        current = greenlet.getcurrent()
        if op is not None:
            op.future.add_done_callback(functools.partial(self._make_ready, current.task))
        with torch.inference_mode():  # the loop's own mode while it runs; the task's comes back when it resumes
            current.parent.switch()
        return None if op is None else op.future.result()

    def _make_ready(self, task: Task, _future: Future | None = None) -> None:
        """``task``'s op is settled: resume it. Ops are settled in the loop's thread, which runs the ready tasks after
        each op; settled anywhere else, the loop is woken."""
        with self._cond:
            self._resumable.append(task)
            if threading.current_thread() is not self._thread:
                self._cond.notify_all()

    def _run_tasks(self) -> None:
        """Resume the ready tasks and start the new ones, each until it parks again or ends, then run what they
        deferred (:meth:`defer`); loop thread."""
        while True:
            with self._cond:
                if self._resumable:
                    task = self._resumable.popleft()
                elif self._new_tasks:
                    task = self._new_tasks.popleft()
                elif self._deferred:
                    task = None
                else:
                    return
            if task is not None:
                self._switch(task)
                continue
            deferred, self._deferred = self._deferred, []
            for fn in deferred:
                try:
                    fn()
                except Exception:  # a caller's bug must not stop the model for everyone
                    logging.getLogger(__name__).exception("deferred callback %r failed", fn)

    def _switch(self, task: Task) -> None:
        """Run ``task`` (loop thread) until it parks or ends; its own tensor work runs on one OpenMP thread, the
        loop's count is restored after."""
        if task.glet is None:
            if not task.future.set_running_or_notify_cancel():
                return  # cancelled before it started
            if self._closed:
                task.future.set_exception(RuntimeError("the batching scheduler is closed"))
                return
            self.tasks += 1
            task.glet = _TaskGreenlet(functools.partial(self._task_main, task), greenlet.getcurrent(), self, task)
            task.glet.gr_context = task.context
        started = time.monotonic()
        threads = set_thread_count(1)
        try:
            task.glet.switch()
        finally:
            if threads is not None:
                set_thread_count(threads)
            self.task_s += time.monotonic() - started

    @staticmethod
    def _task_main(task: Task) -> None:
        try:
            with torch.inference_mode(False), torch.enable_grad():  # as a request thread: the loop's modes are off
                result = task.fn()
        except BaseException as exc:  # reaches the future's owner, never the loop
            task.future.set_exception(exc)
        else:
            task.future.set_result(result)

    def _wait(self, timeout: float | None) -> None:
        """Wait on the condition (lock held); the time counts in ``wait_s`` while some request is decoding."""
        if not self._active:
            self._cond.wait(timeout)
            return
        started = time.monotonic()
        self._cond.wait(timeout)
        self.wait_s += time.monotonic() - started

    def _run_passes(self, deadline: float | None, drain: int = 0) -> None:
        """Advance the passes (the one under way, then queued ones) until ``deadline`` (monotonic seconds), or,
        without one, until a decode step is due; stops only at the cuts of a sliced pass. ``drain``: instead, until
        the :attr:`passes` counter reaches it (:data:`WAITING_SERVED_RATIO`)."""
        self._run_tasks()  # the requests the last step answered ask for their next one: a prompt may join it
        while True:
            op = self._current
            if op is None:
                with self._cond:
                    if not self._runnable(drain):
                        return
                    burst = bool(drain) or not self._active
                # a burst, or nobody decoding: no stream waits, so the prompts run together in one pass, uncut
                joins = self._take_joins(BURST_JOIN_TOKENS) if burst and BURST_JOIN_TOKENS else []
                if joins:
                    self._run_joined([], joins)
                else:
                    with self._cond:
                        runnable = self._runnable(drain)
                        if not runnable:
                            return
                        op = self._current = self._next_pass(runnable)
            if op is not None:
                self._advance(op)
            self._run_tasks()  # the pass's task (and any other ready one) goes on to its next model call
            if drain:
                if self.passes >= drain:
                    return
            elif deadline is not None:
                if time.monotonic() >= deadline:
                    return
            else:
                with self._cond:
                    if self._steps and (self._closed or self._ready()):
                        return

    def _joins_next_step(self, op: _PassOp) -> bool:
        """Whether ``op`` is a prompt that can join a decode step (:data:`JOIN_TOKENS`)."""
        return op.join is not None and 0 < op.join_tokens <= JOIN_TOKENS

    def _runnable(self, drain: int = 0) -> list[_PassOp]:
        """The waiting passes that may start now (lock held): all of them, except that while a decode step is
        gathering (and no burst is being drained) the prompts that can join it wait for it (:data:`JOIN_TOKENS`)
        instead of running between steps."""
        if drain or not self._steps or not JOIN_TOKENS:
            return list(self._passes)
        return [p for p in self._passes if not self._joins_next_step(p)]

    def _next_pass(self, candidates: list[_PassOp]) -> _PassOp:
        """Take the pass among ``candidates`` (waiting ones) whose owner was served longest ago (never served
        first), oldest of that owner's (caller holds the lock; ``candidates`` is not empty)."""
        op = min(candidates, key=lambda p: self._served.get(p.owner, -1))  # min keeps the first of equals
        self._passes.remove(op)
        self._mark_started(op)
        return op

    def _mark_started(self, op: _PassOp) -> None:
        """Count ``op`` as started and its owner as served now (caller holds the lock)."""
        self.passes_started += 1
        self._served[op.owner] = self.passes_started
        if len(self._served) > 4 * self.max_batch_size:  # forget owners long gone
            waiting = {p.owner for p in self._passes}
            self._served = {o: n for o, n in self._served.items() if o in waiting or o == op.owner}

    def _advance(self, op: _PassOp) -> None:
        """Run ``op`` to its next cut (a sliced pass) or to its end; settle its future when it ends."""
        try:
            if op.sliced:
                if op.slices is None:
                    op.slices = op.fn()
                self.slices += 1
                next(op.slices)
                return  # not finished: it goes on after the next decode step
            op.future.set_result(op.fn())
        except StopIteration as done:
            op.future.set_result(done.value)
        except BaseException as exc:  # a failed pass reaches its request, never this thread
            op.future.set_exception(exc)
        self._current = None
        self.passes += 1

    def _take_joins(self, budget: int) -> list[tuple[_PassOp, Any]]:
        """Waiting prefills of at most ``budget`` tokens in all that join one forward pass (:data:`JOIN_TOKENS`),
        in the order :meth:`_next_pass` would start them, each with its :class:`~decodelab.engine.JoiningPrompt`.
        A prefill whose ``join()`` says no stays a pass of its own; one whose ``join()`` fails gets the error."""
        joins: list[tuple[_PassOp, Any]] = []
        while True:
            with self._cond:
                fits = [p for p in self._passes if p.join is not None and p.join_tokens <= budget]
                if not fits:
                    return joins
                op = min(fits, key=lambda p: self._served.get(p.owner, -1))
                place = self._passes.index(op)
                del self._passes[place]
            join, op.join = op.join, None
            try:
                prompt = join()
            except BaseException as exc:  # e.g. no memory for its cache: its request's error, not the step's
                prompt = exc
            with self._cond:
                if prompt is None:  # cannot join after all: back in its place, a pass of its own
                    self._passes.insert(place, op)
                    continue
                self._mark_started(op)
            if isinstance(prompt, BaseException):
                self.passes += 1
                op.future.set_exception(prompt)
                continue
            budget -= op.join_tokens
            joins.append((op, prompt))

    def _run_steps(self, steps: list[_StepOp]) -> None:
        """One decode step for ``steps``, with the waiting short prompts joined to it (:data:`JOIN_TOKENS`)."""
        self._run_joined(steps, self._take_joins(JOIN_TOKENS) if JOIN_TOKENS else [])

    def _run_joined(self, steps: list[_StepOp], joins: list[tuple[_PassOp, Any]]) -> None:
        """One forward pass for the decode ``steps`` (may be empty when ``joins`` is not) and the prefills of
        ``joins``; settles every future."""
        try:
            if joins:
                logits, prefilled = self.engine.step_and_prefill([op.state for op in steps],
                                                                 [op.tokens for op in steps],
                                                                 [prompt for _, prompt in joins])
            else:
                logits, prefilled = self.engine.step_many([op.state for op in steps], [op.tokens for op in steps]), []
        except BaseException as exc:  # an engine failure reaches every request of the pass, never this thread
            for op in steps:
                op.future.set_exception(exc)
            for op, _ in joins:
                self.passes += 1
                op.future.set_exception(exc)
            return
        self.joined += len(joins)
        for (op, _), result in zip(joins, prefilled):
            self.passes += 1
            op.future.set_result(result)
        if not steps:
            return
        rows = sum(op.rows for op in steps)
        self.steps += 1
        self.rows_stepped += rows
        self.max_rows = max(self.max_rows, rows)
        for op, out in zip(steps, logits):
            op.future.set_result(out)

