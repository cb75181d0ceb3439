"""Who may call the server, and how much of it one caller may hold: API keys and the per-client limit.

:class:`AccessMiddleware` runs before every route (inside the body-size limit, so a rejected client still gets a
clean answer). For a *guarded* request (see :func:`is_guarded`: every ``/v1`` and ``/api`` path, and anything but
GET / HEAD outside the open paths) it

1. checks ``Authorization: Bearer <key>`` when the settings hold keys: missing or wrong is a 401 OpenAI-style error
   with ``WWW-Authenticate: Bearer``. Keys are compared in constant time (:class:`KeyRing`: SHA-256 digests compared
   with :func:`hmac.compare_digest`, every key tried) and never logged: a client shows in logs as ``key#N``, its
   key's place in the settings' list;
2. counts the request against its client (:class:`ClientLimiter`): the key when keys are set, else the peer's IP
   address as uvicorn reports it (uvicorn believes ``X-Forwarded-For`` only from its ``--forwarded-allow-ips``,
   by default 127.0.0.1: a reverse proxy on the same machine, never a remote client). A client already holding
   ``max_client_requests`` requests (generating, queued for the model, or streaming) has its next request wait up
   to :data:`RETRY_AFTER_S` for one of them to end (first come, first served), then gets a 429 with
   ``Retry-After``. The wait is what keeps a flood cheap: a client that ignores ``Retry-After`` gets one answer per
   connection per second, not hundreds of instant 429s that would take the server's CPU from everyone else.

This gate sits in front of the :class:`~decodelab.server.runner.Runner` (``max_concurrent`` generating,
``max_queue`` waiting, shared by all) and the batching scheduler behind it: with the per-client cap no one client
can fill the shared queue, a newcomer's prompt is taken before a flooder's next ones (the scheduler serves waiting
prompts round-robin by client, :data:`~decodelab.scheduler.PASS_OWNER`), and its request joins the next decode step
beside the others'.

``/health``, the API docs (``/docs``, ``/redoc``, ``/openapi.json``) and the playground's files stay open.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections import deque
from typing import Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..scheduler import PASS_OWNER
from .errors import error_payload

GUARDED_PREFIXES = ("/v1", "/api")
CLIENT_SCOPE_KEY = "decodelab.client"  # the scope entry naming the client (``key#2``, ``1.2.3.4``) for the log
RETRY_AFTER_S = 1  # seconds an over-limit request waits for its client's slot before the 429 (its Retry-After)


def is_guarded(path: str, method: str, open_paths: Iterable[str]) -> bool:
    """Whether a request needs the key (when keys are set) and counts against its client's limit.

    Guarded: every path under ``/v1`` or ``/api`` (known routes or not, so a 401 does not tell which exist), and
    any method but GET / HEAD elsewhere; open: ``open_paths`` (``/health``, the docs) and GET / HEAD of the
    playground's files.
    """
    if path in open_paths:
        return False
    if any(path == p or path.startswith(p + "/") for p in GUARDED_PREFIXES):
        return True
    return method not in ("GET", "HEAD")


class KeyRing:
    """The accepted API keys, held as SHA-256 digests; :meth:`match` compares in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def match(self, presented: bytes) -> int | None:
        """The 0-based place of ``presented`` among the keys, or ``None``. Every key is compared (no early exit),
        each through a digest of equal length, so the time taken tells nothing about the keys."""
        digest = hashlib.sha256(presented).digest()
        found = None
        for i, ref in enumerate(self._digests):
            if hmac.compare_digest(digest, ref) and found is None:
                found = i
        return found


