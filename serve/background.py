"""A server on a free loopback port in a background thread, for tests and benchmarks (`with BackgroundServer(app)`).

It knows uvicorn's Server object, nothing about the app it runs.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """Runs `app` with uvicorn on `host:port` (a free port by default) until the `with` block ends."""

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int | None = None, start_timeout: float = 30.0
    ):
        self.host = host
        self.port = port or free_port(host)
        self.start_timeout = start_timeout
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="toolvlm-serve", daemon=True)

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url} within {self.start_timeout:g} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
