"""Runner: the one queue in front of the model.

Every model call of the server goes through one :class:`Runner`. It runs blocking work in workers, at most
``max_concurrent`` at a time (default 1: one generation at a time, in arrival order), lets at most ``max_queue``
more wait (one more gets :class:`QueueFullError`, a 503), and gives each request ``timeout_s`` seconds, queueing
included (then :class:`RequestTimeoutError`, a 504).

Three ways in:

- :meth:`Runner.run` ``(fn, *args, **kwargs)``: one opaque blocking call. It cannot be interrupted: on a timeout or
  a cancelled request the caller gets its answer at once but the slot stays taken until ``fn`` returns.
- :meth:`Runner.drive` ``(make_gen)``: a generator that yields once per model step (``LM._run`` yields once per
  token) and *returns* the result; the worker checks between steps whether the request was cancelled, timed out or
  its client went away, and stops (closing the generator) so the slot is freed after at most one more step.
- :meth:`Runner.stream` ``(make_iter)``: an async iterator over a blocking iterator's items, pulled in the worker
  a few items ahead of the consumer (:data:`STREAM_AHEAD`); when the consumer stops (client disconnect cancels the
  response task), the worker stops after the item it is computing, the iterator is closed in the worker and the
  slot is freed.

A worker is a task of the continuous-batching scheduler when batching is on (``tasks`` returns the
:class:`~decodelab.scheduler.Scheduler`: :meth:`~decodelab.scheduler.Scheduler.spawn` runs it in the model's own
thread, and its model calls hand that thread back instead of blocking), else a pool thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Generator, Iterator, TypeVar

T = TypeVar("T")


class QueueFullError(Exception):
    """Every model slot is busy and the queue is full (HTTP 503)."""


class RequestTimeoutError(Exception):
    """The request used up ``request_timeout_s`` waiting and generating (HTTP 504)."""


class CancelledGeneration(Exception):
    """The generation was stopped between two steps (client gone, timeout, or request cancelled)."""


class Runner:
    """Queue and worker threads for blocking model work.

    Args:
        max_concurrent: model calls at once (worker threads); >= 1.
        max_queue: requests allowed to wait for a slot beyond the running ones; >= 0.
        timeout_s: seconds per request, waiting included.
        thread_setup: called once in each worker thread when it starts (the app limits the threads' own tensor work
            to one core while the batching scheduler runs the model elsewhere: :mod:`decodelab.threads`).
        tasks: returns the batching scheduler whose tasks the workers are (:meth:`Scheduler.spawn
            <decodelab.scheduler.Scheduler.spawn>`), or ``None``: pool threads. Asked for each request.

    Counters (read-only, for health checks and tests): ``running`` (slots taken), ``admitted`` (running + waiting),
    ``completed``, ``rejected`` (queue full), ``timed_out``, ``cancelled``.
    """

    def __init__(self, max_concurrent: int = 1, max_queue: int = 64, timeout_s: float = 300.0,
                 thread_setup: Callable[[], None] | None = None, tasks: Callable[[], Any] | None = None) -> None:
        self.max_concurrent = max_concurrent
        self.thread_setup = thread_setup
        self.tasks = tasks
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._pool: ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mail: _LoopMail | None = None  # hands streamed items to the event loop (its loop: _mail.loop)
        self.admitted = 0
        self.running = 0
        self.completed = 0
        self.rejected = 0
        self.timed_out = 0
        self.cancelled = 0

    # --- admission and slots -----------------------------------------------------------------------------------
    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._loop is not loop:
            self._slots, self._loop = asyncio.Semaphore(self.max_concurrent), loop
        return self._slots

    def _admit(self) -> None:
        if self.admitted >= self.max_concurrent + self.max_queue:
            self.rejected += 1
            raise QueueFullError(
                f"server busy: {self.running} running and {self.admitted - self.running} queued requests "
                f"(max_concurrent={self.max_concurrent}, max_queue={self.max_queue}); retry later"
            )
        self.admitted += 1

    async def _acquire(self, deadline: float) -> None:
        """Wait for a slot until ``deadline`` (loop time). Raises RequestTimeoutError; on any failure the
        admission is given back."""
        sem = self._semaphore()
        try:
            async with asyncio.timeout_at(deadline):
                await sem.acquire()
        except TimeoutError:
            self.admitted -= 1
            self.timed_out += 1
            raise RequestTimeoutError(self._timeout_message("waiting for the model")) from None
        except BaseException:
            self.admitted -= 1
            raise
        self.running += 1

    def _release(self) -> None:
        """Give the slot and the admission back (loop thread only)."""
        self.running -= 1
        self.admitted -= 1
        self.completed += 1
        assert self._slots is not None
        self._slots.release()

    def _release_when_done(self, fut) -> None:
        """Release the slot once the worker future ``fut`` (concurrent.futures) is finished."""
        loop = asyncio.get_running_loop()

        def done(_f) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown: nothing left to release
                loop.call_soon_threadsafe(self._release)

        fut.add_done_callback(done)

    def _scheduler(self):
        """The scheduler whose tasks the workers are now, or ``None`` (pool threads)."""
        return self.tasks() if self.tasks is not None else None

    def _submit(self, fn: Callable[[], Any], scheduler=None):
        """Submit ``fn`` to a worker (a task of ``scheduler``, else a pool thread), run in a copy of the caller's
        context variables (so the scheduler sees the request's :data:`~decodelab.scheduler.PASS_OWNER`). Raises
        ``RuntimeError`` when shut down."""
        if scheduler is not None:
            return scheduler.spawn(fn)
        return self._executor().submit(contextvars.copy_context().run, fn)

    def _submit_or_release(self, fn: Callable[[], Any], scheduler=None):
        """Submit ``fn`` to the worker; if it is shut down, give the slot back and raise a 503."""
        try:
            return self._submit(fn, scheduler)
        except RuntimeError:
            self._release()
            raise QueueFullError("server is shutting down") from None

    def _timeout_message(self, doing: str) -> str:
        return f"request timed out after {self.timeout_s:g} s {doing} (request_timeout_s={self.timeout_s:g})"

    # --- the three ways in -------------------------------------------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run the blocking ``fn(*args, **kwargs)`` in a worker thread when a slot is free and return its result.

        Raises:
            QueueFullError: too many requests waiting. RequestTimeoutError: ``timeout_s`` passed. Whatever ``fn``
            raises.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        self._admit()
        await self._acquire(deadline)
        fut = self._submit_or_release(functools.partial(fn, *args, **kwargs), self._scheduler())
        self._release_when_done(fut)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), max(deadline - loop.time(), 0.0))
        except asyncio.TimeoutError:
            self.timed_out += 1
            raise RequestTimeoutError(self._timeout_message("running")) from None

    async def drive(
        self,
        make_gen: Callable[[], Generator[Any, None, T]],
        *,
        disconnected: Callable[[], Any] | None = None,
    ) -> T:
        """Run the generator ``make_gen()`` to its end in a worker thread and return its return value.

        Between two items the worker stops when the request timed out, was cancelled, or ``disconnected`` (an async
        callable, e.g. a wait for the client's ``http.disconnect``) finished; the generator is closed in the worker
        and the slot freed.

        Raises:
            QueueFullError, RequestTimeoutError, CancelledGeneration (client gone), or what the generator raises.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        self._admit()
        await self._acquire(deadline)
        stop = threading.Event()
        fut = self._submit_or_release(functools.partial(_drain, make_gen, stop), self._scheduler())
        self._release_when_done(fut)
        result = asyncio.wrap_future(fut)
        # read its outcome whatever happens: once ``work`` (the shield) is cancelled (client gone, timeout), the
        # shield no longer looks at it, and a CancelledGeneration it ends with would be logged as "never retrieved"
        result.add_done_callback(_swallow)
        work = asyncio.ensure_future(asyncio.shield(result))
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            waiting = {work} | ({watcher} if watcher else set())
            done, _ = await asyncio.wait(waiting, timeout=max(deadline - loop.time(), 0.0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                return work.result()
            stop.set()
            if watcher is not None and watcher in done:
                self.cancelled += 1
                raise CancelledGeneration("client disconnected; generation stopped")
            self.timed_out += 1
            raise RequestTimeoutError(self._timeout_message("generating"))
        except asyncio.CancelledError:
            stop.set()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            if not work.done():
                work.cancel()
            work.add_done_callback(_swallow)  # a result nobody awaits (e.g. cancelled while the worker failed)

    async def stream(self, make_iter: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        """Yield the items of the blocking iterator ``make_iter()``, pulled in one worker thread up to
        :data:`STREAM_AHEAD` items ahead of the consumer.

        The worker does not wait for the consumer to ask for each item: a generation's next decode step starts as
        soon as its last item is handed over, while the event loop sends it (under continuous batching the
        scheduler waits for every decoding request to ask for its next step; pulling one item per round trip through
        the event loop made it wait for the loop to serve every stream first: measured on an AMD EPYC, 1.4 s of
        6.7 s with 16 streams, 3.0 s of 11.5 s with 32). A consumer that reads slowly holds its worker after
        :data:`STREAM_AHEAD` items (its request then joins later decode steps).

        The slot is held from the first item to the last. When the consumer stops early (``aclose``, a cancelled
        task: Starlette cancels a streaming response when its client disconnects) the worker stops after the item
        it is computing; the iterator is closed in the worker and the slot released.

        Raises:
            QueueFullError; RequestTimeoutError (``timeout_s`` after the request came, waiting included); what the
            iterator raises.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        self._admit()
        await self._acquire(deadline)
        items: asyncio.Queue = asyncio.Queue()
        scheduler = self._scheduler()
        room = _Room(STREAM_AHEAD, scheduler)  # items the worker may pull before the consumer takes them
        stop = threading.Event()
        if self._mail is None or self._mail.loop is not loop:
            self._mail = _LoopMail(loop)
        fut = self._submit_or_release(functools.partial(_pump, make_iter, self._mail, items, room, stop), scheduler)
        self._release_when_done(fut)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        kind, value = await items.get()
                except TimeoutError:
                    self.timed_out += 1
                    raise RequestTimeoutError(self._timeout_message("generating")) from None
                room.give()
                if kind is _END:
                    return
                if kind is _FAILED:
                    raise value
                yield value
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        finally:
            stop.set()
            room.give()  # wakes a worker waiting for room, which then stops

    def _executor(self) -> ThreadPoolExecutor:
        """The worker threads (created on first use, and again after :meth:`shutdown` if the app restarts)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.max_concurrent, thread_name_prefix="decodelab-model",
                                            initializer=self.thread_setup)
        return self._pool

    def shutdown(self) -> None:
        """Let the worker threads end once their work is done (the app's lifespan calls this at shutdown; a later
        request starts new ones)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=False)


# --- worker-side helpers (run in the worker thread) ------------------------------------------------------------
def _drain(make_gen: Callable[[], Generator[Any, None, T]], stop: threading.Event) -> T:
    gen = make_gen()
    try:
        while True:
            if stop.is_set():
                raise CancelledGeneration("generation stopped: request cancelled or timed out")
            next(gen)
    except StopIteration as done:
        return done.value
    finally:
        gen.close()


class _LoopMail:
    """Entries handed from worker threads to asyncio queues of one event loop, with one wake-up of the loop for all
    the entries put while it had not yet taken the earlier ones.

    ``loop.call_soon_threadsafe`` per entry writes to the loop's wake-up socket every time: with continuous batching,
    16 streams each hand over their token right after the same decode step, and those 16 writes (and the loop's 16
    wake-ups, each taking the GIL from the requests' own search steps) were 23 % of the request threads' samples
    (py-spy, AMD EPYC, 16 streaming clients). Entries reach each queue in the order they were put.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Any]] = []
        self._scheduled = False  # a _deliver call is on its way to the loop

    def put(self, queue: asyncio.Queue, entry: Any, scheduler=None) -> None:
        """Deliver ``entry`` to ``queue`` in the loop's thread (soon). From a task of the batching ``scheduler``, the
        loop is woken once the tasks of this round have all put theirs (:meth:`Scheduler.defer
        <decodelab.scheduler.Scheduler.defer>`): one wake-up per decode step for all streams. Raises nothing: once
        the loop is closed (server shutdown) nobody reads, and the entry is dropped."""
        with self._lock:
            self._pending.append((queue, entry))
            if self._scheduled:
                return
            self._scheduled = True
        if scheduler is not None:
            scheduler.defer(self._wake)
        else:
            self._wake()

    def _wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # loop closed at shutdown
            with self._lock:
                self._pending.clear()
                self._scheduled = False

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        for queue, entry in pending:
            queue.put_nowait(entry)


class _Room:
    """How many more items a stream's worker may pull before its consumer takes them: a semaphore whose wait, in a
    scheduler task, pauses the task (:meth:`Scheduler.pause <decodelab.scheduler.Scheduler.pause>`) instead of
    blocking the model's thread.

    Args:
        ahead: items allowed at first.
        scheduler: the scheduler whose task the worker may be, or ``None``.
    """

    def __init__(self, ahead: int, scheduler=None) -> None:
        self._cond = threading.Condition()
        self._free = ahead
        self.scheduler = scheduler
        self._task = None  # the task paused for room

    def take(self) -> None:
        """Worker: wait until there is room and take one place. Raises ``RuntimeError`` when the scheduler closed
        while its task waited."""
        task = self.scheduler.current_task() if self.scheduler is not None else None
        if task is None:
            with self._cond:
                while self._free <= 0:
                    self._cond.wait()
                self._free -= 1
            return
        while True:
            with self._cond:
                if self._free > 0:
                    self._free -= 1
                    return
                self._task = task
            self.scheduler.pause()

    def give(self) -> None:
        """Consumer: one more place (an item taken, or the consumer stopped). Thread-safe; raises nothing."""
        with self._cond:
            self._free += 1
            task, self._task = self._task, None
            self._cond.notify()
        if task is not None:
            self.scheduler.wake_task(task)


def _pump(make_iter: Callable[[], Iterator[Any]], mail: _LoopMail, items: asyncio.Queue,
          room: _Room, stop: threading.Event) -> None:
    """:meth:`Runner.stream`'s worker: pull the items of ``make_iter()`` into ``items`` (``(_ITEM, item)``, then
    ``(_END, None)`` or ``(_FAILED, exception)``), each after taking ``room``; stop when ``stop`` is set; close the
    iterator here, in the thread that ran it."""

    def put(kind, value) -> None:
        mail.put(items, (kind, value), room.scheduler)

    it = None
    try:
        it = iter(make_iter())
        while True:
            room.take()
            if stop.is_set():
                return
            try:
                item = next(it)
            except StopIteration:
                put(_END, None)
                return
            put(_ITEM, item)
    except BaseException as exc:  # reaches the consumer, never the pool
        put(_FAILED, exc)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()


_END = object()
_ITEM, _FAILED = object(), object()  # Runner.stream's queue entries: an item, the iterator's exception

STREAM_AHEAD = 8
"""Items :meth:`Runner.stream`'s worker may pull before its consumer takes them."""


def _swallow(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
