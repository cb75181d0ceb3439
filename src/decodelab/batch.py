"""Many generations at once through continuous batching, from Python (``LM.generate_many`` / ``LM.generate_iter``).

Each request is validated first (all of them, before any runs), then runs its own search loop in a worker thread;
the engine's :class:`~decodelab.scheduler.Scheduler` runs their decode steps together, its loop in the calling
thread (the thread that loaded the model, which keeps PyTorch at its speed: :mod:`decodelab.threads`) unless batching
was already on. Every request keeps its own
settings, seed, stop rules and trace, and its result equals ``lm.generate(prompt, **its_settings)`` run alone (see
:mod:`decodelab.scheduler` for the kernels where that holds bit for bit).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
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

    Raises:
        ConfigError, InputError: a bad request, at once, before anything runs (the message starts with
        ``requests[i]``). An error inside a generation is raised when its result is reached.
    """
    runs = _prepare(lm, requests, common)
    own = lm.engine.scheduler is None  # this call starts batching: the calling thread runs the scheduler's loop
    with batching(lm, max_batch_size, thread=not own) as scheduler, ThreadPoolExecutor(
            max_workers=max_batch_size, thread_name_prefix="decodelab-request") as pool:
        futures = {pool.submit(drain, run): i for i, run in enumerate(runs)}
        for fut in futures:
            fut.add_done_callback(lambda _: scheduler.wake())
        try:
            pending = set(futures)
            while pending:
                if own:  # the model runs here until some request has finished
                    scheduler.run(until=lambda: any(f.done() for f in pending))
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=futures.get):
                    yield futures[fut], fut.result()
        finally:
            for fut in futures:
                fut.cancel()
            if own:  # requests still running (the consumer stopped early) end their current step, then stop
                scheduler.close()
                scheduler.run()


def generate_many(lm: "LM", requests, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                  **common: Any) -> list["Generation"]:
    """Run ``requests`` with continuous batching and return their results in request order (see
    :func:`generate_iter`)."""
    results: dict[int, Generation] = dict(generate_iter(lm, requests, max_batch_size=max_batch_size, **common))
    return [results[i] for i in range(len(results))]
