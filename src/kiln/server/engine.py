"""`kiln serve --workers N --worker-devices engine`: one engine process per device runs the models; the N workers
only speak HTTP/gRPC, validate and batch requests, and hand each batch to an engine through shared memory.

Why: with `share` or `split`, every worker that runs a model on a GPU holds its own CUDA context there. A GPU
time-slices between contexts, so the small batches of eight workers never overlap on it, and each worker batches
only the requests that happen to reach it (bench/multigpu.py: one H200 was 82-94% busy at 5,300-8,300 img/s, where
it makes 14,400 img/s alone on large batches). An engine is the one context on its GPU, and it batches again
across every worker's batches; the workers keep the front end's CPU work (parsing, decoding, validation) spread
over the cores, as Triton's HTTP threads hand requests to one backend per GPU.

The path of one batch:
- a worker's batcher merges its requests' rows straight into a shared-memory slot (a file in a tmpfs folder the
  supervisor made; no copy beyond the one a worker made before, into pinned memory);
- it sends the engine a short header over a Unix socket: model, rows, where each input lies in which slot;
- the engine maps the slot once (and, on a GPU, page-locks it with cudaHostRegister, so the host-to-device copy
  reads the slot itself), queues the rows in the model's batcher with every other worker's, runs the batch,
  and sends the outputs back on the socket (outputs are small next to inputs: logits, embeddings).

An engine loads a model when the first worker asks for it (`load`), once, and keeps it. The supervisor restarts
an engine that dies; the workers' requests that were on it fail with 503 and the workers reconnect, asking it to
load their models again. Statistics and metrics describe what each worker sent (its batches, and their round
trips to the engines); each engine prints its own batch sizes to stderr when it stops.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import mmap
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import orjson

from kiln import repository
from kiln.errors import KilnError
from kiln.server.batcher import Closed, Expired, QueueFull
from kiln.server.config import ModelConfig
from kiln.server.model import ServedModel, die_with_parent, name_thread, split_rows

ENV = "KILN_SERVE_ENGINE"  # the engine's settings, as JSON
_HEAD = struct.Struct("<II")  # header length, data length
LOAD_TIMEOUT_S = 3600.0  # a compile variant takes minutes to load and warm up
CONNECT_TIMEOUT_S = 120.0  # an engine (re)starting: importing torch and CUDA takes seconds
ALIGN = 64
_ERRORS: dict[str, type[Exception]] = {"QueueFull": QueueFull, "Expired": Expired, "Closed": Closed, "KilnError": KilnError}


def socket_path(rundir: str | Path, index: int) -> Path:
    return Path(rundir) / f"engine-{index}.sock"


def slot_prefix(pid: int) -> str:
    """The names of a worker's slots start with this (the supervisor removes a dead worker's)."""
    return f"w{pid}"


def shm_dir(rundir: Path) -> Path:
    """Where workers put their slots: a folder on tmpfs (/dev/shm) when there is one, else in the run folder."""
    base = Path("/dev/shm")
    if base.is_dir() and os.access(base, os.W_OK):
        d = base / f"{rundir.name}-slots"
        d.mkdir(mode=0o700)
        return d
    d = rundir / "slots"
    d.mkdir(mode=0o700)
    return d


def _frame(doc: dict[str, Any], data_len: int = 0) -> bytes:
    head = orjson.dumps(doc)
    return _HEAD.pack(len(head), data_len) + head


def _error(e: BaseException) -> dict[str, Any]:
    kind = type(e).__name__ if type(e).__name__ in _ERRORS else "Error"
    msg = f"{e.message}; {e.hint}" if isinstance(e, KilnError) and e.hint else getattr(e, "message", None) or str(e)
    return {"error": msg, "kind": kind}


def _raise(doc: dict[str, Any], where: str) -> None:
    cls = _ERRORS.get(doc["kind"])
    if cls is KilnError:
        raise KilnError(doc["error"])
    if cls is not None:
        raise cls(doc["error"])
    raise RuntimeError(f"the engine on {where} failed: {doc['error']}")


@functools.cache
def _dtype(dt: str) -> np.dtype[Any]:
    return np.dtype(dt)


class _Frames(asyncio.Protocol):
    """A connection that carries frames (header length, data length, JSON header, data) both ways. A protocol, not
    streams: each frame is handled in the callback that received it, without a coroutine per read."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, size = 0, _HEAD.size
        while len(buf) - pos >= size:
            jl, dl = _HEAD.unpack_from(buf, pos)
            end = pos + size + jl + dl
            if len(buf) < end:
                break
            doc = orjson.loads(buf[pos + size:pos + size + jl])
            self.frame(doc, bytes(buf[pos + size + jl:end]) if dl else b"")
            pos = end
        del buf[:pos]

    def frame(self, doc: dict[str, Any], data: bytes) -> None:
        raise NotImplementedError

    def send(self, doc: dict[str, Any], chunks: list[memoryview] | None = None) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            return
        if chunks:
            self.transport.writelines([_frame(doc, sum(c.nbytes for c in chunks)), *chunks])
        else:
            self.transport.write(_frame(doc))


