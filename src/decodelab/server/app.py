"""The FastAPI application: one fixed model, OpenAI routes, inspection routes, the playground's static files.

``create_app(lm, settings)`` builds the app around an already loaded :class:`decodelab.LM`. It sets
``app.state.lm``, ``app.state.settings``, ``app.state.runner`` (the :class:`~decodelab.server.runner.Runner`
every model call goes through) and ``app.state.access`` (API keys and the per-client limit), registers the
OpenAI-style error handlers (:mod:`decodelab.server.errors`), and mounts the playground's shipped files
(:class:`~decodelab.server.files.PackageFiles`) at ``/`` last so API routes win.

Middleware, outermost first: the request log (:mod:`~decodelab.server.requestlog`), CORS (only with
``allowed_origins``), the body-size limit, then keys and the per-client limit (:mod:`~decodelab.server.access`).

No route can load a model or read a path: the model is chosen when the server starts.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from fastapi import FastAPI

from .. import __version__
from ..threads import limit_current_thread
from .access import Access, AccessMiddleware, document_security
from .errors import BodyLimitMiddleware, install_error_handlers
from .files import PackageFiles
from .requestlog import RequestLogMiddleware
from .runner import Runner
from .settings import Settings

STATIC_DIR = Path(__file__).parent / "static"

API_DESCRIPTION = """\
decodelab's server: an OpenAI-compatible API over one local model, fixed when the server starts, plus an
inspection API for the web playground.

* `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`: OpenAI's request and response shapes
  (logprobs, echo, streaming with `data: [DONE]`, `n`, `stop`, `seed`, usage, finish_reason). Extensions in the
  request body use transformers' `GenerationConfig` names (`top_k`, `min_p`, `repetition_penalty`, `num_beams`...).
* **Logprobs** are taken from the model's raw next-token distribution (log-softmax of the logits), *before*
  temperature, penalties, logit_bias and top-k/top-p/min-p filtering; so every position lists exactly the requested
  number of alternatives, sorted, finite, and the chosen token's value equals its entry when listed.
* Errors: `{"error": {"message", "type", "param", "code"}}` with 400 (bad value, empty or over-long prompt),
  401 (missing or wrong API key, when the server has keys), 404, 413 (body too large), 429 (this client already has
  `max_client_requests` requests in flight; see `Retry-After`), 503 (queue full), 504 (timeout).
* Authentication: when the server was started with `--api-key`, every `/v1` and `/api` route needs
  `Authorization: Bearer <key>`; `/health`, these docs and the playground's files stay open.
"""


def create_app(lm, settings: Settings | None = None) -> FastAPI:
    """Build the server application around ``lm``.

    Args:
        lm: a loaded :class:`decodelab.LM` (read-only from here on).
        settings: limits and names; defaults to :class:`Settings()`.

    Returns:
        The FastAPI app; ``app.state`` holds ``lm``, ``settings``, ``runner``, ``access``.
    """
    settings = settings or Settings()
    def worker_setup() -> None:  # a worker that hands the model's work to the scheduler: no intra-op threads of its own
        if lm.engine.scheduler is not None:
            limit_current_thread()

    runner = Runner(settings.concurrency, settings.max_queue, settings.request_timeout_s, thread_setup=worker_setup,
                    tasks=lambda: lm.engine.scheduler)

    def start_batching() -> None:
        if settings.max_batch_size > 1:
            lm.engine.start_batching(settings.max_batch_size)

    start_batching()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        start_batching()
        yield
        runner.shutdown()
        lm.engine.stop_batching()

    app = FastAPI(title="decodelab", version=__version__, description=API_DESCRIPTION, lifespan=lifespan)
    app.state.lm = lm
    app.state.settings = settings
    app.state.runner = runner
    install_error_handlers(app)
    open_paths = [p for p in ("/health", app.openapi_url, app.docs_url, app.redoc_url,
                              app.swagger_ui_oauth2_redirect_url) if p]
    # add_middleware puts each one outside the ones before it
    access = Access(settings.keys, settings.max_client_requests, open_paths)
    app.state.access = access
    app.add_middleware(AccessMiddleware, access=access)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "Accept"], max_age=600)
    app.add_middleware(RequestLogMiddleware, log_bodies=settings.log_requests)

    from .routes_openai import router as openai_router

    app.include_router(openai_router)
    try:
        from .routes_inspect import router as inspect_router
    except ImportError as exc:  # only while routes_inspect.py is not written yet
        if getattr(exc, "name", None) not in (f"{__package__}.routes_inspect",):
            raise
    else:
        app.include_router(inspect_router)

    @app.get("/health", tags=["server"], summary="Liveness and queue counters")
    async def health() -> dict:
        """``{"status": "ok", "model", "running", "queued", "completed", "rejected", "timed_out", "cancelled",
        "rate_limited", "unauthorized", "auth", "batching"}``; ``rate_limited``: 429s sent by the per-client limit;
        ``unauthorized``: 401s; ``auth``: whether API keys are required; ``batching`` (``null`` when off):
        ``max_batch_size``, decode ``steps`` run, ``rows_stepped``, ``max_rows`` of one step, ``joined`` (prompts
        prefilled together with a decode step or with other prompts in one pass), ``step_s`` / ``pass_s`` /
        ``wait_s`` / ``task_s`` (seconds in decode steps / in prefills and other passes / waiting for decoding requests
        to ask / running the requests' own work, their search steps, in the model's thread)."""
        scheduler = lm.engine.scheduler
        batching = None if scheduler is None else {
            "max_batch_size": scheduler.max_batch_size, "steps": scheduler.steps,
            "rows_stepped": scheduler.rows_stepped, "max_rows": scheduler.max_rows, "joined": scheduler.joined,
            "step_s": round(scheduler.step_s, 3), "pass_s": round(scheduler.pass_s, 3),
            "wait_s": round(scheduler.wait_s, 3), "task_s": round(scheduler.task_s, 3)}
        return {
            "batching": batching,
            "status": "ok",
            "model": model_name(app),
            "running": runner.running,
            "queued": runner.admitted - runner.running,
            "completed": runner.completed,
            "rejected": runner.rejected,
            "timed_out": runner.timed_out,
            "cancelled": runner.cancelled,
            "rate_limited": access.limiter.rejected,
            "unauthorized": access.unauthorized,
            "auth": bool(settings.keys),
        }

    if settings.keys:
        plain_openapi = app.openapi

        def keyed_openapi() -> dict:
            if app.openapi_schema is None:
                app.openapi_schema = document_security(plain_openapi())
            return app.openapi_schema

        app.openapi = keyed_openapi
    if STATIC_DIR.is_dir():
        app.mount("/", PackageFiles(STATIC_DIR), name="static")
    return app


def model_name(app: FastAPI) -> str:
    """The model name the server reports: ``settings.model`` when set, else the loaded model's name."""
    return app.state.settings.model or app.state.lm.name
