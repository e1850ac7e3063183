"""Dynamic batching: merge concurrent requests into batches for `async handler(list) -> list`.

The batcher knows nothing of HTTP or backends. Every request gets a Future. The delay window opens
when the first request of a batch arrives (not when collection starts). A batch that fails is
retried one request at a time so that a bad request fails alone.

Waiting is adaptive: the batcher remembers the peak number of concurrent requests over the last
100-200 ms, and stops waiting once a batch holds that many requests, since nobody else can arrive
(clients wait for their answers). A lone client therefore never pays the delay window.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

Handler = Callable[[list[Any]], Awaitable[Sequence[Any]]]


class QueueFull(Exception):
    """The queue holds max_queue_size requests: answer 429 and let the client retry."""


class Expired(Exception):
    """The request's deadline passed before it ran; it was dropped without running."""


class Closed(Exception):
    """The batcher is shutting down and takes no new requests."""


@dataclass
class BatchInfo:
    """What one executed batch looked like, for metrics and statistics."""

    requests: int
    rows: int
    queue_s: list[float]
    compute_s: float
    failed: bool


@dataclass(eq=False)  # identity: the queue removes items by it, and payloads (arrays) have no truth value
class _Item:
    payload: Any
    rows: int
    key: Hashable
    future: asyncio.Future[Any]
    enqueued: float
    deadline: float | None
    started: float = field(default=0.0)


