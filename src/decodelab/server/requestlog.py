"""One log line per request, on the ``decodelab.server.requests`` logger (INFO).

By default the line holds no text a user wrote or the model produced::

    POST /v1/completions 200 0.412s client=key#2 in=61B out=398B

(method, path, status, seconds until the response ended, the client as :mod:`decodelab.server.access` names it:
``key#N`` or the IP address, request and response body sizes). Headers, the query string and API keys are never
logged. With ``log_bodies`` (``--log-requests``) two more lines give the request body and the response body (a
streamed one as sent), each cut at :data:`BODY_LOG_CHARS` characters.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .access import CLIENT_SCOPE_KEY

log = logging.getLogger("decodelab.server.requests")

BODY_LOG_CHARS = 4000
PATH_LOG_CHARS = 200


def _shown(data: bytes | str, limit: int, total: int | None = None) -> str:
    """``data`` as one printable line (control characters escaped), cut at ``limit`` characters; ``total``: the
    size in bytes of the whole, noted when ``data`` is only its start."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    cut = len(text) > limit or (total is not None and total > len(data))
    shown = repr(text[:limit])[1:-1]
    return shown + (f"... ({total if total is not None else len(data)} bytes in all)" if cut else "")


class RequestLogMiddleware:
    """ASGI middleware writing the line above for every HTTP request (and the bodies when ``log_bodies``)."""

    def __init__(self, app: ASGIApp, log_bodies: bool = False) -> None:
        self.app = app
        self.log_bodies = log_bodies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        seen = {"status": None, "in": 0, "out": 0}
        request_body = bytearray()
        response_body = bytearray()
        keep = BODY_LOG_CHARS * 4 if self.log_bodies else 0  # bytes kept (UTF-8: up to 4 per character)

        async def logged_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                seen["in"] += len(body)
                if len(request_body) < keep:
                    request_body.extend(body[: keep - len(request_body)])
            return message

        async def logged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                seen["out"] += len(body)
                if len(response_body) < keep:
                    response_body.extend(body[: keep - len(response_body)])
            await send(message)

        try:
            await self.app(scope, logged_receive, logged_send)
        finally:
            if log.isEnabledFor(logging.INFO):
                client = scope.get(CLIENT_SCOPE_KEY) or (scope.get("client") or ("unknown",))[0]
                log.info("%s %s %s %.3fs client=%s in=%dB out=%dB", scope["method"],
                         _shown(scope["path"], PATH_LOG_CHARS), seen["status"] or "-",
                         time.perf_counter() - start, client, seen["in"], seen["out"])
                if self.log_bodies:
                    log.info("  request body: %s", _shown(bytes(request_body), BODY_LOG_CHARS, seen["in"]))
                    log.info("  response body: %s", _shown(bytes(response_body), BODY_LOG_CHARS, seen["out"]))
