"""One place that turns every failure into an OpenAI-style error response.

Body: ``{"error": {"message": str, "type": str, "param": str | null, "code": str | null}}``. Statuses:

==========================================================  ======  ==========================
what went wrong                                             status  ``type`` / ``code``
==========================================================  ======  ==========================
malformed JSON body                                         400     invalid_request_error / invalid_json
wrong JSON types, missing or unknown fields, documented     400     invalid_request_error / invalid_type,
OpenAI ranges, text that is not valid Unicode                       missing, unknown_parameter, invalid_value
:class:`~decodelab.errors.ConfigError` (bad parameter)      400     invalid_request_error / invalid_value
:class:`~decodelab.errors.InputError` (empty / too long)    400     invalid_request_error / invalid_input or
                                                                    context_length_exceeded
missing or wrong API key (server started with keys)         401     invalid_request_error / missing_api_key or
                                                                    invalid_api_key
:class:`~decodelab.errors.ModelLoadError`                   404     invalid_request_error / model_not_found
unknown route (any method)                                  404     invalid_request_error / not_found
wrong method on a known route                               405     invalid_request_error / method_not_allowed
body larger than ``max_body_bytes``                         413     invalid_request_error / request_too_large
the client already holds ``max_client_requests`` requests   429     rate_limit_error / rate_limit_exceeded
queue full                                                  503     server_busy / queue_full
request timeout                                             504     timeout / request_timeout
anything else (a bug, logged with its traceback)            500     server_error / internal_error
==========================================================  ======  ==========================

As OpenAI and llama.cpp do, every invalid body is a 400 (FastAPI's default would be a 422). The 401 and 429 come
from :mod:`decodelab.server.access`, the 413 from :class:`BodyLimitMiddleware`; 429 and 503 carry ``Retry-After``.
``param`` names the offending field (``"temperature"``, ``"messages.0.content"``) when there is one.
"""

from __future__ import annotations

import json
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import DecodelabError, InputError, ModelLoadError
from .runner import CancelledGeneration, QueueFullError, RequestTimeoutError

log = logging.getLogger("decodelab.server")


class ErrorBody(BaseModel):
    """The ``error`` object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """An OpenAI-style error response."""

    error: ErrorBody


# For route decorators: ``@router.post(..., responses=ERROR_RESPONSES)`` documents the error statuses.
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "Invalid body: malformed JSON, wrong JSON types, missing or unknown fields, values outside the "
              "documented ranges, or a parameter decodelab cannot use (the message names it)"),
        (401, "Missing or wrong API key (only when the server was started with keys)"),
        (413, "Request body larger than the server's limit"),
        (429, "This client already has max_client_requests requests in flight or queued; retry after Retry-After "
              "seconds"),
        (503, "Server busy: the request queue is full"),
        (504, "Request timed out"),
    )
}


def error_payload(message: str, type_: str = "invalid_request_error", param: str | None = None,
                  code: str | None = None) -> dict:
    """The JSON body of an error."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """A :class:`JSONResponse` with an OpenAI-style error body."""
    return JSONResponse(error_payload(message, type_, param, code), status_code=status)


def decodelab_error_status(exc: DecodelabError) -> tuple[int, str]:
    """(HTTP status, ``code``) for a decodelab error."""
    if isinstance(exc, ModelLoadError):
        return 404, "model_not_found"
    if isinstance(exc, InputError):
        return 400, "context_length_exceeded" if "context window" in str(exc) else "invalid_input"
    return 400, "invalid_value"


def exception_payload(exc: BaseException) -> tuple[int, dict]:
    """(status, body) for an exception raised while a response is already streaming (sent as an SSE event)."""
    if isinstance(exc, DecodelabError):
        status, code = decodelab_error_status(exc)
        return status, error_payload(str(exc), param=exc.param, code=code)
    if isinstance(exc, RequestTimeoutError):
        return 504, error_payload(str(exc), "timeout", code="request_timeout")
    if isinstance(exc, QueueFullError):
        return 503, error_payload(str(exc), "server_busy", code="queue_full")
    log.exception("internal error while streaming", exc_info=exc)
    return 500, error_payload("internal server error (logged)", "server_error", code="internal_error")


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "null", "function-after", "function-before",
              "function-wrap", "function-plain", "tagged-union", "literal", "json-or-python"}


def _loc_param(loc: tuple | list) -> str | None:
    """``("body", "messages", 0, "content", "str")`` -> ``"messages.0.content"`` (pydantic adds union members' type
    names to ``loc``; they are not parameters)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    kept = [p for p in parts if p not in _TYPE_TAGS and "[" not in p and "(" not in p]
    return ".".join(kept) or None


def _shown(received) -> str:
    try:
        return json.dumps(received)[:120]
    except (TypeError, ValueError):
        return repr(received)[:120]


def _tag(loc: tuple | list) -> tuple[int, str] | None:
    """(position, name) of the first union-member type name pydantic put in ``loc``, if any."""
    for i, p in enumerate(loc):
        if isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or "(" in p):
            return i, p
    return None


_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
                           "finite_number", "too_short", "too_long", "string_too_short", "string_too_long",
                           "string_pattern_mismatch", "literal_error"})
"""pydantic error types of a value of the right type out of its documented range: code ``invalid_value``."""


