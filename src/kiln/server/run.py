"""Run the app under uvicorn, with the promises `kiln serve` makes about connections and shutdown.

On SIGTERM/SIGINT: stop accepting connections, answer every queued request (run it if it can start within
`grace_s`, else 503 with Retry-After), finish running batches, then close connections and exit 0 within
`grace_s` plus a small constant. A second SIGINT stops at once. A connection that has not sent a complete request
head within `header_timeout_s` is closed (slow or idle clients cannot hold sockets forever).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httptools
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


def _bytes_to_fill() -> Any:
    """A function n -> (a new bytes object of n uninitialized bytes, a writable view of its n bytes), or None where
    this interpreter's bytes are not laid out as CPython's (checked on a sample, so never wrong, at worst unused).
    The body's bytes are written once, by the socket reads, before anything else holds the object; what the app
    receives is an ordinary immutable bytes, with no copy between the socket and it."""
    try:
        new = ctypes.pythonapi.PyBytes_FromStringAndSize
    except (AttributeError, ValueError):  # not CPython
        return None
    new.restype, new.argtypes = ctypes.py_object, (ctypes.c_char_p, ctypes.c_ssize_t)
    offset = bytes.__basicsize__ - 1  # where ob_sval starts: the header, less the one byte of the trailing NUL

    def fill(n: int) -> tuple[bytes, memoryview]:
        b = new(None, n)
        return b, memoryview((ctypes.c_char * n).from_address(id(b) + offset)).cast("B")

    sample, view = fill(8)
    view[:] = b"kiln-bod"
    return fill if sample == b"kiln-bod" and hash(sample) == hash(b"kiln-bod") else None


_fill = _bytes_to_fill()


class _BodyInto(asyncio.BufferedProtocol):
    """Stands in for a connection's HTTP protocol while the rest of a body of known length arrives: the event loop
    reads straight into the body's final bytes (never past its end, so a pipelined request stays in the socket),
    then hands the connection back."""

    __slots__ = ("owner", "view", "pos")

    def __init__(self, owner: HeaderTimeoutProtocol, view: memoryview, pos: int) -> None:
        self.owner, self.view, self.pos = owner, view, pos

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.pos:]

    def buffer_updated(self, nbytes: int) -> None:
        self.pos += nbytes
        if self.pos == len(self.view):
            self.view.release()
            self.owner.transport.set_protocol(self.owner)
            self.owner._body_end(None)

    def eof_received(self) -> None:
        self.owner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.view.release()
        self.owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        self.owner.resume_writing()


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus a deadline for each request head: a connection that sends nothing, or
    never finishes its headers, is closed after `header_timeout_s` (uvicorn times out only idle keep-alives).

    A body whose Content-Length is within `body_limit` is gathered whole and handed to the app as one ASGI message,
    with one copy (uvicorn delivers 64 KiB at a time, each message one event-loop round trip and two copies, and
    the app joins them again: for a 9.6 MB tensor body that was most of a worker's event-loop time). kiln reads
    the whole body before using it anyway, so this holds no more memory; other bodies keep uvicorn's 64 KiB
    flow control. Once such a body has begun, the reads that carry the rest of it bypass the parser (httptools
    copies every byte it hands to `on_body`; the length is known, so there is nothing to parse): the body's last
    byte completes the request, and a fresh parser takes what follows (a pipelined request). The rest of a body of
    `read_into_min` bytes or more is read by the event loop straight into the bytes the app receives (_BodyInto):
    no chunk objects and no join. For 9.6 MB bodies the join was a sixth of a worker's CPU and the parser's copies
    an eighth (py-spy); bench/body.py measures what a body costs a worker."""

    header_timeout_s = 10.0
    body_limit = 64 << 20

    read_into_min = 256 << 10
    _body_left = 0  # bytes of a Content-Length body (within body_limit) still to come: they bypass the parser

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
        length = 0
        for name, value in self.headers:
            if name == b"content-length" and value.isdigit() and int(value) <= self.body_limit:
                length = int(value)
                hold = max(hold, length)
            elif name == b"transfer-encoding":  # the parser reads a chunked body (and refuses one with both headers)
                length = -1
        self._hold = hold
        super().on_headers_complete()
        if length > 0 and self.cycle is not None and not self.parser.should_upgrade():
            self._body_left = length

    def data_received(self, data: bytes) -> None:
        left = self._body_left
        if not left:
            super().data_received(data)
        elif len(data) < left:  # more of the body, not its end
            self.on_body(data)
        else:  # the body's end: the request is complete, and a fresh parser takes what follows
            self._body_end(data if len(data) == left else data[:left])
            if len(data) > left:
                super().data_received(data[left:])
            return
        if self._body_left >= self.read_into_min and _fill is not None and not self.cycle.response_complete:
            self._read_into()

    def _read_into(self) -> None:
        """The rest of the body comes through _BodyInto, into the bytes the app will receive."""
        cycle = self.cycle
        pos = len(cycle.body)
        body, view = _fill(pos + self._body_left)
        if pos:  # what the parser passed on: the part of the body that came with the head
            view[:pos] = bytes(cycle.body)
        whole = _Chunks()
        whole += body
        cycle.body = whole  # type: ignore[assignment]
        self._body_left = 0  # the parser's part is over; _BodyInto completes the request
        self.transport.set_protocol(_BodyInto(self, view, pos))

    def _body_end(self, last: bytes | None) -> None:
        """The last bytes of a body that bypassed the parser are here (`last`; None: _BodyInto read them)."""
        if last is not None:
            self.on_body(last)
        elif not self.cycle.response_complete:  # as on_body does when the whole body is here
            self.flow.pause_reading()
            self.cycle.message_event.set()
        self.parser = httptools.HttpRequestParser(self)  # the old one still waits for the bytes it did not see
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn sets up its own
        self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        if self._body_left:
            self._body_left -= len(body)
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        if cycle.body.__class__ is not _Chunks:  # a fresh (empty) bytearray: a new request, or the app took a part
            cycle.body = _Chunks()  # type: ignore[assignment]
        cycle.body += body
        if len(cycle.body) >= self._hold:  # on_message_complete wakes the app when the whole body is here
            self.flow.pause_reading()
            cycle.message_event.set()

    def on_message_complete(self) -> None:
        self._body_left = 0
        super().on_message_complete()

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
    def __init__(self, config: uvicorn.Config, plane: DataPlane | None, grace_s: float,
                 handed: socket.socket | None = None) -> None:
        super().__init__(config)
        self.plane = plane
        self.grace_s = grace_s
        self.exit_code = 0
        self.handed = handed  # a worker's end of the supervisor's Dealer pair: connections accepted for it
        self._handing: set[asyncio.Task[Any]] = set()  # the loop keeps tasks only weakly

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.handed is not None and not self.should_exit:
            loop = asyncio.get_running_loop()
            self.handed.setblocking(False)
            loop.add_reader(self.handed.fileno(), self._take_handed, loop)

    def _take_handed(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve each connection the supervisor handed over, as uvicorn serves the ones it accepts itself."""
        assert self.handed is not None

        def protocol() -> asyncio.Protocol:
            return self.config.http_protocol_class(  # type: ignore[call-arg]
                config=self.config, server_state=self.server_state, app_state=self.lifespan.state, _loop=loop)

        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(self.handed, 1, 16)
            except BlockingIOError:
                return
            except OSError:
                msg, fds = b"", []
            if not msg and not fds:  # the supervisor is gone
                loop.remove_reader(self.handed.fileno())
                return
            for fd in fds:
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                task = loop.create_task(loop.connect_accepted_socket(protocol, sock))
                self._handing.add(task)
                task.add_done_callback(self._handing.discard)

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
        if self.handed is not None:  # stop accepting first
            asyncio.get_running_loop().remove_reader(self.handed.fileno())
            self.handed.close()
        for server in self.servers:
            server.close()
        if self.plane is not None and not self.force_exit:
            self.plane.begin_drain(time.monotonic() + self.grace_s)
            try:
                await asyncio.wait_for(self.plane.drained(), self.grace_s + EXIT_MARGIN_S / 2)
            except TimeoutError:
                pass  # a batch still running past the grace period: uvicorn's own timeout below ends it
        await super().shutdown(sockets)


def run(app: Any, *, host: str, port: int, grace_s: float, plane: DataPlane | None = None,
        header_timeout_s: float = 10.0, sockets: list[socket.socket] | None = None, max_body_bytes: int = 64 << 20,
        handed: socket.socket | None = None) -> int:
    """Serve until a signal; returns the exit code (0 after a drain, 1 when no model could be loaded).
    `sockets`: listen on these already bound sockets instead of host:port; `handed`: also serve the connections that
    arrive on this Unix socket (the workers of `--workers N`: kiln.server.workers.Dealer)."""
    server = _Server(uvicorn_config(app, host=host, port=port, header_timeout_s=header_timeout_s,
                                    max_body_bytes=max_body_bytes), plane, grace_s, handed)
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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Make glibc keep the memory of freed request bodies for the next ones; False where this is not glibc, where
    KILN_KEEP_FREED_MEMORY=0, or where the user set MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (theirs wins).

    By default glibc maps every block above its (adaptive) mmap threshold afresh and returns free heap above
    2x that threshold to the system, so with a few 9.6 MB bodies in flight most bodies, and the arrays decoded
    from them, page-fault all their pages in again: 1,200-1,400 faults and about a quarter of a worker's CPU per
    16-image request (bench/body.py). With these settings blocks up to 32 MiB (glibc's largest threshold) come
    from the heap and up to 256 MiB of free heap is kept: a worker keeps the high-water mark of its bodies in
    flight instead of faulting it in for each request."""
    if os.environ.get("KILN_KEEP_FREED_MEMORY") == "0" or "MALLOC_MMAP_THRESHOLD_" in os.environ \
            or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def serve(settings: Settings, *, sockets: list[socket.socket] | None = None, handed: socket.socket | None = None,
          peers: Any = None) -> int:
    """One server process: load the repository's models, serve HTTP (and gRPC) until a signal, drain, exit."""
    from kiln.server.app import create_app

    keep_freed_memory()
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
               sockets=sockets, max_body_bytes=s.max_body_bytes, handed=handed)
    for name, err in plane.errors.items():
        print(f"model {name} failed to load: {err}", file=sys.stderr)
    return code
