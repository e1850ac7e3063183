"""`kiln serve --workers N`: N server processes behind one port, for when one event loop is the bottleneck.

One Python process parses requests on one event loop, about one core's worth (bench/serve.py). With N workers the
supervisor (this module, in the `kiln serve` process) listens on the port itself and starts N worker processes; a
thread of the supervisor accepts each connection and hands it to the next worker in turn (the socket itself, over a
Unix socket pair: `Dealer`), so the workers hold connections in equal numbers. With KILN_REUSEPORT=1 the workers
listen on the port together through SO_REUSEPORT instead (kiln's way until 2026-11), where the kernel picks a
worker by a hash of the client's address: with 64 connections over 16 workers one worker got none and the busiest
ran at 0.97 of a core while the average was at 0.67 (bench/multigpu.py, two H200s). Each worker is a whole
server: its own models, batcher and runtimes (memory times N; each runtime gets its share of the cores), its own
gRPC listener on --grpc-port (gRPC binds with SO_REUSEPORT too). Workers start with OMP_WAIT_POLICY=PASSIVE
unless it is set: by default libgomp keeps a worker's torch threads spinning for about 3 ms after every parallel
region (a batch's copies), burning the cores the other workers' front ends need (see WORKER_ENV). The workers
answer as one server where it matters: see kiln.server.peers.

With `--worker-devices engine` the supervisor first starts one engine process per device (kiln.server.engine), on
a Unix socket it binds and holds; the workers then run no model and hand their batches to the engines. Engines are
restarted like workers, and stopped after the workers have drained.

The supervisor restarts a worker that dies (a crash, an uncaught exception, the OOM killer), dealing new connections
to the other workers meanwhile; it gives up when workers die more than
MAX_RESTARTS times in RESTART_WINDOW_S. A worker that could load no model exits NO_MODEL, which stops the server
with exit code 1, as a single process does. SIGTERM/SIGINT are passed on: every worker drains (--grace-s) and the
supervisor exits 0 when they all did.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from kiln.errors import KilnError
from kiln.server import engine
from kiln.server.model import die_with_parent, name_thread
from kiln.server.peers import Peers, socket_path
from kiln.server.run import BACKLOG, EXIT_MARGIN_S, Settings, serve

# Measured with 8 workers of ResNet-50 on one H200 of two (bench/multigpu.py --serve-workers 8, against the same with
# --gomp-spincount 300000, libgomp's default): server CPU per request 4.68 -> 2.26 ms at one image per request and
# 37.2 -> 22.4 ms at 16 images; img/s 4,022 -> 3,951 and 7,533 -> 6,911 on one GPU, 2,702 -> 4,056 and
# 8,026 -> 7,634 on two.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
ENV = "KILN_SERVE_WORKER"  # the worker's settings, as JSON (in the environment: the API key stays out of argv)
NO_MODEL = 78  # a worker's exit code for "no model could be loaded" (EX_CONFIG): the server stops, as one process does
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


def _probe(host: str, port: int, option: str) -> tuple[int, int, int, Any]:
    """Bind host:port once without SO_REUSEPORT, so that a port another server holds is refused rather than silently
    shared with it. Returns the family, type, protocol and bound address (port 0 -> the port the system chose)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise KilnError(f"cannot resolve --host {host}: {e.strerror}", hint="give an address such as 127.0.0.1 or 0.0.0.0") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
        except OSError as e:
            what = "listen for gRPC" if option == "--grpc-port" else "listen"
            raise KilnError(f"cannot {what} on {host}:{port}: {e.strerror}", hint=f"pick a free port with {option}") from None
        return family, kind, proto, probe.getsockname()


def listen(host: str, port: int, count: int = 1) -> list[socket.socket]:
    """The server's listening socket on host:port (the supervisor's, whose Dealer hands out the connections), or
    with count > 1 that many sharing the port through SO_REUSEPORT (one per worker: the kernel spreads connections)."""
    family, kind, proto, addr = _probe(host, port, "--port")
    socks = []
    for _ in range(count):
        s = socket.socket(family, kind, proto)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if count > 1:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.set_inheritable(True)
        s.bind(addr)
        s.listen(BACKLOG)
        socks.append(s)
    return socks


