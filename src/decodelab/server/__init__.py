"""decodelab's HTTP server: an OpenAI-compatible API plus the inspection API and the web playground.

    >>> from decodelab.server import run
    >>> run()                                  # embedded model on http://127.0.0.1:8000 (blocks)

or ``decodelab serve [--model M] [--host H] [--port P]``. For tests and embedding, :func:`create_app` builds the
FastAPI app around an already loaded :class:`decodelab.LM`.
"""

from __future__ import annotations

from typing import Any

from .settings import Settings


def create_app(lm, settings: Settings | None = None):
    """See :func:`decodelab.server.app.create_app`."""
    from .app import create_app as _create_app

    return _create_app(lm, settings)


def run(model: str | None = None, host: str = "127.0.0.1", port: int = 8000, *, device=None, dtype=None,
        quantize: str | None = None, compile: bool = False, kernels: str = "exact", quantize_lm_head: bool = False,
        log_level: str = "info", **settings: Any) -> None:
    """Load ``model`` once (``decodelab.load``), build the app and serve it with uvicorn until interrupted.

    Args:
        model: model id / path / ``.gguf`` (``None``: ``$DECODELAB_MODEL`` or the embedded SmolLM2-135M-Instruct).
        host: interface to bind; loopback by default. Another address with no API key prints a warning on stderr
            (:meth:`Settings.exposure_warning`).
        port: TCP port.
        device, dtype, quantize, compile, kernels, quantize_lm_head: passed to :func:`decodelab.load`
            (``compile`` compiles or loads the decode step before serving, printing progress on stderr;
            ``quantize`` is ``int8`` / ``int4`` weight-only; ``kernels`` is ``exact`` or ``fast``).
        log_level: the log level of uvicorn and of decodelab's request log (one line per request, see
            :mod:`decodelab.server.requestlog`; uvicorn's own access log is off).
        **settings: :class:`Settings` fields (``max_tokens``, ``max_n``, ``max_concurrent``, ``max_queue``,
            ``max_body_bytes``, ``request_timeout_s``, ``chat_default_max_tokens``, ``api_keys``, ``api_keys_file``,
            ``max_client_requests``, ``allowed_origins``, ``log_requests``...); ``None`` means the default. With
            neither ``api_keys`` nor ``api_keys_file``, keys come from ``$DECODELAB_API_KEY``.

    Raises:
        ConfigError: an unknown or bad setting. ModelLoadError: the model cannot be loaded.
    """
    import sys

    import uvicorn

    import decodelab

    cfg = Settings.from_kwargs(host=host, port=port, **settings)
    warning = cfg.exposure_warning()
    if warning:
        print(warning, file=sys.stderr, flush=True)
    lm = decodelab.load(model, device=device, dtype=dtype, quantize=quantize, compile=bool(compile), kernels=kernels,
                        quantize_lm_head=quantize_lm_head)
    if lm.engine.compiled is not None:  # compile (or load the cached compilation) now, not on the first request
        lm.generate("Hello", max_new_tokens=2)
    app = create_app(lm, cfg)
    # On Ctrl-C, in-flight streams get 5 s to finish before uvicorn closes them (their generations then stop).
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=log_level, timeout_graceful_shutdown=5,
                access_log=False, log_config=log_config(log_level))


def log_config(level: str = "info") -> dict:
    """uvicorn's logging configuration plus the ``decodelab`` loggers (the request log, errors) on its stderr
    handler at ``level``."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["decodelab"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


__all__ = ["Settings", "create_app", "run"]
