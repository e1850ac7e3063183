"""Time a Runner the way a benchmark should: warm up, synchronise, repeat, report the median."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from kiln.runner import Runner


@dataclass
class Timing:
    batch: int
    p50_ms: float
    p90_ms: float
    items_per_s: float
    repeats: int
    p99_ms: float = 0.0


def time_runner(runner: Runner, inputs: list[torch.Tensor], *, batch: int, warmup: int = 5,
                min_time_s: float = 0.3, min_repeats: int = 10, max_repeats: int = 2000) -> Timing:
    """Median latency of `runner.run(inputs)` over enough repeats to fill `min_time_s`."""
    cuda = runner.device.startswith("cuda")
    for _ in range(warmup):
        runner.run(inputs)
    if cuda:
        torch.cuda.synchronize()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        runner.run(inputs)
        if cuda:
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    p50 = statistics.median(samples)
    p90 = _quantile(samples, 0.90)
    p99 = _quantile(samples, 0.99)
    return Timing(batch, p50 * 1e3, p90 * 1e3, batch / p50, len(samples), p99 * 1e3)


def _quantile(sorted_samples: list[float], q: float) -> float:
    return sorted_samples[min(len(sorted_samples) - 1, int(q * len(sorted_samples)))]