class Dealer:
    """Accepts the server's connections on a thread of the supervisor and hands each to the next worker in turn: the
    connected socket, passed over a Unix socket pair (SCM_RIGHTS), which the worker's event loop then serves as if
    it had accepted it (kiln.server.run). A worker that is gone or not keeping up (its pair full) is passed over for
    the next; when none takes a connection for HAND_S it is closed."""

    HAND_S = 10.0

    def __init__(self, sock: socket.socket, count: int) -> None:
        self.sock = sock
        self.ends: list[socket.socket | None] = [None] * count
        self.next = 0
        self.thread = threading.Thread(target=self._run, name="dealer", daemon=True)

    def channel(self, i: int) -> socket.socket:
        """A new pair for worker i (at every start of it): the worker's end, to pass to it and close here after."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        mine.setblocking(False)
        theirs.set_inheritable(True)
        old, self.ends[i] = self.ends[i], mine
        if old is not None:
            old.close()
        return theirs

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """No more connections: the listening socket closes, so new ones are refused while the workers drain."""
        if not self.thread.is_alive():
            return
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread out of accept()
        except OSError:
            pass
        self.sock.close()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # stopped
            with conn:
                self._hand(conn)

    def _hand(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + self.HAND_S
        while True:
            for _ in range(len(self.ends)):
                i = self.next
                self.next = (i + 1) % len(self.ends)
                end = self.ends[i]
                if end is None:
                    continue
                try:
                    socket.send_fds(end, [b"c"], [conn.fileno()])
                except OSError:  # gone (restarting) or its pair is full: the next worker
                    continue
                return
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)


def share_of_cores(count: int) -> int:
    """Intra-op threads per worker: the cores this process may use, divided among the workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // count)


