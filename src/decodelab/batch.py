"""Many generations at once through continuous batching, from Python (``LM.generate_many`` / ``LM.generate_iter``).

Each request is validated first (all of them, before any runs), then runs its own search loop as a task of the
engine's :class:`~decodelab.scheduler.Scheduler` (:meth:`~decodelab.scheduler.Scheduler.spawn`), which runs their
decode steps together, its loop in the calling thread (the thread that loaded the model, which keeps PyTorch at its
speed: :mod:`decodelab.threads`) unless batching was already on. Every request keeps its own
settings, seed, stop rules and trace, and its result equals ``lm.generate(prompt, **its_settings)`` run alone (see
:mod:`decodelab.scheduler` for the kernels where that holds bit for bit).
"""

from __future__ import annotations

import contextlib
import collections
import functools
import queue
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .errors import DecodelabError, InputError
from .search.common import drain

if TYPE_CHECKING:
    from .lm import LM
    from .trace import Generation

DEFAULT_MAX_BATCH_SIZE = 16


@contextlib.contextmanager
def batching(lm: "LM", max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, *, thread: bool = True) -> Iterator[Any]:
    """Continuous batching on ``lm``'s engine for the ``with`` block (see :meth:`Engine.start_batching`): calls
    from several threads (``lm.generate``, ``lm.stream``, ...) share decode steps. Already on: left as it is.
    ``thread=False``: the caller runs the scheduler's loop itself (:meth:`Scheduler.run`). Yields the
    :class:`~decodelab.scheduler.Scheduler`."""
    engine = lm.engine
    started = engine.scheduler is None
    scheduler = engine.start_batching(max_batch_size, thread=thread)
    try:
        yield scheduler
    finally:
        if started:
            engine.stop_batching()


def _requests(requests: Iterable[Any], common: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
    """(prompt, settings) per request: a request is a prompt (str) or a dict with ``prompt`` and its own settings,
    which override ``common``.

    Raises:
        InputError: not a list of prompts / dicts, a dict without ``prompt``, or an empty list.
    """
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Iterable):
        raise InputError(f"invalid requests={requests!r}: expected a list of prompts or of dicts with a 'prompt'",
                         param="requests")
    out = []
    for i, req in enumerate(requests):
        if isinstance(req, dict):
            if "prompt" not in req:
                raise InputError(f"invalid requests[{i}]: a dict needs a 'prompt' key", param="requests")
            settings = {**common, **{k: v for k, v in req.items() if k != "prompt"}}
            out.append((req["prompt"], settings))
        else:
            out.append((req, dict(common)))
    if not out:
        raise InputError("invalid requests=[]: expected at least one request", param="requests")
    return out


def _prepare(lm: "LM", requests, common: dict[str, Any]) -> list:
    """Validate every request (``LM._run``: nothing runs on the model yet). An error names the request's index."""
    runs = []
    for i, (prompt, settings) in enumerate(_requests(requests, common)):
        try:
            runs.append(lm._run(prompt, settings))
        except DecodelabError as exc:
            raise type(exc)(f"requests[{i}]: {exc}", param=getattr(exc, "param", None)) from None
    return runs


def generate_iter(lm: "LM", requests, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                  **common: Any) -> Iterator[tuple[int, "Generation"]]:
    """Run ``requests`` with continuous batching; yield ``(index, Generation)`` as each finishes (finishing order).

    From a thread while batching is on (``lm.batching()``, the server), the requests join the running scheduler and
    the caller waits; from inside one of its tasks (:meth:`~decodelab.scheduler.Scheduler.spawn`) the calling task
    pauses meanwhile, so the model's thread goes on.

    Raises:
        ConfigError, InputError: a bad request, at once, before anything runs (the message starts with
        ``requests[i]``). An error inside a generation is raised when its result is reached.
    """
    runs = _prepare(lm, requests, common)
    own = lm.engine.scheduler is None  # this call starts batching: the calling thread runs the scheduler's loop
    with batching(lm, max_batch_size, thread=not own) as scheduler:
        # called from one of the scheduler's own tasks (a request's code, in the model's thread): blocking on the
        # results would stop the very loop that makes them, so the caller's task pauses until one is in
        caller = None if own else scheduler.current_task()
        waiting = collections.deque(enumerate(runs))
        finished: queue.SimpleQueue[tuple[int, Future]] = queue.SimpleQueue()
        lock = threading.Lock()
        stopped = False  # the consumer stopped early: start nothing more

        def start_next() -> None:  # at most max_batch_size requests at once, as many KV caches
            with lock:
                if stopped or not waiting:
                    return
                i, run = waiting.popleft()
            scheduler.spawn(functools.partial(drain, run)).add_done_callback(functools.partial(done, i))

        def done(i: int, fut: Future) -> None:
            finished.put((i, fut))
            start_next()
            scheduler.wake()
            if caller is not None:
                scheduler.wake_task(caller)

        try:
            for _ in range(min(max_batch_size, len(runs))):
                start_next()
            for _ in range(len(runs)):
                if own:  # the model runs here until some request has finished
                    scheduler.run(until=lambda: not finished.empty())
                while caller is not None and finished.empty():
                    scheduler.pause()
                i, fut = finished.get()
                yield i, fut.result()
        finally:
            with lock:
                stopped = True
            if own:  # requests still running (the consumer stopped early) end their current step, then stop
                scheduler.close()
                scheduler.run()


def generate_many(lm: "LM", requests, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                  **common: Any) -> list["Generation"]:
    """Run ``requests`` with continuous batching and return their results in request order (see
    :func:`generate_iter`)."""
    results: dict[int, Generation] = dict(generate_iter(lm, requests, max_batch_size=max_batch_size, **common))
    return [results[i] for i in range(len(results))]