def bearer_token(scope: Scope) -> bytes | None:
    """The token of the request's ``Authorization: Bearer <token>`` header (scheme case-insensitive), else
    ``None`` (no header, another scheme, or more than one Authorization header)."""
    values = [v for k, v in scope.get("headers", []) if k == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


class ClientLimiter:
    """Requests in flight per client, with a short first-come-first-served wait for a slot (event-loop thread
    only: no lock).

    Args:
        limit: most requests one client may hold at once; ``0``: no limit.
        wait_s: seconds :meth:`acquire` waits for one of the client's requests to end before refusing.

    Counters: ``rejected`` (refusals: 429s sent); ``active`` (client -> requests held now).
    """

    def __init__(self, limit: int, wait_s: float = RETRY_AFTER_S) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self.active: dict[str, int] = {}
        self.rejected = 0
        self._waiting: dict[str, deque[asyncio.Future]] = {}  # client -> requests waiting for its slot, in order

    def _take(self, client: str) -> bool:
        held = self.active.get(client, 0)
        if self.limit and held >= self.limit:
            return False
        self.active[client] = held + 1
        return True

    def enter(self, client: str) -> bool:
        """Count one more request for ``client`` without waiting; ``False`` (a refusal, nothing counted) when it is
        at the limit."""
        if self._take(client):
            return True
        self.rejected += 1
        return False

    async def acquire(self, client: str) -> bool:
        """Count one more request for ``client``, waiting up to ``wait_s`` seconds (behind the client's earlier
        waiters) for one of its requests to end; ``False`` (a refusal, nothing counted) when none ended in time.
        A waiter cancelled meanwhile (its connection closed) holds nothing."""
        if self._take(client):
            return True
        if self.wait_s <= 0:
            self.rejected += 1
            return False
        granted = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(client, deque()).append(granted)
        try:
            await asyncio.wait((granted,), timeout=self.wait_s)
        except BaseException:
            if granted.done():  # handed the slot just as the request went away: pass it on
                self.leave(client)
            else:
                self._forget(client, granted)
            raise
        if granted.done():
            return True
        self._forget(client, granted)
        self.rejected += 1
        return False

    def _forget(self, client: str, granted: asyncio.Future) -> None:
        """Take a waiter that timed out or went away out of its client's line."""
        granted.cancel()
        waiters = self._waiting.get(client)
        if waiters is not None and granted in waiters:
            waiters.remove(granted)
            if not waiters:
                del self._waiting[client]

    def leave(self, client: str) -> None:
        """One request of ``client`` ended: its slot goes to the client's first waiter, else is freed."""
        waiters = self._waiting.get(client)
        if waiters:
            granted = waiters.popleft()  # only live waiters are in line (see _forget)
            if not waiters:
                del self._waiting[client]
            granted.set_result(True)  # the count stays: the slot changes hands
            return
        held = self.active.get(client, 0) - 1
        if held > 0:
            self.active[client] = held
        else:
            self.active.pop(client, None)


class Access:
    """The server's access policy and its counters (``app.state.access``).

    Args:
        keys: accepted keys (empty: no authentication).
        max_client_requests: the per-client limit (``0``: none).
        open_paths: paths that never need a key (``/health``, the docs).

    Counters: ``unauthorized`` (401s sent); ``limiter.rejected`` (429s).
    """

    def __init__(self, keys: Iterable[str], max_client_requests: int, open_paths: Iterable[str]) -> None:
        self.keys = KeyRing(keys)
        self.limiter = ClientLimiter(max_client_requests)
        self.open_paths = frozenset(open_paths)
        self.unauthorized = 0


class AccessMiddleware:
    """ASGI middleware: API-key check, then the per-client limit, for guarded requests (see the module doc)."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        access = self.access
        if scope["type"] != "http" or not is_guarded(scope["path"], scope["method"], access.open_paths):
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("unknown", 0))[0]
        client = address
        if access.keys:
            token = bearer_token(scope)
            index = None if token is None else access.keys.match(token)
            if index is None:
                access.unauthorized += 1
                scope[CLIENT_SCOPE_KEY] = f"{address} (no valid key)"
                await _unauthorized(token is None)(scope, receive, send)
                return
            client = f"key#{index + 1}"
        scope[CLIENT_SCOPE_KEY] = client
        limiter = access.limiter
        if not await limiter.acquire(client):
            body = error_payload(
                f"too many requests from this client: {limiter.limit} already in flight or queued "
                f"(max_client_requests={limiter.limit}) and none ended within {limiter.wait_s:g} s; retry when "
                "one of them has finished",
                "rate_limit_error", code="rate_limit_exceeded")
            await JSONResponse(body, status_code=429, headers={"Retry-After": str(RETRY_AFTER_S)})(scope, receive, send)
            return
        owner = PASS_OWNER.set(client)  # the scheduler takes waiting prompts round-robin between clients
        try:
            await self.app(scope, receive, send)
        finally:
            PASS_OWNER.reset(owner)
            limiter.leave(client)


def _unauthorized(missing: bool) -> JSONResponse:
    """The 401 answer (the key received is never echoed)."""
    message = ("missing API key: this server needs the header 'Authorization: Bearer <key>'" if missing
               else "invalid API key: the key in the Authorization header is not one this server accepts")
    code = "missing_api_key" if missing else "invalid_api_key"
    return JSONResponse(error_payload(message, "invalid_request_error", code=code), status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})


def document_security(schema: dict) -> dict:
    """Mark every guarded operation of an OpenAPI ``schema`` as needing bearer authentication (so ``/docs`` offers
    an Authorize button); returns the same dict, changed."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
        "type": "http", "scheme": "bearer", "description": "one of the server's API keys (--api-key)"}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if isinstance(operation, dict) and is_guarded(path, method.upper(), ()):
                operation["security"] = [{"apiKey": []}]
    return schema
