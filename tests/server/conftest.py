"""A model repository to serve (built once per session), and a real uvicorn server on a free port."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from kiln.server.app import create_app
from kiln.server.dataplane import DataPlane
from kiln.server.run import uvicorn_config
from v2client import wait_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn in a background thread, with the settings and HTTP protocol `kiln serve` runs it with."""

    def __init__(self, app: object, *, ready: bool = True) -> None:
        self.wait_for_ready = ready
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=self.port, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        if self.wait_for_ready:
            wait_ready(self.url)
        else:  # live is enough: the test watches readiness itself
            wait_ready(self.url, path="/v2/health/live")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(serve_repo: Path) -> Iterator[ServerThread]:
    plane = DataPlane(serve_repo, overrides={"max_delay_ms": None})
    with ServerThread(create_app(plane, max_body_bytes=1 << 20)) as s:
        yield s
