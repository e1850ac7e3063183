"""A served model: its runners (instances x devices), its batcher, and what it has done."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln import repository
from kiln.data import batch_dim
from kiln.runner import Runner
from kiln.server.batcher import Batcher, BatchInfo
from kiln.server.codec import Decoded
from kiln.server.config import ModelConfig
from kiln.signature import example_inputs
from kiln.spec import TensorSpec


def name_thread(name: str) -> None:
    """Name the calling thread for the OS (Linux: /proc/PID/task/TID/comm, top -H, py-spy), so that a busy thread
    in a profile or in bench/multigpu.py's per-thread CPU says what it is. 15 characters at most; elsewhere a no-op."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15] + b"\0", 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def die_with_parent(parent: int) -> None:
    """Linux: have the kernel send this process SIGTERM when `parent` (the supervisor that started it) dies, so
    that a supervisor killed with SIGKILL leaves no worker or engine behind holding a port or a GPU; if it died
    before this call, stop now. (The signal follows the thread that spawned the process: kiln.server.workers spawns
    and restarts from the supervisor's main thread.) Elsewhere a no-op."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class Stats:
    """Counters in the shape of Triton's statistics extension (times in nanoseconds)."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_count: int = 0
    compute_ns: int = 0
    compute_input_ns: int = 0  # rows merged and converted to tensors
    compute_infer_ns: int = 0  # the runtime itself
    compute_output_ns: int = 0  # outputs converted and split back per request
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batch_sizes: dict[int, list[int]] = field(default_factory=dict)  # rows -> [count, compute ns]


