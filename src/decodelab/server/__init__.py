"""decodelab's HTTP server: an OpenAI-compatible API plus the inspection API and the web playground.

    >>> from decodelab.server import run
    >>> run()                                  # embedded model on http://127.0.0.1:8000 (blocks)

or ``decodelab serve [--model M] [--host H] [--port P]``. For notebooks, benchmarks and tests, :func:`create_app`
builds the FastAPI app around an already loaded :class:`decodelab.LM`, and :class:`BackgroundServer` serves it on a
free loopback port in a background thread (public API)::

    >>> with BackgroundServer(create_app(lm)) as srv:
    ...     openai.OpenAI(base_url=srv.url + "/v1", api_key="none").completions.create(...)
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from ..engine_config import EngineConfig
from ..errors import ConfigError, InputError
from .background import BackgroundServer
from .settings import Settings


def create_app(lm, settings: Settings | None = None):
    """See :func:`decodelab.server.app.create_app`."""
    from .app import create_app as _create_app

    return _create_app(lm, settings)


def run(model: str | None = None, host: str = "127.0.0.1", port: int = 8000, *, engine: EngineConfig | None = None,
        log_level: str = "info", **options: Any) -> None:
    """Load ``model`` once (``decodelab.load``), build the app and serve it with uvicorn until interrupted.

    Args:
        model: model id / path / ``.gguf`` (``None``: ``$DECODELAB_MODEL`` or the embedded SmolLM2-135M-Instruct).
        host: interface to bind; loopback by default. Another address with no API key prints a warning on stderr
            (:meth:`Settings.exposure_warning`).
        port: TCP port.
        engine: the :class:`~decodelab.EngineConfig` to load with (device, dtype, kernels, quantize, compile...;
            ``compile`` compiles or loads the decode step before serving, printing progress on stderr).
        log_level: the log level of uvicorn and of decodelab's request log (one line per request, see
            :mod:`decodelab.server.requestlog`; uvicorn's own access log is off).
        **options: :class:`Settings` fields (``max_tokens``, ``max_n``, ``max_concurrent``, ``max_queue``,
            ``max_body_bytes``, ``request_timeout_s``, ``chat_default_max_tokens``, ``api_keys``, ``api_keys_file``,
            ``max_client_requests``, ``allowed_origins``, ``log_requests``...); ``None`` means the default. With
            neither ``api_keys`` nor ``api_keys_file``, keys come from ``$DECODELAB_API_KEY``. Without ``engine``,
            :class:`EngineConfig` fields (``device``, ``dtype``, ``kernels``, ``quantize``...) too, folded into one.

    Raises:
        ConfigError: an unknown or bad setting or engine option (before the model loads). ModelLoadError: the model
            cannot be loaded. InputError: the address cannot be listened on (a port in use), before the model loads.
    """
    import sys

    import uvicorn

    import decodelab

    engine_options = {k: options.pop(k) for k in list(options) if k in EngineConfig.names()}
    if engine is None:
        engine = EngineConfig.from_kwargs(**engine_options)
    elif engine_options:
        raise ConfigError(f"invalid engine: run() takes engine=EngineConfig(...) or engine keywords, not both "
                          f"(got {', '.join(engine_options)})", param="engine")
    cfg = Settings.from_kwargs(host=host, port=port, **options)
    warning = cfg.exposure_warning()
    if warning:
        print(warning, file=sys.stderr, flush=True)
    sock = _listen(cfg.host, cfg.port)  # a port in use fails now, in one line, not after the model has loaded
    lm = decodelab.load(model, engine=engine)
    if lm.engine.compiled is not None:  # compile (or load the cached compilation) now, not on the first request
        lm.generate("Hello", max_new_tokens=2)
    # The model runs in this (the main) thread, where it was loaded: the batching scheduler's loop (also with
    # max_batch_size=1, then one request at a time) runs here and uvicorn in a thread. A model driven from a second
    # thread runs ~1.5x slower on PyTorch's OpenMP (decodelab.threads).
    scheduler = lm.engine.start_batching(cfg.max_batch_size, thread=False)
    app = create_app(lm, cfg)
    # On Ctrl-C, in-flight streams get 5 s to finish before uvicorn closes them (their generations then stop).
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level, timeout_graceful_shutdown=5,
                            access_log=False, log_config=log_config(log_level))
    _serve_with_model_in_main_thread(uvicorn.Server(config), sock, scheduler)


def _serve_with_model_in_main_thread(server, sock: socket.socket, scheduler) -> None:
    """Run uvicorn ``server`` on ``sock`` in a thread and ``scheduler``'s loop here until the server has stopped.
    SIGINT / SIGTERM ask uvicorn to shut down gracefully (the loop keeps serving the streams still running); a second
    one forces it."""
    import signal

    def http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            scheduler.wake()

    def stop(_signum, _frame) -> None:
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True
        scheduler.wake()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="decodelab-http", daemon=True)
    try:
        thread.start()
        scheduler.run(until=lambda: not thread.is_alive())
        thread.join(timeout=10)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        scheduler.close()


def _listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (uvicorn listens on it).

    Raises:
        InputError: the address cannot be bound (in use, not an address of this machine); one line naming it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"invalid port={port}: cannot listen on {host}:{port} ({exc.strerror or exc})",
                         param="port") from None
    sock.set_inheritable(True)
    return sock


def log_config(level: str = "info") -> dict:
    """uvicorn's logging configuration plus the ``decodelab`` loggers (the request log, errors) on its stderr
    handler at ``level``."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["decodelab"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


__all__ = ["BackgroundServer", "Settings", "create_app", "run"]
