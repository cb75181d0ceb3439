"""`BackgroundServer`: the server in a background thread on a free loopback port (notebooks, benchmarks, tests;
public API, re-exported by :mod:`decodelab.server`).

    >>> with BackgroundServer(create_app(lm)) as srv:
    ...     openai.OpenAI(base_url=srv.url + "/v1", api_key="none").completions.create(...)
"""

from __future__ import annotations

import threading
import time

from ..errors import DecodelabError


class BackgroundServer:
    """A uvicorn server for ``app`` on ``host`` (default 127.0.0.1) and a free port, in a daemon thread.

    Attributes:
        url: ``http://127.0.0.1:PORT`` once started.
        port: the port chosen by the OS.

    Raises:
        DecodelabError: (from :meth:`start`) the server did not start within ``start_timeout_s`` seconds.
    """

    def __init__(self, app, host: str = "127.0.0.1", start_timeout_s: float = 30.0, log_level: str = "warning"):
        import uvicorn

        self.app = app
        self.host = host
        self.start_timeout_s = start_timeout_s
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="decodelab-test-server", daemon=True)
        self.port = 0
        self.url = ""

    def start(self) -> "BackgroundServer":
        """Start serving and wait until the socket listens."""
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise DecodelabError(f"the test server did not start within {self.start_timeout_s:g} s")
            time.sleep(0.02)
        sock = self.server.servers[0].sockets[0]
        self.port = sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask uvicorn to exit and wait up to ``timeout_s`` seconds for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
