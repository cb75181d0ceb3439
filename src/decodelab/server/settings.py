"""Server settings: where to listen, who may call, and the limits every request is held to.

The model is fixed when the server starts; nothing a request sends can load another model or read a path. Every
server option lives here and is validated here (``decodelab serve`` maps its options onto these fields).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

API_KEY_ENV = "DECODELAB_API_KEY"
SHARED_CLIENT_REQUESTS = 4  # max_client_requests of a shared server (keys, or beyond loopback) unless given
_KEY = re.compile(r"[\x21-\x2b\x2d-\x7e]{1,512}")  # printable ASCII, no space, no comma
_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?")


@dataclass(frozen=True)
class Settings:
    """Limits and address of one server.

    Attributes:
        host: interface to bind (loopback by default). Another address without ``api_keys`` gets a warning at start
            (:meth:`exposure_warning`).
        port: TCP port.
        model: the name shown in ``/v1/models`` and echoed in responses (``None``: the loaded model's name).
        max_tokens: the largest ``max_tokens`` a request may ask for (tokens); larger gets a 400.
        chat_default_max_tokens: ``max_tokens`` of a chat request that gives none (capped by ``max_tokens`` and by
            the room left in the context window).
        max_n: the largest ``n`` (completions per prompt) and the largest ``num_beams``; also bounds
            ``len(prompt) * n`` for a list of prompts.
        max_prompts: the longest list of prompts one completions request may send.
        max_batch_size: continuous batching: most rows (a request takes 1, or ``n`` samples, or ``num_beams``) in one
            decode step of the model (default 16); ``1`` turns batching off: one generation at a time, in arrival
            order. Every answer is the same whatever its batch neighbours (see README, "Continuous batching").
        max_concurrent: requests generating at once (their decode steps shared); ``None`` (default): equal to
            ``max_batch_size``.
        max_queue: requests that may wait for a model slot; one more gets a 503.
        max_body_bytes: largest request body (bytes); larger gets a 413.
        request_timeout_s: seconds a request may spend queued plus generating; then a 504 (a generation in
            progress is stopped at its next token).
        api_keys: when not empty, every ``/v1`` and ``/api`` route needs ``Authorization: Bearer <one of them>``
            (else a 401); ``/health``, the API docs and the playground's files stay open. Printable ASCII, no spaces
            or commas. Never shown: left out of ``repr`` and of every log line.
        api_keys_file: a file of more keys, one per line (blank lines and ``#`` comments skipped); read once here.
        max_client_requests: requests one client may have in flight and queued at once; one more waits up to 1 s
            for one of them to end, then gets a 429 with ``Retry-After``. A client is its API key when keys are set,
            else its IP address. ``0``: no limit. ``None`` (default) becomes :data:`SHARED_CLIENT_REQUESTS` (4: a
            quarter of the default 16-row decode step; a step's time grows with its rows, so this bounds what one
            client adds to everyone's time to first token) on a shared server (API keys set, or ``host`` beyond
            loopback), and ``0`` on a loopback server without keys, whose one user may batch as much as they like.
        allowed_origins: web origins (``https://host[:port]`` or ``*``) allowed to call the server from a browser
            (CORS); empty (default): none, CORS stays off.
        log_requests: log each request's body and the response body too (prompts and outputs); off by default: the
            one line per request then holds method, path, status, time, sizes and client, no text.

    Attributes:
        keys: every accepted key: ``api_keys`` then the file's, without repeats (``()``: no authentication).

    Raises:
        ConfigError: a limit that is not a positive number (``max_queue`` and ``max_client_requests`` may be 0), a
            malformed key or origin, a keys file that cannot be read or holds no key.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = None
    max_tokens: int = 1024
    chat_default_max_tokens: int = 256
    max_n: int = 8
    max_prompts: int = 32
    max_batch_size: int = 16
    max_concurrent: int | None = None
    max_queue: int = 64
    max_body_bytes: int = 1_000_000
    request_timeout_s: float = 300.0
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    api_keys_file: str | None = None
    max_client_requests: int | None = None
    allowed_origins: tuple[str, ...] = ()
    log_requests: bool = False
    keys: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        positive = ("max_tokens", "chat_default_max_tokens", "max_n", "max_prompts", "max_batch_size",
                    "max_concurrent", "max_body_bytes")
        for name in positive:
            value = getattr(self, name)
            if name == "max_concurrent" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"invalid {name}={value!r}: expected an integer >= 1", param=name)
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ConfigError(f"invalid max_queue={self.max_queue!r}: expected an integer >= 0", param="max_queue")
        timeout = self.request_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"invalid request_timeout_s={timeout!r}: expected a number > 0", param="request_timeout_s")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"invalid port={self.port!r}: expected 0..65535", param="port")
        limit = self.max_client_requests
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ConfigError(f"invalid max_client_requests={limit!r}: expected an integer >= 0 (0: no per-client "
                              "limit)", param="max_client_requests")
        if not isinstance(self.log_requests, bool):
            raise ConfigError(f"invalid log_requests={self.log_requests!r}: expected true or false",
                              param="log_requests")
        object.__setattr__(self, "api_keys", _strings(self.api_keys, "api_keys"))
        object.__setattr__(self, "allowed_origins", _strings(self.allowed_origins, "allowed_origins"))
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            keys += _read_keys(self.api_keys_file)
        for i, key in enumerate(keys):
            if not _KEY.fullmatch(key):  # the key itself is never echoed
                raise ConfigError(f"invalid API key (key {i + 1} of {len(keys)}): expected 1 to 512 printable ASCII "
                                  "characters without spaces or commas", param="api_keys")
        object.__setattr__(self, "keys", tuple(dict.fromkeys(keys)))
        if limit is None:
            shared = bool(self.keys) or not _is_loopback(self.host)
            object.__setattr__(self, "max_client_requests", SHARED_CLIENT_REQUESTS if shared else 0)
        for origin in self.allowed_origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ConfigError(f"invalid allowed_origins={origin!r}: expected '*' or scheme://host[:port] with no "
                                  "path, e.g. http://localhost:3000", param="allowed_origins")

    @property
    def concurrency(self) -> int:
        """Requests generating at once: ``max_concurrent``, else ``max_batch_size``."""
        return self.max_concurrent if self.max_concurrent is not None else self.max_batch_size

    def exposure_warning(self) -> str | None:
        """A one-line warning when the server listens beyond loopback with no API key, else ``None``."""
        if self.keys or _is_loopback(self.host):
            return None
        return (f"warning: serving on {self.host}, which other machines can reach, with no API key: anyone who "
                f"reaches port {self.port} can use every route; set --api-key (or ${API_KEY_ENV}, or --api-key-file)")

    @classmethod
    def names(cls) -> frozenset[str]:
        """Every field name (the keywords ``decodelab.server.run`` accepts besides ``model``)."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "Settings":
        """Settings from keywords; ``None`` values (and empty lists) mean the default.

        When neither ``api_keys`` nor ``api_keys_file`` is given, the keys come from ``$DECODELAB_API_KEY`` (one key,
        or several separated by commas; unset or empty: none).

        Raises:
            ConfigError: an unknown keyword or a bad value.
        """
        unknown = sorted(set(kwargs) - cls.names())
        if unknown:
            raise ConfigError(f"unknown server setting {unknown[0]!r}", param=unknown[0])
        given = {k: v for k, v in kwargs.items() if v is not None and not (isinstance(v, (list, tuple)) and not v)}
        env = os.environ.get(API_KEY_ENV, "").strip()
        if "api_keys" not in given and "api_keys_file" not in given and env:
            given["api_keys"] = tuple(k.strip() for k in env.split(","))
        return cls(**given)


def _strings(value, name: str) -> tuple[str, ...]:
    """``value`` (one string or a sequence of strings) as a tuple of strings."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"invalid {name}: expected a list of strings", param=name)
    return tuple(value)


def _read_keys(path) -> list[str]:
    """The keys in the file at ``path``: one per line, blank lines and ``#`` comments skipped."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"invalid api_keys_file={path!r}: expected a path", param="api_keys_file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "not UTF-8 text"
        raise ConfigError(f"invalid api_keys_file={str(path)!r}: cannot read it ({reason})",
                          param="api_keys_file") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ConfigError(f"invalid api_keys_file={str(path)!r}: it holds no key (one per line)",
                          param="api_keys_file")
    return keys


def _is_loopback(host: str) -> bool:
    """Whether ``host`` names a loopback interface only (``localhost``, ``127.x.x.x``, ``::1``)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
