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
        host: interface to bind; loopback by default (the server has no authentication).
        port: TCP port.
        device, dtype, quantize, compile, kernels, quantize_lm_head: passed to :func:`decodelab.load`
            (``compile`` compiles or loads the decode step before serving, printing progress on stderr;
            ``quantize`` is ``int8`` / ``int4`` weight-only; ``kernels`` is ``exact`` or ``fast``).
        log_level: uvicorn's log level.
        **settings: :class:`Settings` fields (``max_tokens``, ``max_n``, ``max_concurrent``, ``max_queue``,
            ``max_body_bytes``, ``request_timeout_s``, ``chat_default_max_tokens``); ``None`` means the default.

    Raises:
        ConfigError: an unknown or bad setting. ModelLoadError: the model cannot be loaded.
    """
    import uvicorn

    import decodelab

    cfg = Settings.from_kwargs(host=host, port=port, **settings)
    lm = decodelab.load(model, device=device, dtype=dtype, quantize=quantize, compile=bool(compile), kernels=kernels,
                        quantize_lm_head=quantize_lm_head)
    if lm.engine.compiled is not None:  # compile (or load the cached compilation) now, not on the first request
        lm.generate("Hello", max_new_tokens=2)
    app = create_app(lm, cfg)
    # On Ctrl-C, in-flight streams get 5 s to finish before uvicorn closes them (their generations then stop).
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["Settings", "create_app", "run"]
