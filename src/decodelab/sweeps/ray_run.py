"""Running a sweep on Ray Data: one actor per model replica, each a :class:`~decodelab.sweeps.worker.Worker`.

The pending tasks become a dataset (``ray.data.from_items``); ``map_batches`` with a callable class and
``compute=ray.data.ActorPoolStrategy(size=actors)`` sends batches of tasks to a fixed pool of actors, each of which
loads the model once and runs its batch through the batched engine, yielding rows as requests finish; the driver
streams them back with ``iter_batches`` and appends them to ``generations.jsonl`` as they arrive (so a killed Ray
sweep resumes like a local one). Nothing here schedules work itself: Ray Data does.

CPUs: an actor asks Ray for ``actor_cpus`` CPUs (default: ``min(1, (cluster CPUs - 1) / actors)``, at least 0.25),
so at least one CPU stays free for Ray Data's own tasks; actors that took every CPU would leave the dataset's read and
split tasks waiting for ever on a small machine. Each actor sets torch to ``threads`` intra-op threads (default: the
driver's CPU count / actors when Ray runs on this machine, else the actor's CPU share rounded up).

Connecting: ``address=None`` joins a cluster this process already started (``ray.init`` was called) or starts a
local one sized to this machine; an address (``host:port``, ``ray://host:port`` or ``auto``) joins an existing
cluster, checked first with a plain TCP connection so that an unreachable address fails in seconds with one line.
Remote clusters need decodelab (with the model) installed on every node.
"""

from __future__ import annotations

import json
import math
import os
import socket
from typing import Any, Iterator

from ..errors import InputError

CONNECT_TIMEOUT_S = 5.0


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``host:port`` or ``ray://host:port`` address; ``None`` for ``auto`` / ``local``."""
    addr = address.strip()
    if addr in ("auto", "local"):
        return None
    if "://" in addr:
        scheme, _, addr = addr.partition("://")
        if scheme != "ray":
            raise InputError(f"invalid --ray-address={address!r}: expected host:port, ray://host:port or auto",
                             param="ray_address")
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"invalid --ray-address={address!r}: expected host:port, ray://host:port or auto",
                         param="ray_address")
    return host.strip("[]"), int(port)


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast when nothing listens at ``address`` (a TCP connect with ``timeout`` seconds).

    Raises:
        InputError: a malformed address, or no answer (one line with the reason).
    """
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(f"cannot reach the Ray cluster at --ray-address={address!r}: {reason}",
                         param="ray_address") from None


def import_ray():
    """``ray`` with ``ray.data``, or an InputError saying how to install them."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ModuleNotFoundError:
        raise InputError("--ray needs Ray Data: pip install 'decodelab[ray]'", param="ray") from None
    return ray


def connect(address: str | None) -> bool:
    """Join or start a Ray cluster (see the module docstring); return whether this call started the connection
    (the caller then shuts it down).

    Raises:
        InputError: Ray is not installed, or the cluster cannot be reached.
    """
    if address is not None:
        check_address(address)
    ray = import_ray()
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    try:
        if address is None:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
        raise InputError(f"cannot connect to the Ray cluster at --ray-address={address!r}: "
                         f"{' '.join(str(exc).split())[:160]}", param="ray_address") from None
    return True


def _quiet(ray) -> None:
    """No Ray Data progress bars or per-operator progress logs (the sweep draws its own bars)."""
    import logging

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray.data", "ray.data._internal.execution", "ray.data._internal.progress"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _Actor:
    """The callable class that Ray Data instantiates once per actor: a Worker over one model replica."""

    def __init__(self, model, judge_model, load_options, max_batch_size, threads, chunk) -> None:
        from .worker import Worker

        self.worker = Worker.load(model, judge_model=judge_model, load_options=load_options,
                                  max_batch_size=max_batch_size, threads=threads)
        self.chunk = chunk

    def __call__(self, batch: dict[str, Any]) -> Iterator[dict[str, list]]:
        tasks = [json.loads(t) for t in batch["task"]]
        pending: list[str] = []
        for rows in self.worker.run(tasks):
            pending.extend(json.dumps(r, ensure_ascii=False) for r in rows)
            if len(pending) >= self.chunk:
                yield {"row": pending}
                pending = []
        if pending:
            yield {"row": pending}


def run(tasks: list[dict[str, Any]], *, model: str | None, judge_model: str | None, load_options: dict,
        max_batch_size: int, actors: int, actor_cpus: float | None = None, threads: int | None = None,
        local_cluster: bool = True, batch_size: int | None = None) -> Iterator[list[dict[str, Any]]]:
    """Run ``tasks`` on the connected cluster with ``actors`` model replicas; yield rows as batches come back."""
    ray = import_ray()
    _quiet(ray)
    cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    if actor_cpus is None:
        actor_cpus = max(0.25, min(1.0, (cluster_cpus - 1.0) / actors))
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // actors) if local_cluster else max(1, math.ceil(actor_cpus))
    if batch_size is None:  # a few batches per actor: work spreads evenly, each batch keeps the engine busy
        batch_size = max(1, min(64, math.ceil(len(tasks) / (actors * 4))))
    items = [{"task": json.dumps(t, ensure_ascii=False)} for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
    ds = ds.map_batches(
        _Actor,
        fn_constructor_kwargs={"model": model, "judge_model": judge_model, "load_options": load_options,
                               "max_batch_size": max_batch_size, "threads": threads, "chunk": max(1, batch_size // 4)},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus,
        batch_format="numpy",
    )
    for out in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        yield [json.loads(r) for r in out["row"]]
