"""The batcher alone: plain asyncio, a handler that records what it was given."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from kiln.server.batcher import Batcher, BatchInfo, Closed, Expired, QueueFull


class Recorder:
    """Records each batch and when it started. With `gated`, a batch holds until `release()`: a test knows a batch
    is executing (`started` is set) instead of sleeping and hoping."""

    def __init__(self, delay_s: float = 0.0, *, gated: bool = False) -> None:
        self.calls: list[list[Any]] = []
        self.times: list[float] = []
        self.delay_s = delay_s
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()

    def release(self) -> None:
        self.gate.set()

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.calls.append(list(items))
        self.times.append(time.monotonic())
        self.started.set()
        await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        for x in items:
            if x == "boom":
                raise ValueError("boom")
        return [f"out:{x}" for x in items]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_concurrent_requests_are_merged_and_split_back() -> None:
    async def main() -> None:
        rec = Recorder()
        infos: list[BatchInfo] = []
        b = Batcher(rec, max_batch_size=8, max_delay_ms=20, observer=infos.append)
        b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(20)))
        assert results == [f"out:{i}" for i in range(20)]
        assert [len(c) for c in rec.calls] == [8, 8, 4]
        assert sum(i.rows for i in infos) == 20 and all(len(i.queue_s) == i.requests for i in infos)
        await b.stop()

    run(main())


def test_rows_count_against_max_batch_size() -> None:
    async def main() -> None:
        rec = Recorder()
        b = Batcher(rec, max_batch_size=10, max_delay_ms=20)
        b.start()
        await asyncio.gather(*(b.submit(i, rows=4) for i in range(5)))
        assert [len(c) for c in rec.calls] == [2, 2, 1]  # 4+4 fits in 10, a third would not
        await b.stop()

    run(main())


def test_a_smaller_request_behind_one_that_does_not_fit_joins_the_batch() -> None:
    """Array payloads of different sizes: taking the one that fits from behind one that does not must not compare
    arrays (an engine batching workers' batches hit this: 30 rows queued ahead of 16, with room for 24)."""
    import numpy as np

    async def main() -> None:
        calls: list[list[int]] = []

        async def handler(items: list[Any]) -> list[Any]:
            calls.append([len(x) for x in items])
            return [len(x) for x in items]

        b = Batcher(handler, max_batch_size=40, max_delay_ms=50, adaptive=False)
        b.start()
        sizes = [16, 30, 16]
        work = asyncio.gather(*(b.submit(np.zeros((n, 3), np.float32), rows=n) for n in sizes))
        got = await asyncio.wait_for(work, 10)  # before the fix the batcher's loop died and nothing was answered
        assert got == sizes and calls == [[16, 16], [30]]
        await b.stop()

    run(main())


def test_window_opens_at_first_request() -> None:
    async def main() -> None:
        rec = Recorder()
        b = Batcher(rec, max_batch_size=64, max_delay_ms=600, adaptive=False)
        b.start()
        t_a = time.monotonic()
        first = asyncio.create_task(b.submit("a"))
        await asyncio.sleep(0.3)  # the scenario itself: "b" arrives 300 ms into the window
        second = asyncio.create_task(b.submit("b"))
        await asyncio.gather(first, second)
        assert rec.calls == [["a", "b"]]
        # the batch ran when the window that "a" opened closed (600 ms after "a"), not 600 ms after "b" (900 ms)
        ran_after = rec.times[0] - t_a
        assert 0.59 <= ran_after < 0.85, ran_after
        await b.stop()

    run(main())


def test_adaptive_lone_request_does_not_wait() -> None:
    async def main() -> None:
        rec = Recorder()
        b = Batcher(rec, max_batch_size=64, max_delay_ms=2000)
        b.start()
        t0 = time.monotonic()
        for i in range(3):  # one client, one request at a time
            assert await b.submit(i) == f"out:{i}"
        assert time.monotonic() - t0 < 1.0 and rec.calls == [[0], [1], [2]]
        await b.stop()

    run(main())


def test_adaptive_waits_for_known_concurrency() -> None:
    """Four clients in lock-step: after the first round the batcher expects four and waits for all."""
    async def main() -> None:
        rec = Recorder(delay_s=0.01)
        b = Batcher(rec, max_batch_size=64, max_delay_ms=500)
        b.start()

        async def client(c: int) -> None:
            for i in range(5):
                await asyncio.sleep(0.002 * c)  # staggered arrivals
                await b.submit((c, i))

        await asyncio.gather(*(client(c) for c in range(4)))
        assert max(len(c) for c in rec.calls) == 4 and len(rec.calls) <= 10
        await b.stop()

    run(main())


def test_preferred_size_runs_without_waiting() -> None:
    async def main() -> None:
        rec = Recorder()
        b = Batcher(rec, max_batch_size=64, max_delay_ms=5000, preferred_batch_sizes=[4])
        b.start()
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(4))), 2)
        assert time.monotonic() - t0 < 1 and [len(c) for c in rec.calls] == [4]
        await b.stop()

    run(main())