class ServedModel:
    def __init__(self, name: str, version_dir: Path, manifest: dict[str, Any], config: ModelConfig,
                 *, observer: Any = None) -> None:
        self.name = name
        self.version = str(manifest["version"])
        self.version_dir = version_dir
        self.manifest = manifest
        self.config = config
        self.inputs = [TensorSpec.from_dict(s) for s in manifest["inputs"]]
        self.outputs = [TensorSpec.from_dict(s) for s in manifest["outputs"]]
        self.batched = batch_dim(self.inputs) is not None
        self.variant = config.variant or manifest["selected"]
        self.stats = Stats()
        self.ready = False
        self.runners: list[Runner] = []
        self._streams: dict[int, torch.cuda.Stream] = {}  # id(runner) -> its CUDA stream, when instances share a GPU
        self._free: asyncio.Queue[Runner] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._observer = observer
        self.batcher: Batcher | None = None
        self.watch: Any = None  # kiln.server.fidelity.DriftWatch when --shadow-rate is set

    def describe(self) -> str:
        return f"{len(self.runners)} instance(s)"

    def queue_depth(self) -> int:
        return self.batcher.queue_depth if self.batcher is not None else 0

    def in_flight(self) -> int:
        return self.batcher.in_flight if self.batcher is not None else 0

    def load(self) -> None:
        """Blocking: load and warm every runner (called in a worker thread so the loop keeps serving).

        Instances that share a GPU each run their batches (copies in, the model, copies out) on a CUDA stream of
        their own (a runner computes on its caller's stream), so that one batch's kernels fill the gaps and tails
        of another's. On an H100 two instances gave BERT-base 20,908 seq/s and ResNet-50 34,676 img/s against
        20,043 and 33,086 for one; on one shared stream they serialise (20,153 and 33,182). A runner under a
        stream of its own is as fast as on the default one (ResNet-50 at batch 1: 0.408 and 0.403 ms), so one
        instance simply keeps the thread's stream (`python3 bench/gpu_streams.py`,
        bench/results/gpu-streams-h100.txt)."""
        for device in self.config.devices:
            for _ in range(self.config.instances):
                runner = repository.load(self.version_dir, device=device, variant=self.variant,
                                         threads=self.config.threads, spin=self.config.spin)
                if self.config.instances > 1 and device.startswith("cuda"):
                    self._streams[id(runner)] = torch.cuda.Stream(torch.device(device))
                with self._stream(runner):
                    self._warm(runner)
                self.runners.append(runner)

    def _stream(self, runner: Runner) -> contextlib.AbstractContextManager[Any]:
        """The runner's own CUDA stream made current, or nothing when it has none."""
        stream = self._streams.get(id(runner))
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def graph_buckets(self) -> list[int]:
        """The batch sizes this variant captured CUDA graphs for (a batch runs padded to the next), or []."""
        meta = repository.candidate(self.manifest, self.variant)["artifact"].get("meta") or {}
        return [int(b) for b in meta.get("cudagraph_buckets") or []]

    def _warm(self, runner: Runner) -> None:
        xs = example_inputs(self.inputs)
        sizes = [1, self.config.max_batch_size] if self.batched else [1]
        if self.batched:  # a CUDA-graph variant captures every bucket now, not while serving
            sizes = sorted({*sizes, *(b for b in self.graph_buckets() if b < self.config.max_batch_size)})
        for n in sizes:
            batch = [x[:1].repeat(n, *[1] * (x.dim() - 1)) for x in xs] if self.batched else xs
            for _ in range(2):
                runner.run(batch)

    def start(self) -> None:
        """Start batching on the running loop; the model is ready afterwards."""
        if self.runners:
            self._free = asyncio.Queue()
            for r in self.runners:
                self._free.put_nowait(r)
            self._pool = ThreadPoolExecutor(max_workers=len(self.runners), thread_name_prefix=f"kiln-{self.name}",
                                            initializer=name_thread, initargs=(f"run-{self.name}",))
        self.batcher = Batcher(self._run_batch, **self._batching())
        self.batcher.start()
        self.ready = True

    def _batching(self) -> dict[str, Any]:
        """The batcher's settings: one batch in flight per runner."""
        c = self.config
        return {"max_batch_size": c.max_batch_size if self.batched else 1, "max_delay_ms": c.max_delay_ms,
                "max_queue_size": c.max_queue_size, "preferred_batch_sizes": c.preferred_batch_sizes,
                "instances": len(self.runners), "adaptive": c.adaptive_batching, "observer": self._observe}

    async def stop(self, *, drain_s: float = 30.0) -> None:
        self.ready = False
        if self.watch is not None:
            self.watch.stop()
        if self.batcher is not None:
            await self.batcher.stop(drain_s=drain_s)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def infer(self, req: Decoded, *, timeout_s: float | None) -> list[np.ndarray]:
        assert self.batcher is not None
        key = tuple(a.shape[1:] for a in req.arrays) if self.batched else None
        out = await self.batcher.submit(req.arrays, rows=req.rows, key=key,
                                        timeout_s=timeout_s or self.config.timeout_ms / 1e3)
        if self.watch is not None:
            self.watch.offer(req.arrays, out)
        return out

    async def _run_batch(self, payloads: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        assert self._free is not None and self._pool is not None
        runner = await self._free.get()
        try:
            results, phases = await asyncio.get_running_loop().run_in_executor(self._pool, self._execute, runner, payloads)
        finally:
            self._free.put_nowait(runner)
        s = self.stats  # updated on the event loop thread: instances in worker threads never race on it
        s.compute_input_ns += phases[0]
        s.compute_infer_ns += phases[1]
        s.compute_output_ns += phases[2]
        return results

    def _execute(self, runner: Runner, payloads: list[list[np.ndarray]]) -> tuple[list[list[np.ndarray]], tuple[int, int, int]]:
        """In a worker thread: merge rows, run once, split rows back to their requests. Also returns the nanoseconds
        spent on input, inference and output (Triton's compute_input / compute_infer / compute_output)."""
        t0 = time.perf_counter_ns()
        gpu = runner.device.startswith("cuda")
        with self._stream(runner):
            xs = _merge(payloads, self.inputs, pinned=gpu, device=runner.device if gpu else None)
            t1 = time.perf_counter_ns()
            raw = runner.run(xs)
            t2 = time.perf_counter_ns()
            outs = [o.float().numpy(force=True) if o.dtype == torch.bfloat16 else o.numpy(force=True) for o in raw]
        return split_rows(outs, payloads), (t1 - t0, t2 - t1, time.perf_counter_ns() - t2)

    def _observe(self, info: BatchInfo) -> None:
        s = self.stats
        s.execution_count += 1
        s.inference_count += info.rows
        s.queue_count += info.requests
        s.queue_ns += int(sum(info.queue_s) * 1e9)
        s.compute_count += 1
        s.compute_ns += int(info.compute_s * 1e9)
        s.last_inference_ms = int(time.time() * 1e3)
        b = s.batch_sizes.setdefault(info.rows, [0, 0])
        b[0] += 1
        b[1] += int(info.compute_s * 1e9)
        if self._observer is not None:
            self._observer(self, info)


def split_rows(outs: list[np.ndarray], payloads: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """A batch's outputs split back into each request's rows (views), in request order."""
    if len(payloads) == 1:
        return [outs]
    bounds = np.cumsum([0] + [len(p[0]) for p in payloads])
    return [[o[lo:hi] for o in outs] for lo, hi in zip(bounds[:-1], bounds[1:])]


def _merge(payloads: list[list[np.ndarray]], specs: list[TensorSpec], *, pinned: bool,
           device: str | None = None) -> list[torch.Tensor]:
    """The requests' arrays of each input as one tensor of the input's dtype, rows in request order.

    For a GPU runner the rows are written straight into page-locked memory (torch's caching host allocator), which
    the host-to-device copy reads without staging: one host copy per batch instead of two (merge, then pin). Rows
    that already lie in page-locked memory (an engine's shared-memory slots, kiln.server.engine) are not copied on
    the host at all: the GPU gathers them into one tensor on `device`."""
    out = []
    for k, spec in enumerate(specs):
        parts = [p[k] for p in payloads]
        if pinned and device is not None and parts[0].ndim:
            locked = _page_locked(parts)
            if locked is not None:
                dst = torch.empty((sum(len(t) for t in locked), *locked[0].shape[1:]), dtype=spec.torch_dtype,
                                  device=device)
                lo = 0
                for t in locked:  # on the device's current stream, which the runner's work follows
                    dst[lo:lo + len(t)].copy_(t, non_blocking=True)
                    lo += len(t)
                out.append(dst)
                continue
        if pinned and spec.torch_dtype != torch.bfloat16 and parts[0].ndim:
            dst = torch.empty((sum(len(a) for a in parts), *parts[0].shape[1:]), dtype=spec.torch_dtype, pin_memory=True)
            if len(parts) == 1:
                dst.numpy()[...] = parts[0]
            else:
                np.concatenate(parts, out=dst.numpy())
            out.append(dst)
            continue
        a = parts[0] if len(parts) == 1 else np.concatenate(parts)
        # Binary request data arrives as read-only views of the body; torch wants writable memory.
        out.append(torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else np.array(a)).to(spec.torch_dtype))
    return out


def _page_locked(parts: list[np.ndarray]) -> list[torch.Tensor] | None:
    """The parts as tensors when every one lies in page-locked host memory, else None. Request bodies are read-only
    views, so the common case costs one flag test."""
    if not all(a.flags.writeable and a.flags.c_contiguous and not a.dtype.hasobject for a in parts):
        return None
    try:
        tensors = [torch.from_numpy(a) for a in parts]
    except TypeError:  # a dtype torch has no tensor for
        return None
    return tensors if all(t.is_pinned() for t in tensors) else None
