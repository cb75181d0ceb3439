"""Server settings: where to listen and the limits every request is held to.

The model is fixed when the server starts; nothing a request sends can load another model or read a path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Settings:
    """Limits and address of one server.

    Attributes:
        host: interface to bind (loopback by default: the server has no authentication).
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

    Raises:
        ConfigError: a limit that is not a positive number (``max_queue`` may be 0).
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

    @property
    def concurrency(self) -> int:
        """Requests generating at once: ``max_concurrent``, else ``max_batch_size``."""
        return self.max_concurrent if self.max_concurrent is not None else self.max_batch_size

    @classmethod
    def names(cls) -> frozenset[str]:
        """Every field name (the keywords ``decodelab.server.run`` accepts besides ``model``)."""
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, **kwargs) -> "Settings":
        """Settings from keywords; ``None`` values mean the default.

        Raises:
            ConfigError: an unknown keyword or a bad value.
        """
        unknown = sorted(set(kwargs) - cls.names())
        if unknown:
            raise ConfigError(f"unknown server setting {unknown[0]!r}", param=unknown[0])
        return cls(**{k: v for k, v in kwargs.items() if v is not None})
