"""A Starlette app served by uvicorn on a free loopback port, on a thread of the test process.

Unlike the subprocess servers of test_serve.py, the test can read the app's state (its engine, its
scheduler) directly while requests run, which is what checking gauges against the truth needs.

    with InProcessServer(create_app(config)) as server:
        httpx.get(server.url + "/health")
"""
from __future__ import annotations

import logging
import threading
import time


class InProcessServer:
    def __init__(self, app, start_timeout: float = 60.0, http="h11"):
        """`http`: uvicorn's protocol (a name, or a class such as head_deadline.head_deadline_protocol(s)'s)."""
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on", http=http, ws="none"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class LogRecords(logging.Handler):
    """Every log record handed to it, kept in `records` (attach it to the server's loggers to check that
    nothing was logged as an error, and no traceback)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def wait_for(condition, timeout: float = 60.0, what: str = "the condition"):
    """Poll `condition()` until it returns something truthy (returned); AssertionError after `timeout` seconds.

    The timeout is a generous ceiling, never the thing waited for: tests wait on counters and state."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def import_httpx():
    """The openai client's HTTP library, for requests to the server: httpx2 where it is installed (this
    environment's openai uses it), else httpx; the calling test module is skipped, saying so, without either."""
    try:
        import httpx2 as httpx
    except ImportError:
        import pytest

        httpx = pytest.importorskip("httpx", reason="needs httpx (the openai client's HTTP library)")
    return httpx
