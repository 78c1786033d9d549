"""A real uvicorn server of an app under test, on a free loopback port in a daemon thread."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from anycast.core.http import LOOPBACK, free_port

START_TIMEOUT = 20  # seconds; generous for a loaded machine


class ThreadServer:
    """``start()``/``stop()``, or use it as a context manager."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.app = app
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> ThreadServer:
        config = uvicorn.Config(self.app, host=LOOPBACK, port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            assert time.monotonic() < deadline, "test server did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        assert self.server is not None and self.thread is not None
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> ThreadServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
