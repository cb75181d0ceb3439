"""decodelab's exceptions.

Every error decodelab raises on purpose is a :class:`DecodelabError` whose message is one line that names the
parameter (or model, or path) and the value received. The CLI prints that line and exits with status 2; the HTTP
server turns it into an OpenAI-style error object with a 4xx status.

Hierarchy::

    DecodelabError
    ├── ConfigError       a generation parameter is out of range or inconsistent (e.g. ``num_beams=0``)
    ├── InputError        the text / prompt cannot be used (empty, longer than the context window)
    └── ModelLoadError    a model id, path or file cannot be loaded (unknown id offline, missing path, corrupt GGUF)
"""

from __future__ import annotations


class DecodelabError(Exception):
    """Base class. ``str(err)`` is a single line fit to show a user.

    Attributes:
        param: the name of the offending parameter when there is one (``"num_beams"``, ``"model"``, ``"text"``), else
            ``None``. The server reports it as the OpenAI error's ``param``.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        # One line, always: a multi-line message would break the CLI's and the server's contract.
        super().__init__(" ".join(str(message).split()))
        self.param = param


class ConfigError(DecodelabError, ValueError):
    """A generation parameter has a value decodelab cannot use (raised by :mod:`decodelab.config`)."""


class InputError(DecodelabError, ValueError):
    """The input text or ids cannot be used: empty where tokens are needed, or longer than the context window."""


class ModelLoadError(DecodelabError, OSError):
    """A model could not be loaded: unknown id with no local copy, missing path, corrupt or unsupported file."""
