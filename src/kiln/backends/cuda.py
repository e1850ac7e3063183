"""What every torch backend does on a CUDA device: cudnn autotuning, fp32 that really is fp32, host<->device
copies through pinned memory on a side stream, and CUDA graphs per batch bucket.

Imports nothing from CUDA at module level: on a CPU machine this module loads and its entry points say why
they cannot run.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kiln.errors import Skip

Fn = Callable[[list[torch.Tensor]], Sequence[torch.Tensor]]
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64)  # and four steps per doubling above 64
MAX_GRAPHS = 64  # shape keys captured per runner; beyond that a batch runs without a graph


def configure(device: str) -> None:
    """Check the GPU is there, and set torch's process-wide CUDA flags once per process (not on every load):
    cudnn picks the fastest convolution algorithm per shape (benchmark mode); fp32 variants are not silently
    TF32 (which loses ~3 decimal digits and fails a 1e-3 budget on deep models): TF32 would be its own variant.
    The flags are logged on `kiln.cuda` when set."""
    if not torch.cuda.is_available():
        raise Skip("no CUDA GPU on this machine")
    _set_process_flags()


@functools.cache
def _set_process_flags() -> None:
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    logging.getLogger("kiln.cuda").info("set cudnn.benchmark=True, cudnn.allow_tf32=False, matmul.allow_tf32=False")


def buckets_for(batch_sizes: Sequence[int], max_batch: int = 64) -> list[int]:
    """The batch sizes to capture CUDA graphs for, up to the largest batch the model is built or served for (and
    those sizes themselves): powers of two to 32, then 48 and 64, then four steps per doubling (80, 96, 112, 128,
    160, 192, ...). A batch runs padded to the next bucket, so above 64 rows less than a fifth of a replay is
    padding, where powers of two padded up to half (an engine's batches of 129-255 rows all ran as 256)."""
    top = max([max_batch, *batch_sizes])
    sizes = set(DEFAULT_BUCKETS)
    base = 64
    while base < top:
        sizes.update(range(base + base // 4, 2 * base + 1, base // 4))
        base *= 2
    return sorted({b for b in sizes if b <= top} | {top} | set(batch_sizes))


class Transfer:
    """Host->device copies from pinned memory on a side stream, so the copy for one batch overlaps the compute of
    another (instances run in parallel threads); the compute stream waits on the copy's event, not the host."""

    def __init__(self, device: str) -> None:
        self.device = _indexed(device)
        self.stream = torch.cuda.Stream(self.device)

    def to_device(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if all(x.device == self.device for x in xs):
            return xs
        # No wait on the compute stream first: the pinned staging buffers come from torch's caching host allocator
        # and the device buffers are fresh allocations, so nothing the copy writes is still being read.
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            out = [x if x.device == self.device else
                   (x.pin_memory() if x.device.type == "cpu" and not x.is_pinned() else x).to(self.device, non_blocking=True)
                   for x in xs]
        compute.wait_stream(self.stream)
        for t in out:
            t.record_stream(compute)  # allocated on the side stream, used on the compute stream
        return out

    def to_host(self, outs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Device -> pinned host copies queued on the compute stream, one synchronisation for all of them."""
        host = [o.to("cpu", non_blocking=True) for o in outs]
        torch.cuda.current_stream(self.device).synchronize()
        return host


def _indexed(device: str) -> torch.device:
    """`cuda` -> `cuda:<current>`, so device comparisons with tensors (always indexed) hold."""
    d = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d


_CAPTURE_LOCKS: dict[torch.device, threading.Lock] = {}
_CAPTURE_LOCKS_LOCK = threading.Lock()


def _capturing(device: torch.device) -> threading.Lock:
    """The process's capture lock for `device`. Two instances of a model on one GPU (--instances 2) capturing a
    bucket each at the same time fail ("already recording to mempool_id" in bench/multigpu.py --instances 2,
    "operation not permitted when stream is capturing" in tests/test_cuda.py): captures are rare, replays take no
    such lock."""
    with _CAPTURE_LOCKS_LOCK:
        return _CAPTURE_LOCKS.setdefault(device, threading.Lock())


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, static_in: list[torch.Tensor], static_out: list[torch.Tensor]) -> None:
        self.graph, self.static_in, self.static_out = graph, static_in, static_out


class GraphBuckets:
    """CUDA graphs for fixed batch buckets: a batch is padded to the next bucket, copied into the graph's static
    inputs, replayed, and the outputs sliced back to its rows. One graph per (bucket, other dims); captured on
    first use (the server's warm-up and the build's timing runs capture the common ones)."""

    def __init__(self, fn: Fn, device: str, buckets: Sequence[int]) -> None:
        self.fn = fn
        self.device = _indexed(device)
        self.buckets = sorted(buckets)
        self.graphs: dict[tuple[Any, ...], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.lock = threading.Lock()

    def __call__(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        n = xs[0].shape[0] if xs and xs[0].dim() else 0
        bucket = next((b for b in self.buckets if b >= n), None) if n else None
        if bucket is None:
            return list(self.fn(xs))
        key = (bucket, *((tuple(x.shape[1:]), x.dtype) for x in xs))
        with self.lock:
            g = self.graphs.get(key)
            if g is None:
                if len(self.graphs) >= MAX_GRAPHS:
                    return list(self.fn(xs))
                with _capturing(self.device):  # one capture at a time per device, whichever instance captures
                    g = self.graphs[key] = self._capture(bucket, xs)
            for s, x in zip(g.static_in, xs):
                s[:n].copy_(x, non_blocking=True)
            g.graph.replay()
            return [o[:n].clone() if o.dim() and o.shape[0] == bucket else o.clone() for o in g.static_out]

    def _capture(self, bucket: int, xs: list[torch.Tensor]) -> _Graph:
        static_in = []
        for x in xs:
            s = torch.zeros((bucket, *x.shape[1:]), dtype=x.dtype, device=self.device)
            s[: x.shape[0]].copy_(x)
            if x.shape[0] < bucket:  # padding rows repeat a real row: valid input for any model (ids, masks)
                s[x.shape[0]:].copy_(x[:1].expand(bucket - x.shape[0], *x.shape[1:]))
            static_in.append(s)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up outside the graph: cudnn autotuning, lazy inits, compile
                self.fn(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # An explicit capture stream on this device: torch.cuda.graph's default is one stream for the whole process,
        # made on whichever device was current first, and capturing a cuda:1 model on a cuda:0 stream fails.
        # thread_local: another thread's work (a runner on the other GPU, a pinned copy) must not void this capture.
        with torch.cuda.graph(graph, pool=self.pool, stream=side, capture_error_mode="thread_local"):
            static_out = list(self.fn(static_in))
        return _Graph(graph, static_in, static_out)


def wrap(call: Fn, device: str, *, graphs: Sequence[int] | None = None) -> Fn:
    """The device side of a torch Runner: inputs to the device through Transfer, the call (through CUDA graphs
    when `graphs` lists buckets), outputs back to the host when the inputs came from the host."""
    configure(device)
    transfer = Transfer(device)
    run: Fn = GraphBuckets(call, device, graphs) if graphs else call
    where = _indexed(device)

    def fn(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        # The current device is per thread and starts at cuda:0: a runner on cuda:1 called from a server's or
        # predict's worker thread must make its own device current, or graph capture runs on cuda:0's stream.
        with torch.cuda.device(where):
            on_host = any(x.device.type == "cpu" for x in xs)
            outs = run(transfer.to_device(xs))
            return transfer.to_host(outs) if on_host else list(outs)

    return fn