class Batcher:
    """
    >>> batcher = Batcher(run_batch, max_batch_size=32, max_delay_ms=2)
    >>> batcher.start(); result = await batcher.submit(x, rows=4)
    """

    def __init__(self, handler: Handler, *, max_batch_size: int = 32, max_delay_ms: float = 2.0,
                 max_queue_size: int = 1024, preferred_batch_sizes: Sequence[int] = (), instances: int = 1,
                 adaptive: bool = True, observer: Callable[[BatchInfo], None] | None = None) -> None:
        if max_batch_size < 1 or max_delay_ms < 0 or max_queue_size < 1 or instances < 1:
            raise ValueError("max_batch_size, max_queue_size and instances must be >= 1, max_delay_ms >= 0")
        self.handler = handler
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1e3
        self.max_queue_size = max_queue_size
        self.preferred = frozenset(preferred_batch_sizes)
        self.instances = instances
        self.adaptive = adaptive
        self.observer = observer
        self._queue: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._drain_deadline: float | None = None
        self._running = 0
        self._outstanding = 0  # submitted, not yet answered
        self._peak = [0, 0]  # peak outstanding in the previous and the current 100 ms
        self._peak_at = 0.0

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._queue) + self._running

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._closing = False
        self._tasks = [asyncio.create_task(self._loop(), name=f"kiln-batcher-{i}") for i in range(self.instances)]

    async def stop(self, *, drain_s: float = 30.0) -> None:
        """Refuse new requests, let queued ones finish for up to `drain_s`, then cancel the rest."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=drain_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(Closed("the server is shutting down"))
        self._queue.clear()
        self._tasks = []

    def drain(self, deadline: float) -> None:
        """Take no new requests; run queued ones that can start before `deadline` (time.monotonic()), answer the rest
        with Closed (503, retry elsewhere). Running batches finish."""
        self._closing = True
        self._drain_deadline = deadline
        if self._wakeup is not None:
            self._wakeup.set()
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()), self._refuse_queued)

    def _refuse_queued(self) -> None:
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(Closed("the server is shutting down and could not run this request in time; "
                                                 "retry against another replica"))
        self._queue.clear()

    async def idle(self) -> None:
        """Return once nothing is queued or running (used while draining; polls, it is not on the request path)."""
        while self._queue or self._running:
            await asyncio.sleep(0.005)

    async def submit(self, payload: Any, *, rows: int = 1, key: Hashable = None, timeout_s: float | None = None) -> Any:
        """Queue one request of `rows` rows and wait for its result; items merge only with items of the same `key`."""
        return await self.enqueue(payload, rows=rows, key=key, timeout_s=timeout_s)

    def enqueue(self, payload: Any, *, rows: int = 1, key: Hashable = None,
                timeout_s: float | None = None) -> asyncio.Future[Any]:
        """`submit` without a coroutine: the request's future (cancelling it withdraws the request). For callers
        that answer from a callback, as an engine does for each worker's batch, without a task per request."""
        if self._closing or self._wakeup is None:
            raise Closed("the server is shutting down")
        if len(self._queue) >= self.max_queue_size:
            raise QueueFull(f"queue full ({self.max_queue_size} requests waiting)")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        item = _Item(payload, rows, key, loop.create_future(), now, now + timeout_s if timeout_s else None)
        self._queue.append(item)
        self._outstanding += 1
        if now - self._peak_at > 0.1:
            self._peak = [self._peak[1], 0]
            self._peak_at = now
        self._peak[1] = max(self._peak[1], self._outstanding)
        self._wakeup.set()
        timer = loop.call_later(timeout_s, self._expire, item, timeout_s) if timeout_s else None
        item.future.add_done_callback(functools.partial(self._answered, timer))
        return item.future

    def _answered(self, timer: asyncio.TimerHandle | None, _: asyncio.Future[Any]) -> None:
        self._outstanding -= 1
        if timer is not None:
            timer.cancel()

    @property
    def expected_concurrency(self) -> int:
        """Peak concurrent requests seen recently: more than this cannot join a batch."""
        return max(self._peak)

    @staticmethod
    def _expire(item: _Item, timeout_s: float) -> None:
        # A queued item with a done future is dropped by _take without running; a running one finishes
        # but its result is discarded.
        if not item.future.done():
            item.future.set_exception(Expired(f"no result within {timeout_s * 1e3:.0f} ms"))

    async def _loop(self) -> None:
        assert self._wakeup is not None
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = await self._collect()
            if batch:
                await self._run(batch)

    async def _collect(self) -> list[_Item]:
        first = self._take(None, self.max_batch_size, first=True)
        if first is None:
            return []
        batch, rows = [first], first.rows
        window_end = first.enqueued + self.max_delay_s
        while rows < self.max_batch_size:
            item = self._take(first.key, self.max_batch_size - rows)
            if item is not None:
                batch.append(item)
                rows += item.rows
                continue
            if rows in self.preferred or self._closing:
                break
            if self.adaptive and len(batch) >= self.expected_concurrency - self._running:
                break
            remaining = window_end - time.monotonic()
            if remaining <= 0:
                break
            assert self._wakeup is not None
            self._wakeup.clear()  # a new request or the window's end wakes it (a timer: wait_for costs a task)
            timer = asyncio.get_running_loop().call_later(remaining, self._wakeup.set)
            try:
                await self._wakeup.wait()
            finally:
                timer.cancel()
        return batch

    def _take(self, key: Hashable, room: int, *, first: bool = False) -> _Item | None:
        """The oldest live request that fits (same key, few enough rows); dead ones are dropped here."""
        now = time.monotonic()
        dead = []
        found = None
        for item in self._queue:
            if item.future.done():
                dead.append(item)
            elif item.deadline is not None and now > item.deadline:
                item.future.set_exception(Expired("the request expired in the queue before it ran"))
                dead.append(item)
            elif first or (item.key == key and item.rows <= room):
                found = item
                break
        for item in dead:
            self._queue.remove(item)
        if found is not None:
            self._queue.remove(found)
        return found

    async def _run(self, batch: list[_Item]) -> None:
        start = time.monotonic()
        for item in batch:
            item.started = start
        self._running += len(batch)
        failed = False
        try:
            try:
                results = list(await self.handler([it.payload for it in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"batch handler returned {len(results)} results for {len(batch)} requests")
            except Exception as e:
                failed = True
                if len(batch) == 1 or isinstance(e, (QueueFull, Expired, Closed)):
                    # one request; or a refusal from further down (an engine's full queue, its deadline, its restart):
                    # no request is the culprit, and sending each again alone would only add load
                    results = [e] * len(batch)
                else:  # isolate the culprit: each request alone
                    results = []
                    for it in batch:
                        try:
                            results.append((await self.handler([it.payload]))[0])
                        except Exception as e1:
                            results.append(e1)
            for it, res in zip(batch, results):
                if it.future.done():
                    continue
                if isinstance(res, BaseException):
                    it.future.set_exception(res)
                else:
                    it.future.set_result(res)
        finally:
            self._running -= len(batch)
        if self.observer is not None:
            self.observer(BatchInfo(len(batch), sum(it.rows for it in batch), [start - it.enqueued for it in batch],
                                    time.monotonic() - start, failed))