# -- the engine process ---------------------------------------------------------------------------------------------
class _Connection(_Frames):
    """One worker's connection to the engine: the slots it mapped, and its requests still running."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine
        self.maps: dict[str, np.ndarray] = {}
        self.busy = 0  # requests taken and not answered
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.engine.connections.add(self)

    def frame(self, doc: dict[str, Any], data: bytes) -> None:
        self.engine.take(doc, self)

    def finished(self) -> None:
        self.busy -= 1
        if self.lost and not self.busy:
            self.engine._unmap(self.maps)

    def connection_lost(self, exc: Exception | None) -> None:
        """The worker went away (or is restarting), or the engine is stopping: the slots are unmapped once no
        request of this connection still runs (a running batch may still read them)."""
        self.lost = True
        self.engine.connections.discard(self)
        if not self.busy:
            self.engine._unmap(self.maps)


def _answered(conn: _Connection, rid: Any, op: str, fut: asyncio.Future[Any]) -> None:
    conn.finished()
    if fut.cancelled():
        conn.send({"id": rid, **_error(Closed("the engine is stopping; retry"))})
        return
    e = fut.exception()
    if e is not None:
        conn.send({"id": rid, **_error(e)})
    elif op == "load":
        conn.send({"id": rid, "model": fut.result()})
    else:
        outs = [o if o.flags.c_contiguous else o.copy(order="C") for o in fut.result()]  # 0-d outputs stay 0-d
        conn.send({"id": rid, "outputs": [[list(o.shape), o.dtype.str] for o in outs]},
                   [memoryview(o).cast("B") for o in outs])


class Engine:
    """One device's models, shared by every worker that connects."""

    def __init__(self, device: str, slots: Path, threads: int | None = None) -> None:
        self.device = device
        self.slots = slots
        self.threads = threads  # each runtime's intra-op threads unless the model's config sets them
        self.models: list[ServedModel] = []
        self._loading: dict[str, asyncio.Task[int]] = {}
        self.connections: set[_Connection] = set()
        self.pin = device.startswith("cuda")  # page-lock the slots it maps (_map refuses a slot it cannot lock)

    async def load(self, doc: dict[str, Any]) -> int:
        """The handle of the model a worker asks for, loading it first if no worker asked for it before."""
        key = json.dumps([doc["version_dir"], doc["config"]], sort_keys=True)
        task = self._loading.get(key)
        if task is None or (task.done() and task.exception() is not None):  # a failed load is tried again
            task = self._loading[key] = asyncio.create_task(self._load(doc))
        return await asyncio.shield(task)

    async def _load(self, doc: dict[str, Any]) -> int:
        vdir, manifest = repository.resolve(doc["version_dir"])
        config = ModelConfig(**{**doc["config"], "devices": [self.device], "shadow_rate": 0.0,
                                "threads": doc["config"].get("threads") or self.threads})
        served = ServedModel(doc["name"], vdir, manifest, config)
        await asyncio.to_thread(served.load)
        served.start()
        self.models.append(served)
        print(f"kiln serve: engine on {self.device}: {doc['name']} version {served.version} ({served.variant}, "
              f"{served.describe()}) ready", file=sys.stderr, flush=True)
        return len(self.models) - 1

    def take(self, doc: dict[str, Any], conn: _Connection) -> None:
        """One request from a worker: queued in the model's batcher (an inference) or started (a load); the answer
        goes back from a callback, in any order (each carries its id). No task per request: this loop is the one
        thread every worker's batches pass through (bench/engine.py measures what it costs per message)."""
        rid = doc.get("id")
        try:
            if doc["op"] == "infer":
                served = self.models[doc["model"]]
                assert served.batcher is not None
                buf = conn.maps.get(doc["slot"])
                if buf is None:
                    buf = conn.maps[doc["slot"]] = self._map(doc["slot"])
                arrays = []
                for off, shape, dt in doc["inputs"]:
                    dtype = _dtype(dt)
                    arrays.append(buf[off:off + dtype.itemsize * math.prod(shape)].view(dtype).reshape(shape))
                key = tuple(a.shape[1:] for a in arrays) if served.batched else None
                fut = served.batcher.enqueue(arrays, rows=doc["rows"], key=key, timeout_s=doc["timeout"])
            elif doc["op"] == "load":
                fut = asyncio.ensure_future(self.load(doc))
            else:
                raise KilnError(f"unknown engine operation {doc['op']!r}")
        except Exception as e:  # every failure goes back to the worker that asked, which maps it to HTTP
            conn.send({"id": rid, **_error(e)})
            return
        conn.busy += 1
        fut.add_done_callback(functools.partial(_answered, conn, rid, doc["op"]))

    def _map(self, name: str) -> np.ndarray:
        """A worker's slot, mapped (and page-locked for the GPU's copies) once per connection."""
        path = self.slots / name
        if path.parent != self.slots or path.name != name:
            raise KilnError(f"bad slot name {name!r}")
        fd = os.open(path, os.O_RDWR)
        try:
            mm = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        buf = np.frombuffer(mm, dtype=np.uint8)
        if self.pin:
            import torch

            err = int(torch.cuda.cudart().cudaHostRegister(buf.ctypes.data, buf.nbytes, 0))
            if err:
                raise KilnError(f"cannot page-lock a {buf.nbytes >> 20} MiB shared-memory slot (CUDA error {err})",
                                hint="raise the locked-memory limit (ulimit -l), or serve without --worker-devices engine")
        return buf

    def _unmap(self, maps: dict[str, np.ndarray]) -> None:
        if self.pin:
            import torch

            for buf in maps.values():
                torch.cuda.cudart().cudaHostUnregister(buf.ctypes.data)
        maps.clear()  # the mmaps close once nothing views them (a running batch may still)

    def summary(self) -> str:
        lines = []
        for m in self.models:
            sizes = sorted(m.stats.batch_sizes.items())
            total = sum(c for c, _ in m.stats.batch_sizes.values()) or 1
            mean = sum(b * c for b, (c, _) in sizes) / total
            line = (f"kiln serve: engine on {self.device}: {m.name} ran {m.stats.execution_count} batches, "
                    f"{m.stats.inference_count} rows, {mean:.1f} rows per batch")
            buckets = m.graph_buckets()
            if buckets:  # each batch ran as the next CUDA-graph bucket
                ran = {b: next((g for g in buckets if g >= b), b) for b, _ in sizes}
                padded = sum(c * (ran[b] - b) for b, (c, _) in sizes)
                line += f", {100 * padded / max(1, sum(c * ran[b] for b, (c, _) in sizes)):.0f}% of the rows it ran were padding"
            lines.append(line)
        return "\n".join(lines)