def test_different_keys_never_share_a_batch() -> None:
    async def main() -> None:
        rec = Recorder()
        b = Batcher(rec, max_batch_size=8, max_delay_ms=20)
        b.start()
        await asyncio.gather(*(b.submit(i, key=i % 2) for i in range(6)))
        assert sorted(sorted(c) for c in rec.calls) == [[0, 2, 4], [1, 3, 5]]
        await b.stop()

    run(main())


def test_a_failing_request_fails_alone() -> None:
    async def main() -> None:
        rec = Recorder()
        b = Batcher(rec, max_batch_size=8, max_delay_ms=20)
        b.start()
        res = await asyncio.gather(b.submit("x"), b.submit("boom"), b.submit("y"), return_exceptions=True)
        assert res[0] == "out:x" and res[2] == "out:y" and isinstance(res[1], ValueError)
        await b.stop()

    run(main())


def test_a_refusal_from_downstream_fails_the_batch_without_retries() -> None:
    """An engine's full queue (or deadline, or restart) is nobody's fault: every request gets it, none is re-sent."""
    async def main() -> None:
        calls: list[int] = []

        async def handler(items: list[Any]) -> list[Any]:
            calls.append(len(items))
            raise QueueFull("the engine's queue is full")

        b = Batcher(handler, max_batch_size=8, max_delay_ms=20, adaptive=False)
        b.start()
        got = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(g, QueueFull) for g in got) and calls == [3]
        await b.stop()

    run(main())


def test_queue_bound() -> None:
    async def main() -> None:
        rec = Recorder(gated=True)
        b = Batcher(rec, max_batch_size=1, max_delay_ms=0, max_queue_size=2)
        b.start()
        running = asyncio.create_task(b.submit("busy"))
        await rec.started.wait()  # "busy" is executing; the queue is empty
        queued = [asyncio.create_task(b.submit(i)) for i in range(2)]
        await asyncio.sleep(0)  # both queued tasks run up to their wait
        assert b.queue_depth == 2
        with pytest.raises(QueueFull):
            await b.submit("one too many")
        rec.release()
        assert await running == "out:busy" and [await q for q in queued] == ["out:0", "out:1"]
        await b.stop()

    run(main())


def test_expired_request_never_runs() -> None:
    async def main() -> None:
        rec = Recorder(gated=True)
        b = Batcher(rec, max_batch_size=1, max_delay_ms=0)
        b.start()
        busy = asyncio.create_task(b.submit("busy"))
        await rec.started.wait()
        with pytest.raises(Expired):
            await b.submit("late", timeout_s=0.05)
        rec.release()
        await busy
        await b.stop()  # the loop has looked at the queue again before it stops
        assert rec.calls == [["busy"]]  # "late" was dropped, not run

    run(main())


def test_stop_drains_then_refuses() -> None:
    async def main() -> None:
        rec = Recorder(delay_s=0.05)
        b = Batcher(rec, max_batch_size=2, max_delay_ms=1)
        b.start()
        tasks = [asyncio.create_task(b.submit(i)) for i in range(6)]
        await asyncio.sleep(0)
        await b.stop(drain_s=5)
        assert [t.result() for t in tasks] == [f"out:{i}" for i in range(6)]
        with pytest.raises(Closed):
            await b.submit("after")

    run(main())


def test_handler_returning_wrong_length_is_an_error() -> None:
    async def bad(items: list[Any]) -> list[Any]:
        return []

    async def main() -> None:
        b = Batcher(bad, max_batch_size=4, max_delay_ms=1)
        b.start()
        with pytest.raises(RuntimeError, match="returned 0 results"):
            await b.submit(1)
        await b.stop()

    run(main())


def test_enqueue_answers_through_its_future_and_a_cancelled_request_never_runs() -> None:
    """`enqueue` is `submit` without a coroutine (an engine answers from the future's callback): the result comes
    through the future, a cancelled future withdraws its request, and the batching window still closes on time
    (a timer wakes the batch, where wait_for used to)."""

    async def main() -> None:
        rec = Recorder(gated=True)
        b = Batcher(rec, max_batch_size=8, max_delay_ms=30, adaptive=False)
        b.start()
        first = b.enqueue("a")
        await rec.started.wait()  # "a" runs alone (the only instance is then busy)
        withdrawn, kept = b.enqueue("b"), b.enqueue("c")
        withdrawn.cancel()
        rec.release()
        assert await first == "out:a" and await kept == "out:c"
        assert rec.calls == [["a"], ["c"]]
        assert b._outstanding == 0  # every answered or withdrawn request left the count
        t0 = time.monotonic()
        assert await b.enqueue("d") == "out:d"  # alone: runs when the 30 ms window ends, not before, not much after
        assert 0.025 <= time.monotonic() - t0 < 0.5
        await b.stop()

    run(main())
