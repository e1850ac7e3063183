"""Run the app under uvicorn, with the promises `kiln serve` makes about connections and shutdown.

On SIGTERM/SIGINT: stop accepting connections, answer every queued request (run it if it can start within
`grace_s`, else 503 with Retry-After), finish running batches, then close connections and exit 0 within
`grace_s` plus a small constant. A second SIGINT stops at once. A connection that has not sent a complete request
head within `header_timeout_s` is closed (slow or idle clients cannot hold sockets forever).
"""

from __future__ import annotations

import asyncio
import functools
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kiln.server.dataplane import DataPlane

# What the process may take beyond --grace-s: closing connections and the lifespan shutdown.
EXIT_MARGIN_S = 2.0


class _Chunks:
    """A request body as the chunks it arrived in: `+=` keeps the chunk, `bytes()` joins once (one chunk: no copy).
    uvicorn's own bytearray copies each chunk on arrival and the whole body again on delivery."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def __iadd__(self, chunk: bytes) -> _Chunks:
        self.parts.append(chunk)
        self.size += len(chunk)
        return self

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus a deadline for each request head: a connection that sends nothing, or
    never finishes its headers, is closed after `header_timeout_s` (uvicorn times out only idle keep-alives).

    A body whose Content-Length is within `body_limit` is gathered whole and handed to the app as one ASGI message,
    with one copy (uvicorn delivers 64 KiB at a time, each message one event-loop round trip and two copies, and
    the app joins them again: for a 9.6 MB tensor body that was most of a worker's event-loop time). kiln reads
    the whole body before using it anyway, so this holds no more memory; other bodies keep uvicorn's 64 KiB
    flow control."""

    header_timeout_s = 10.0
    body_limit = 64 << 20

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
        hold = HIGH_WATER_LIMIT
        for name, value in self.headers:
            if name == b"content-length" and value.isdigit() and int(value) <= self.body_limit:
                hold = max(hold, int(value))
        self._hold = hold
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        if cycle.body.__class__ is not _Chunks:  # a fresh (empty) bytearray: a new request, or the app took a part
            cycle.body = _Chunks()  # type: ignore[assignment]
        cycle.body += body
        if len(cycle.body) >= self._hold:  # on_message_complete wakes the app when the whole body is here
            self.flow.pause_reading()
            cycle.message_event.set()

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
        header_timeout_s: float = 10.0, sockets: list[socket.socket] | None = None, max_body_bytes: int = 64 << 20) -> int:
    """Serve until a signal; returns the exit code (0 after a drain, 1 when no model could be loaded).
    `sockets`: listen on these already bound sockets instead of host:port (the workers of `--workers N`)."""
    server = _Server(uvicorn_config(app, host=host, port=port, header_timeout_s=header_timeout_s,
                                    max_body_bytes=max_body_bytes), plane, grace_s)
    server.run(sockets=sockets)
    return server.exit_code


BACKLOG = 2048  # pending connections per listening socket (uvicorn's default)


def uvicorn_config(app: Any, *, host: str, port: int, header_timeout_s: float = 10.0, max_body_bytes: int = 64 << 20,
                   timeout_graceful_shutdown: int = max(1, int(EXIT_MARGIN_S / 2))) -> uvicorn.Config:
    """uvicorn's settings for kiln: its HTTP protocol (head deadline, whole bodies), quiet logs, lifespan on."""
    protocol = type("KilnHttp", (HeaderTimeoutProtocol,), {"header_timeout_s": header_timeout_s,
                                                           "body_limit": max_body_bytes})
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, http=protocol,
                          timeout_graceful_shutdown=timeout_graceful_shutdown, lifespan="on", timeout_keep_alive=5,
                          backlog=BACKLOG)


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
    worker_devices: str = "share"  # --worker-devices: share, split (worker i on device i mod the count), engine
    worker: tuple[int, int] | None = None  # (index, count) in a worker of `--workers N`
    engines: dict[str, str] | None = None  # --worker-devices engine, in a worker: run folder and slot folder


def worker_devices(devices: list[str], index: int, count: int) -> list[str]:
    """`--worker-devices split`: worker `index` of `count` gets device index mod len(devices) (count a multiple of
    it). Each GPU then holds count/len(devices) CUDA contexts instead of count, and a worker's batches are not
    split across GPUs."""
    return [devices[index % len(devices)]] if len(devices) > 1 and count % len(devices) == 0 else devices


def serve(settings: Settings, *, sockets: list[socket.socket] | None = None, peers: Any = None) -> int:
    """One server process: load the repository's models, serve HTTP (and gRPC) until a signal, drain, exit."""
    from kiln.server.app import create_app

    s = settings
    overrides = s.overrides
    if s.worker_devices == "split" and s.worker is not None and overrides.get("devices"):
        overrides = {**overrides, "devices": worker_devices(overrides["devices"], *s.worker)}
    factory = None
    if s.engines is not None:  # the models run in the engines; this worker only speaks the protocol
        from kiln.server.engine import EngineModel

        factory = functools.partial(EngineModel, engines=overrides["devices"], rundir=s.engines["rundir"],
                                    slots=s.engines["slots"])
    plane = DataPlane(Path(s.repo), overrides=overrides, defaults=s.defaults, only=s.models, drain_s=s.grace_s,
                      model_factory=factory)
    app = create_app(plane, api_key=s.api_key, max_body_bytes=s.max_body_bytes, access_log=s.access_log or s.log_json,
                     log_json=s.log_json, grpc_port=s.grpc_port, grpc_host=s.host, peers=peers)
    code = run(app, host=s.host, port=s.port, grace_s=s.grace_s, plane=plane, header_timeout_s=s.header_timeout_s,
               sockets=sockets, max_body_bytes=s.max_body_bytes)
    for name, err in plane.errors.items():
        print(f"model {name} failed to load: {err}", file=sys.stderr)
    return code