async def _engine(doc: dict[str, Any], sock: socket.socket) -> int:
    name_thread(f"engine-{doc['device']}")  # its event loop; the runner threads are run-<model>
    engine = Engine(doc["device"], Path(doc["slots"]), doc.get("threads"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # The supervisor sends SIGTERM once the workers have drained. Ctrl-C reaches the whole process group at once:
    # an engine that stopped on it would fail the requests the workers are still draining.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server = await loop.create_unix_server(lambda: _Connection(engine), sock=sock)
    await stop.wait()
    server.close()  # the workers drained before the supervisor stopped the engines
    await asyncio.gather(*(m.stop(drain_s=doc.get("grace_s", 30.0)) for m in engine.models))
    for conn in list(engine.connections):
        if conn.transport is not None:
            conn.transport.close()
    if engine.models:
        print(engine.summary(), file=sys.stderr, flush=True)
    return 0


def engine_main() -> int:
    doc = json.loads(os.environ.pop(ENV))
    die_with_parent(doc["parent"])
    if doc.get("threads"):
        import torch

        torch.set_num_threads(int(doc["threads"]))
    sock = socket.socket(fileno=doc["fd"])
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_engine(doc, sock))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (uvicorn[standard] brings it, and the workers' uvicorn runs on it): its
    transports, callbacks and timers are C, and the engine's loop is the thread every worker's batches go through."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def listen(rundir: Path, index: int) -> socket.socket:
    """The engine's Unix socket, bound by the supervisor (held across restarts: workers wait in its backlog)."""
    path = socket_path(rundir, index)
    path.unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1024)
    s.set_inheritable(True)
    return s


# -- the workers' side ----------------------------------------------------------------------------------------------
class Slots:
    """A worker's shared-memory slots: files on tmpfs, reused by size (a batch takes the smallest free one that
    fits, else a new one of the next power of two), so memory follows the batches actually sent."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder = folder
        self.prefix = prefix
        self.free: list[tuple[int, str, np.ndarray]] = []
        self.made = 0

    def take(self, nbytes: int) -> tuple[int, str, np.ndarray]:
        fits = [s for s in self.free if s[0] >= nbytes]
        if fits:
            best = min(fits, key=lambda s: s[0])
            self.free.remove(best)
            return best
        size = max(1 << 20, 1 << (nbytes - 1).bit_length())
        name = f"{self.prefix}-{self.made}"
        self.made += 1
        fd = os.open(self.folder / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return size, name, np.frombuffer(mm, dtype=np.uint8)

    def give(self, slot: tuple[int, str, np.ndarray]) -> None:
        self.free.append(slot)

    def drop(self, slot: tuple[int, str, np.ndarray]) -> None:
        """A slot an engine may still be reading (its request failed or timed out on the way): not reused; the
        file goes (an engine that mapped it keeps its mapping until the connection closes)."""
        (self.folder / slot[1]).unlink(missing_ok=True)


class _Replies(_Frames):
    """A worker's connection to an engine: the requests sent on it, answered as their replies arrive."""

    def __init__(self, link: Link) -> None:
        super().__init__()
        self.link = link
        self.pending: dict[int, asyncio.Future[tuple[dict[str, Any], bytes]]] = {}

    def frame(self, doc: dict[str, Any], data: bytes) -> None:
        fut = self.pending.pop(doc["id"], None)
        if fut is not None and not fut.done():
            fut.set_result((doc, data))

    def connection_lost(self, exc: Exception | None) -> None:
        """No answer will come for what was sent on this connection (a new one's requests are not ours to fail)."""
        if self.link.conn is self:
            self.link.conn = None
        lost, self.pending = self.pending, {}
        for fut in lost.values():
            if not fut.done():
                fut.set_exception(Closed(f"the engine for {self.link.device} stopped while running this request "
                                         "(it is being restarted); retry"))


class Link:
    """A worker's connection to one engine, shared by the worker's models; reconnects after the engine restarts."""

    def __init__(self, device: str, path: Path) -> None:
        self.device = device
        self.path = path
        self.conn: _Replies | None = None
        self.next_id = 0
        self.rows = 0  # rows sent and not answered: the worker sends a batch to the least loaded engine
        self.handles: dict[str, int] = {}  # model key -> the engine's handle for it
        self.loads: dict[str, dict[str, Any]] = {}  # model key -> its load request, to repeat after a restart
        self._connecting: asyncio.Future[None] | None = None

    def _up(self) -> bool:
        return self.conn is not None and self.conn.transport is not None and not self.conn.transport.is_closing()

    async def ready(self) -> None:
        if self._up():
            return
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        fut = self._connecting
        try:
            await asyncio.shield(fut)
        finally:
            if fut.done() and self._connecting is fut:
                self._connecting = None

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                _, conn = await loop.create_unix_connection(lambda: _Replies(self), str(self.path))
                break
            except (FileNotFoundError, ConnectionError):
                if time.monotonic() > deadline:
                    raise Closed(f"the engine for {self.device} is not answering; retry shortly") from None
                await asyncio.sleep(0.1)
        self.conn, self.handles = conn, {}
        try:
            for key in list(self.loads):  # a restarted engine loads the worker's models again
                await self._load(key)
        except BaseException:
            assert conn.transport is not None
            conn.transport.close()
            raise

    def _call(self, doc: dict[str, Any]) -> asyncio.Future[tuple[dict[str, Any], bytes]]:
        conn = self.conn
        if conn is None or not self._up():  # lost between ready() and here
            raise Closed(f"the engine for {self.device} is not connected (it is being restarted); retry")
        doc["id"] = self.next_id
        self.next_id += 1
        fut = conn.pending[doc["id"]] = asyncio.get_running_loop().create_future()
        conn.send(doc)
        return fut

    async def _load(self, key: str) -> None:
        answer, _ = await self._call(dict(self.loads[key]))
        if "error" in answer:
            _raise(answer, self.device)
        self.handles[key] = answer["model"]

    async def infer(self, key: str, doc: dict[str, Any], rows: int, timeout_s: float) -> tuple[dict[str, Any], bytes]:
        if not self._up():
            await self.ready()
        if key not in self.handles:  # loaded (by EngineModel.load) after this link connected
            await self._load(key)
        doc["model"] = self.handles[key]
        fut = self._call(doc)
        self.rows += rows
        timer = asyncio.get_running_loop().call_later(timeout_s + 5, _no_answer, fut, self.device, timeout_s)
        try:
            return await fut
        finally:
            timer.cancel()
            self.rows -= rows


def _no_answer(fut: asyncio.Future[Any], device: str, timeout_s: float) -> None:
    if not fut.done():
        fut.set_exception(Expired(f"no answer from the engine for {device} within {timeout_s * 1e3:.0f} ms"))


_LINKS: dict[int, Link] = {}  # this worker process's links (its one event loop), by engine index
_SLOTS: dict[str, Slots] = {}


class EngineModel(ServedModel):
    """A worker's view of a model that runs in the engines: requests are validated and batched here, and each
    batch runs on the least loaded engine of the model's devices."""

    def __init__(self, name: str, version_dir: Path, manifest: dict[str, Any], config: ModelConfig, *,
                 engines: list[str], rundir: str, slots: str, observer: Any = None) -> None:
        super().__init__(name, version_dir, manifest, config, observer=observer)
        missing = [d for d in config.devices if d not in engines]
        if missing:
            raise KilnError(f"{name} runs on {', '.join(missing)}, which has no engine (engines: {', '.join(engines)})",
                            hint="give every device of the model's config.toml with --device")
        where = range(len(engines)) if config.devices == engines else [engines.index(d) for d in config.devices]
        self.links = [_LINKS.setdefault(i, Link(engines[i], socket_path(rundir, i))) for i in where]
        self.slots = _SLOTS.setdefault(slots, Slots(Path(slots), slot_prefix(os.getpid())))
        self.key = json.dumps([str(version_dir), config.model_dump()], sort_keys=True)
        doc = {"op": "load", "name": name, "version_dir": str(version_dir)}
        self.load_doc = {**doc, "config": {k: v for k, v in config.model_dump().items() if k != "devices"}}

    def describe(self) -> str:
        return f"engine processes on {', '.join(link.device for link in self.links)}"

    def load(self) -> None:
        """Blocking (in a thread, like ServedModel.load): each engine has the model loaded and warm."""
        for link in self.links:
            _blocking_load(link.path, self.load_doc, link.device)
            link.loads[self.key] = self.load_doc  # asked for again if the engine restarts

    def _batching(self) -> dict[str, Any]:
        """Batch without waiting: a batch leaves when one of two in-flight places per engine is free, with what
        queued meanwhile; the engines wait out max_delay_ms for the batches of every worker."""
        return {**super()._batching(), "max_delay_ms": 0, "preferred_batch_sizes": (), "adaptive": True,
                "instances": 2 * len(self.links)}

    async def _run_batch(self, payloads: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        t0 = time.perf_counter_ns()
        rows = sum(len(p[0]) for p in payloads) if self.batched else 1
        sizes = [sum(p[k].nbytes for p in payloads) for k in range(len(self.inputs))]
        slot = self.slots.take(sum(-(-n // ALIGN) * ALIGN for n in sizes))
        try:
            inputs, off = [], 0
            for k, n in enumerate(sizes):
                parts = [p[k] for p in payloads]
                if parts[0].dtype.hasobject:
                    raise KilnError(f"input {self.inputs[k].name} holds Python objects, which cannot go to an engine")
                shape = [sum(len(a) for a in parts), *parts[0].shape[1:]] if self.batched else list(parts[0].shape)
                dst = slot[2][off:off + n].view(parts[0].dtype).reshape(shape)
                if len(parts) == 1:
                    dst[...] = parts[0]
                else:
                    np.concatenate(parts, out=dst)
                inputs.append([off, shape, parts[0].dtype.str])
                off += -(-n // ALIGN) * ALIGN
            link = min(self.links, key=lambda lk: lk.rows)
            t1 = time.perf_counter_ns()
            timeout = self.config.timeout_ms / 1e3
            answer, data = await link.infer(self.key, {"op": "infer", "rows": rows, "timeout": timeout,
                                                       "slot": slot[1], "inputs": inputs}, rows, timeout)
        except BaseException:
            self.slots.drop(slot)  # the engine may still read it: never reuse it
            raise
        self.slots.give(slot)
        t2 = time.perf_counter_ns()
        if "error" in answer:
            _raise(answer, link.device)
        outs, pos = [], 0
        for shape, dt in answer["outputs"]:
            dtype, count = _dtype(dt), math.prod(shape)
            outs.append(np.frombuffer(data, dtype=dtype, count=count, offset=pos).reshape(shape))
            pos += dtype.itemsize * count
        split = split_rows(outs, payloads)
        s = self.stats
        s.compute_input_ns += t1 - t0
        s.compute_infer_ns += t2 - t1
        s.compute_output_ns += time.perf_counter_ns() - t2
        return split


def _blocking_load(path: Path, doc: dict[str, Any], device: str) -> None:
    """Ask an engine to load a model and wait until it has (a plain socket: the worker's loop is not involved)."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            break
        except (FileNotFoundError, ConnectionError):
            s.close()
            if time.monotonic() > deadline:
                raise KilnError(f"the engine for {device} did not start within {CONNECT_TIMEOUT_S:.0f} s",
                                hint="see its messages above (kiln serve: engine ...)") from None
            time.sleep(0.1)
    with s, s.makefile("rb") as f:
        s.settimeout(LOAD_TIMEOUT_S)
        s.sendall(_frame({**doc, "id": 0}))
        head = f.read(_HEAD.size)
        jl = _HEAD.unpack(head)[0] if len(head) == _HEAD.size else 0
        body = f.read(jl)
        if not jl or len(body) < jl:
            raise KilnError(f"the engine for {device} stopped while loading the model",
                            hint="see its messages above (kiln serve: engine ...)")
        answer = json.loads(body)
    if "error" in answer:
        raise KilnError(f"the engine for {device} could not load {doc['name']}: {answer['error']}")


if __name__ == "__main__":
    sys.exit(engine_main())
