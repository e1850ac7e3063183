"""Run the app under uvicorn, with the promises `kiln serve` makes about connections and shutdown.

On SIGTERM/SIGINT: stop accepting connections, answer every queued request (run it if it can start within
`grace_s`, else 503 with Retry-After), finish running batches, then close connections and exit 0 within
`grace_s` plus a small constant. A second SIGINT stops at once. A connection that has not sent a complete request
head within `header_timeout_s` is closed (slow or idle clients cannot hold sockets forever).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kiln.server.dataplane import DataPlane

# What the process may take beyond --grace-s: closing connections and the lifespan shutdown.
EXIT_MARGIN_S = 2.0


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus a deadline for each request head: a connection that sends nothing, or
    never finishes its headers, is closed after `header_timeout_s` (uvicorn times out only idle keep-alives)."""

    header_timeout_s = 10.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.header_timeout_s, self._head_late)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if getattr(self, "_head_timer", None) is None:  # the next request on a kept-alive connection
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_late)

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()  # type: ignore[union-attr]
            self._head_timer = None
        super().connection_lost(exc)

    def _head_late(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:  # no request in progress: only a head that never came
            self.transport.close()


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, plane: DataPlane | None, grace_s: float) -> None:
        super().__init__(config)
        self.plane = plane
        self.grace_s = grace_s
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn re-raises the signal after shutting down, so the process dies by it (-15). A graceful
        # drain is a clean exit: a second SIGINT still forces an immediate stop.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.plane is not None and self.plane.fatal:
            print(f"kiln serve: {self.plane.fatal}", file=sys.stderr, flush=True)
            self.exit_code = 1
            return True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # stop accepting first
            server.close()
        if self.plane is not None and not self.force_exit:
            self.plane.begin_drain(time.monotonic() + self.grace_s)
            try:
                await asyncio.wait_for(self.plane.drained(), self.grace_s + EXIT_MARGIN_S / 2)
            except TimeoutError:
                pass  # a batch still running past the grace period: uvicorn's own timeout below ends it
        await super().shutdown(sockets)


def run(app: Any, *, host: str, port: int, grace_s: float, plane: DataPlane | None = None,
        header_timeout_s: float = 10.0, sockets: list[socket.socket] | None = None) -> int:
    """Serve until a signal; returns the exit code (0 after a drain, 1 when no model could be loaded).
    `sockets`: listen on these already bound sockets instead of host:port (the workers of `--workers N`)."""
    protocol = type("KilnHttp", (HeaderTimeoutProtocol,), {"header_timeout_s": header_timeout_s})
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, http=protocol,
                            timeout_graceful_shutdown=max(1, int(EXIT_MARGIN_S / 2)), lifespan="on",
                            timeout_keep_alive=5, backlog=BACKLOG)
    server = _Server(config, plane, grace_s)
    server.run(sockets=sockets)
    return server.exit_code


BACKLOG = 2048  # pending connections per listening socket (uvicorn's default)


@dataclass
class Settings:
    """Everything one `kiln serve` process needs, plain data: the workers of `--workers N` get it as JSON."""

    repo: str
    host: str = "127.0.0.1"
    port: int = 8000
    models: list[str] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)  # below config.toml (the workers' thread share)
    grpc_port: int | None = None
    api_key: str | None = None
    max_body_bytes: int = 64 << 20
    access_log: bool = False
    log_json: bool = False
    grace_s: float = 30.0
    header_timeout_s: float = 10.0


def serve(settings: Settings, *, sockets: list[socket.socket] | None = None, peers: Any = None) -> int:
    """One server process: load the repository's models, serve HTTP (and gRPC) until a signal, drain, exit."""
    from kiln.server.app import create_app

    s = settings
    plane = DataPlane(Path(s.repo), overrides=s.overrides, defaults=s.defaults, only=s.models, drain_s=s.grace_s)
    app = create_app(plane, api_key=s.api_key, max_body_bytes=s.max_body_bytes, access_log=s.access_log or s.log_json,
                     log_json=s.log_json, grpc_port=s.grpc_port, grpc_host=s.host, peers=peers)
    code = run(app, host=s.host, port=s.port, grace_s=s.grace_s, plane=plane, header_timeout_s=s.header_timeout_s,
               sockets=sockets)
    for name, err in plane.errors.items():
        print(f"model {name} failed to load: {err}", file=sys.stderr)
    return code
