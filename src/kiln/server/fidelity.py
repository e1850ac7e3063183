"""Drift watch: a sample of live requests also runs through the repository's fp32 reference variant, off the
hot path, and the served variant's agreement with it is measured per output, by the output's kind.

The verification at build time saw the build's data; live traffic can differ (another distribution, longer
inputs, values the calibration never saw), and an int8 or half-precision variant that passed can drift there.
`kiln serve --shadow-rate 0.01` samples 1% of requests into a small queue; one low-priority thread (nice 19)
runs them through the reference and compares. The queue never blocks: when it is full (the reference is
slower than the sampled traffic, or the machine is busy) the sample is dropped and counted.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln import repository
from kiln.runner import Runner
from kiln.selection import lossy
from kiln.spec import TensorSpec
from kiln.verify import Budget, OutputCheck, compare, judge

log = logging.getLogger("kiln.server")
WINDOW = 200  # samples the figures are computed over (the most recent ones)


def reference_variant(manifest: dict[str, Any]) -> str | None:
    """The lossless variant the served one is compared with: eager fp32 (the build's own reference) when the
    repository has it, else the first accepted fp32 variant without pruning."""
    accepted = [c for c in manifest.get("candidates", []) if c.get("status") == "accepted" and c.get("artifact")]
    if any(c["variant"] == "eager/fp32" for c in accepted):
        return "eager/fp32"
    exact = [c["variant"] for c in accepted if not lossy(c.get("precision", "fp32"), c.get("passes", []))]
    return exact[0] if exact else None


class DriftWatch:
    def __init__(self, name: str, version_dir: Path, manifest: dict[str, Any], served_variant: str, rate: float,
                 *, metrics: Any = None, queue_size: int = 4, seed: int | None = None) -> None:
        self.name = name
        self.rate = rate
        self.served = served_variant
        self.reference = reference_variant(manifest)
        self.outputs = [TensorSpec.from_dict(s) for s in manifest["outputs"]]
        self.inputs = [TensorSpec.from_dict(s) for s in manifest["inputs"]]
        budget = Budget(**manifest.get("verification", {}).get("budget", {}))
        entry = repository.candidate(manifest, served_variant)
        pruned = any(p.startswith(("prune", "chprune")) for p in entry.get("passes", []))
        self.budget = budget.for_recipe(entry.get("precision", "fp32"), lossy=pruned)
        self.samples = 0
        self.dropped = 0
        self.failed = 0
        self.below = False
        self._windows: list[collections.deque[OutputCheck]] = [collections.deque(maxlen=WINDOW) for _ in self.outputs]
        self._queue: queue.Queue[tuple[list[np.ndarray], list[np.ndarray]] | None] = queue.Queue(maxsize=queue_size)
        self._rng = random.Random(seed)
        self._metrics = metrics
        self._runner: Runner | None = None
        self._version_dir = version_dir
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Blocking: load the reference variant (on the CPU: the GPU belongs to the served variant)."""
        if self.reference is None:
            log.warning("drift watch for %s is off: the repository has no lossless variant to compare with", self.name)
            return
        self._runner = repository.load(self._version_dir, device="cpu", variant=self.reference, threads=1)
        self._thread = threading.Thread(target=self._loop, name=f"kiln-shadow-{self.name}", daemon=True)
        self._thread.start()

    @property
    def active(self) -> bool:
        return self._runner is not None

    def offer(self, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> None:
        """On the serving path, after the answer is made: maybe sample it. Never waits."""
        if self._runner is None or self._rng.random() >= self.rate:
            return
        try:
            self._queue.put_nowait((inputs, outputs))
        except queue.Full:
            self.dropped += 1
            if self._metrics is not None:
                self._metrics.shadow_dropped.labels(self.name).inc()

    def stop(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)

    def _loop(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # this thread (and torch's threads it starts) yields the CPU
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        assert self._runner is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            inputs, served = item
            try:
                xs = [torch.from_numpy(np.array(a)).to(s.torch_dtype) for a, s in zip(inputs, self.inputs)]
                ref = [o.float().numpy(force=True) if o.dtype == torch.bfloat16 else o.numpy(force=True)
                       for o in self._runner.run(xs)]
                checks = compare(self.outputs, [ref], [[np.asarray(o) for o in served]])
            except Exception as e:  # a sample that cannot be compared is counted, never raised into serving
                self.failed += 1
                log.warning("drift watch for %s: a sample failed: %s: %s", self.name, type(e).__name__, e)
                continue
            with self._lock:
                self.samples += 1
                for w, c in zip(self._windows, checks):
                    w.append(c)
            self._publish()

    def _publish(self) -> None:
        report = self.report()
        if self._metrics is not None:
            self._metrics.shadow_samples.labels(self.name).inc()
            for out in report["outputs"]:
                for metric, value in out["metrics"].items():
                    self._metrics.fidelity.labels(self.name, out["name"], metric).set(value)
        problems = report["problems"]
        if problems and not self.below:
            log.warning("drift watch: %s (%s) has drifted from %s over the last %d sampled requests: %s", self.name,
                        self.served, self.reference, report["window"], "; ".join(problems))
        elif not problems and self.below:
            log.warning("drift watch: %s (%s) is back within its budget", self.name, self.served)
        self.below = bool(problems)

    def report(self) -> dict[str, Any]:
        """What /v2/models/{m}/fidelity answers: figures over the last samples, the budget, and any breach."""
        with self._lock:
            windows = [list(w) for w in self._windows]
        outs, merged = [], []
        for spec, checks in zip(self.outputs, windows):
            m = _aggregate(checks)
            outs.append({"name": spec.name, "kind": spec.kind or (checks[0].kind if checks else None), "metrics": m})
            if checks:
                merged.append(_as_check(spec.name, checks[0].kind, m))
        problems = judge(merged, self.budget) if merged else []
        return {"model": self.name, "served": self.served, "reference": self.reference, "rate": self.rate,
                "samples": self.samples, "dropped": self.dropped, "failed": self.failed,
                "window": len(windows[0]) if windows else 0, "budget": self.budget.__dict__, "outputs": outs,
                "problems": problems, "ok": not problems}


_MEAN = ("cosine", "top1_agreement", "top5_agreement", "row_cosine_mean", "retrieval_agreement", "pixel_agreement", "box_iou")
_WORST = ("max_abs_err", "max_rel_err", "nonfinite")


def _aggregate(checks: list[OutputCheck]) -> dict[str, float]:
    """Means of agreement figures (weighted by sample), worst of error figures, over the window."""
    out: dict[str, float] = {}
    if not checks:
        return out
    for key in _MEAN:
        vals = [getattr(c, key) for c in checks if getattr(c, key) is not None and not c.shape_mismatch]
        if vals:
            out[key] = float(np.mean(vals))
    for key in _WORST:
        vals = [getattr(c, key) for c in checks if getattr(c, key) is not None and not c.shape_mismatch]
        if vals:
            out[key] = float(np.max(vals))
    rows = [c.row_cosine_min for c in checks if c.row_cosine_min is not None]
    if rows:
        out["row_cosine_min"] = float(np.min(rows))
    return out


def _as_check(name: str, kind: str, m: dict[str, float]) -> OutputCheck:
    c = OutputCheck(name, m.get("max_abs_err", 0.0), m.get("max_rel_err", 0.0), m.get("cosine", 1.0), kind,
                    nonfinite=int(m.get("nonfinite", 0)))
    for key in ("top1_agreement", "row_cosine_mean", "pixel_agreement", "box_iou"):
        setattr(c, key, m.get(key))
    # Retrieval needs many rows at once; a single sampled request has few: it is reported, not judged.
    return c
