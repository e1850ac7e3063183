"""Peak memory while a block runs: process RSS growth on CPU, max_memory_allocated on CUDA."""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MB = 1 << 20


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; ru_maxrss elsewhere, which only grows)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """
    >>> with PeakMemory("cpu") as mem:
    ...     runner.run(xs)
    >>> mem.peak_mb, mem.timeline[:3]
    """

    def __init__(self, device: str = "cpu", *, interval_s: float = 0.002) -> None:
        self.device = device
        self.interval_s = interval_s
        self.timeline: list[tuple[float, float]] = []  # (seconds since start, RSS MB)
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        self._t0 = time.perf_counter()
        self._base = rss_bytes()
        self._max = self._base
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_base = torch.cuda.memory_allocated(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True, name="kiln-rss")
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            r = rss_bytes()
            self._max = max(self._max, r)
            self.timeline.append((time.perf_counter() - self._t0, r / MB))
            self._stop.wait(self.interval_s)

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._max = max(self._max, rss_bytes())
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._cuda_base) / MB
        else:
            self.peak_mb = (self._max - self._base) / MB