def validation_error(errors: list[dict]) -> tuple[str, str | None, str]:
    """(one-line message, ``param``, ``code``) for pydantic's validation ``errors`` (the first one is reported;
    when it comes from a union, such as ``prompt``'s, the message lists the accepted forms instead)."""
    first = errors[0] if errors else {}
    loc = tuple(first.get("loc", ()))
    kind = first.get("type")
    code = {"missing": "missing", "extra_forbidden": "unknown_parameter", "value_error": "invalid_value"}.get(
        kind, "invalid_value" if kind in _RANGE_ERRORS else "invalid_type")
    received = first.get("input")
    if kind in _RANGE_ERRORS and isinstance(received, float) and not math.isfinite(received):
        first = {**first, "msg": "expected a finite number"}  # NaN fails every comparison: say what is wrong
    tag = _tag(loc)
    if tag is not None:  # a union: which member failed first is arbitrary, so name the accepted forms
        head = loc[: tag[0]]
        forms = list(dict.fromkeys(t[1] for e in errors if tuple(e.get("loc", ()))[: tag[0]] == head
                                   and (t := _tag(e.get("loc", ()))) is not None and t[0] == tag[0]))
        if len(forms) > 1 and kind != "value_error":
            param = _loc_param(head) or "body"
            # the field's whole value: carried by an error on a member itself (``str``), not inside one (``list[int]``)
            received = next((e.get("input") for e in errors if len(e.get("loc", ())) == tag[0] + 1
                             and tuple(e["loc"][: tag[0]]) == head), "...")
            return f"invalid {param}={_shown(received)}: expected one of {', '.join(forms)}", param, "invalid_type"
    param = _loc_param(loc)
    message = f"invalid {param or 'body'}={_shown(first.get('input'))}: {first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return " ".join(message.split()), param, code


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx", {}) or {}
        message = " ".join(f"malformed JSON body: {ctx.get('error', 'cannot parse')}".split())
        return error_response(400, message, code="invalid_json")
    if first.get("type") == "model_attributes_type" and tuple(first.get("loc", ())) == ("body",) and isinstance(
            first.get("input"), (bytes, str)):  # a body FastAPI did not parse as JSON (no JSON Content-Type)
        kind = request.headers.get("content-type") or "none"
        return error_response(400, f"the body must be a JSON object sent with Content-Type: application/json "
                                   f"(got Content-Type: {kind})", code="invalid_json")
    message, param, code = validation_error(errors)
    return error_response(400, message, param=param, code=code)


async def _decodelab_handler(request: Request, exc: DecodelabError) -> JSONResponse:
    status, code = decodelab_error_status(exc)
    return error_response(status, str(exc), param=exc.param, code=code)


async def _http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    status = exc.status_code
    if status == 400 and detail == "There was an error parsing the body":  # FastAPI: not UTF-8, not JSON
        return error_response(400, "malformed JSON body: it is not UTF-8 JSON text", code="invalid_json")
    headers = getattr(exc, "headers", None)
    if status in (404, 405) and detail in ("Not Found", "Method Not Allowed"):
        # the playground's static files (mounted at /) answer every path: a 405 from them (POST /v1/nothing) is an
        # unknown route, and their 404 for a known API path (GET /v1/completions) is a wrong method
        known = _known_path(request)
        headers = headers if known and status == 405 else None  # keep a real route's Allow header
        status = 405 if known else 404
        path = json.dumps(request.url.path)[1:-1][:200]  # escaped and cut: the path is the client's
        detail = (f"method {request.method} not allowed on {path}" if known
                  else f"unknown route {request.method} {path}")
    type_ = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(error_payload(detail, type_, code=codes.get(status)), status_code=status, headers=headers)


def _known_path(request: Request) -> bool:
    """Whether a route other than a catch-all mount (the playground's static files at ``/``) has this path."""
    scope = {**request.scope, "method": "GET"}
    for route in request.app.router.routes:
        if isinstance(route, Mount):
            continue
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return True
    return False


async def _queue_full_handler(request: Request, exc: QueueFullError) -> JSONResponse:
    return JSONResponse(error_payload(str(exc), "server_busy", code="queue_full"), status_code=503,
                        headers={"Retry-After": "1"})


async def _timeout_handler(request: Request, exc: RequestTimeoutError) -> JSONResponse:
    return error_response(504, str(exc), "timeout", code="request_timeout")


async def _cancelled_handler(request: Request, exc: CancelledGeneration) -> JSONResponse:
    return error_response(499, str(exc), "cancelled", code="cancelled")


async def _internal_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error (logged)", "server_error", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler above on ``app`` (routes added later get them too)."""
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(DecodelabError, _decodelab_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(QueueFullError, _queue_full_handler)
    app.add_exception_handler(RequestTimeoutError, _timeout_handler)
    app.add_exception_handler(CancelledGeneration, _cancelled_handler)
    app.add_exception_handler(Exception, _internal_handler)


class BodyLimitMiddleware:
    """ASGI middleware: reads the whole request body (at most ``max_bytes``) before the app sees it.

    A ``Content-Length`` above the limit, or more bytes than the limit actually sent, gets a 413 without reaching
    the app; the rest of an oversized body is read and dropped (up to 16x the limit) so the client sees the answer
    instead of a reset connection. After the body, ``receive`` is the server's own, so disconnects still arrive.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await _send_json(send, 400, error_payload("invalid Content-Length header", code="invalid_header"))
                    return
        if length is not None and length > self.max_bytes:
            await self._drain(receive, 0)
            await _send_json(send, 413, self._too_large(length))
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                if more:
                    await self._drain(receive, size)
                await _send_json(send, 413, self._too_large(size))
                return
            chunks.append(body)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, size: int) -> dict:
        return error_payload(
            f"request body of {size} bytes exceeds the server's limit of {self.max_bytes} bytes (max_body_bytes)",
            param="body", code="request_too_large")

    async def _drain(self, receive: Receive, size: int) -> None:
        cap = 16 * self.max_bytes
        while size <= cap:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


async def _send_json(send: Send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