def supervise(settings: Settings, count: int, *, on_listening: object = None) -> int:
    """Run `count` workers until SIGTERM/SIGINT; returns the exit code."""
    reuseport = os.environ.get("KILN_REUSEPORT") == "1"
    socks = listen(settings.host, settings.port, count if reuseport else 1)
    dealer = Dealer(socks[0], count)
    if settings.grpc_port is not None:  # the workers' gRPC servers share it through SO_REUSEPORT
        _probe(settings.host, settings.grpc_port, "--grpc-port")
    settings.port = socks[0].getsockname()[1]
    devices = (settings.overrides.get("devices") or []) if settings.worker_devices == "engine" else []
    if not devices:  # with engines the workers run no model: the engines share the cores instead
        settings.defaults = {"threads": share_of_cores(count), **settings.defaults}
    rundir = Path(tempfile.mkdtemp(prefix="kiln-serve-"))
    esocks, slots = [engine.listen(rundir, i) for i in range(len(devices))], None
    if devices:
        slots = engine.shm_dir(rundir)
        settings.engines = {"rundir": str(rundir), "slots": str(slots)}
    if callable(on_listening):
        on_listening(settings.port)

    def spawn(i: int) -> subprocess.Popen[bytes]:
        with contextlib.nullcontext(socks[i]) if reuseport else dealer.channel(i) as sock:
            doc = {"settings": asdict(settings), "index": i, "count": count, "fd": sock.fileno(), "rundir": str(rundir),
                   "listening": reuseport, "parent": os.getpid()}
            return subprocess.Popen([sys.executable, "-m", "kiln.server.workers"],
                                    env={**WORKER_ENV, **os.environ, ENV: json.dumps(doc)}, pass_fds=[sock.fileno()])

    def spawn_engine(i: int) -> subprocess.Popen[bytes]:
        doc = {"device": devices[i], "fd": esocks[i].fileno(), "slots": str(slots), "grace_s": settings.grace_s,
               "threads": share_of_cores(len(devices)), "parent": os.getpid()}
        return subprocess.Popen([sys.executable, "-m", "kiln.server.engine"],
                                env={**WORKER_ENV, **os.environ, engine.ENV: json.dumps(doc)}, pass_fds=[esocks[i].fileno()])

    engines = [spawn_engine(i) for i in range(len(devices))]  # first: the workers' models wait for them
    procs = [spawn(i) for i in range(count)]
    if not reuseport:
        dealer.start()
    state = {"stopping": False, "forced": False}

    def stop_all(sig: int = signal.SIGTERM) -> None:
        dealer.stop()
        for p in procs if sig == signal.SIGTERM else procs + engines:  # engines stop once the workers drained
            if p.poll() is None:
                p.send_signal(sig)

    def on_signal(sig: int, _: FrameType | None) -> None:
        if state["stopping"] and sig == signal.SIGINT:  # a second Ctrl-C: stop now
            state["forced"] = True
            stop_all(signal.SIGKILL)
            return
        state["stopping"] = True
        stop_all(signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    deaths: collections.deque[float] = collections.deque()
    code = 0
    try:
        while not state["stopping"]:
            time.sleep(0.2)
            for i, p in [*enumerate(procs), *((-1 - i, e) for i, e in enumerate(engines))]:
                rc = p.poll()
                if rc is None or state["stopping"]:
                    continue
                if rc == NO_MODEL and i >= 0:  # the worker's own verdict: the others would say the same
                    print(f"kiln serve: worker {i} could load no model; stopping", file=sys.stderr, flush=True)
                    code = 1
                    state["stopping"] = True
                    stop_all()
                    break
                now = time.monotonic()
                deaths.append(now)
                while deaths and deaths[0] < now - RESTART_WINDOW_S:
                    deaths.popleft()
                how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
                who = f"worker {i}" if i >= 0 else f"engine on {devices[-1 - i]}"
                if len(deaths) > MAX_RESTARTS:
                    print(f"kiln serve: {who} died ({how}), the {len(deaths)}th time in {RESTART_WINDOW_S:.0f} s; "
                          "stopping", file=sys.stderr, flush=True)
                    code = 1
                    state["stopping"] = True
                    stop_all()
                    break
                print(f"kiln serve: {who} (pid {p.pid}) died ({how}); restarting it", file=sys.stderr, flush=True)
                if i >= 0:
                    if slots is not None:  # its shared-memory slots die with it (a new worker makes its own)
                        for f in slots.glob(f"{engine.slot_prefix(p.pid)}-*"):
                            f.unlink(missing_ok=True)
                    procs[i] = spawn(i)
                else:
                    engines[-1 - i] = spawn_engine(-1 - i)
        deadline = time.monotonic() + settings.grace_s + 2 * EXIT_MARGIN_S
        for group in (procs, engines):
            if group is engines:  # the workers are done with them
                for e in engines:
                    if e.poll() is None:
                        e.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + settings.grace_s + 2 * EXIT_MARGIN_S
            for p in group:
                try:
                    rc = p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    rc = p.wait()
                if rc != 0 and not state["forced"]:
                    code = code or 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for end in dealer.ends:
            if end is not None:
                end.close()
        for sk in socks + esocks:
            sk.close()
        shutil.rmtree(rundir, ignore_errors=True)
        if slots is not None:
            shutil.rmtree(slots, ignore_errors=True)
    return code


def worker_main() -> int:
    """A worker: the settings from the environment, its end of the Dealer's pair (the connections it is handed), a
    Unix socket for the other workers."""
    doc = json.loads(os.environ.pop(ENV))
    die_with_parent(doc["parent"])
    name_thread(f"worker-{doc['index']}")  # its event loop
    settings = Settings(**{**doc["settings"], "worker": (doc["index"], doc["count"])})
    sock = socket.socket(fileno=doc["fd"])  # a listening socket of its own (KILN_REUSEPORT=1) or the Dealer's pair
    path = socket_path(doc["rundir"], doc["index"])
    path.unlink(missing_ok=True)  # a crashed predecessor's
    uds = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    uds.bind(str(path))
    uds.listen(BACKLOG)
    threads = settings.defaults.get("threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))  # torch's intra-op pool is per process: this worker's share
    sockets, handed = ([sock, uds], None) if doc.get("listening") else ([uds], sock)
    code = serve(settings, sockets=sockets, handed=handed, peers=Peers(doc["rundir"], doc["index"], doc["count"]))
    return NO_MODEL if code == 1 else code  # 1 is also what an uncaught exception exits with: that one is restarted


if __name__ == "__main__":
    sys.exit(worker_main())
