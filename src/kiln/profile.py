"""kiln profile: where one variant spends its time (torch.profiler or ONNX Runtime's profiler)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln import repository
from kiln.bench.memory import PeakMemory
from kiln.data import batch_dim
from kiln.errors import KilnError
from kiln.signature import example_inputs
from kiln.spec import TensorSpec

_SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class OpStat:
    name: str
    self_ms: float
    calls: int


@dataclass
class ProfileResult:
    variant: str
    profiler: str
    ops: list[OpStat]
    trace: str | None
    memory: str | None
    peak_mb: float


def profile(path: str | Path, *, variant: str | None = None, batch: int = 1, steps: int = 20, device: str = "cpu",
            trace: str | Path | None = None, memory: bool = False) -> ProfileResult:
    """Profile `steps` runs of one variant at `batch`.

    >>> profile("models/digits", batch=32, trace="trace.json").ops[:3]
    """
    if batch < 1 or steps < 1:
        raise KilnError("--batch and --steps must be at least 1", hint="e.g. --batch 8 --steps 20")
    version_dir, m = repository.resolve(path)
    entry = repository.candidate(m, variant)
    inputs = [TensorSpec.from_dict(s) for s in m["inputs"]]
    xs = _inputs(inputs, batch)
    if entry["backend"] == "onnxruntime":
        ops, trace_path, mem = _profile_ort(version_dir, entry, inputs, xs, steps, device, trace)
        name = "onnxruntime profiler"
    else:
        ops, trace_path, mem = _profile_torch(version_dir, entry, xs, steps, device, trace, memory)
        name = "torch.profiler"
    return ProfileResult(entry["variant"], name, ops, trace_path, _timeline(mem) if memory else None, mem.peak_mb)


def _inputs(inputs: list[TensorSpec], batch: int) -> list[torch.Tensor]:
    xs = example_inputs(inputs, seed=3)
    if batch_dim(inputs) is None:
        return xs
    return [x[:1].repeat(batch, *[1] * (x.dim() - 1)).contiguous() for x in xs]


def _profile_torch(version_dir: Path, entry: dict, xs: list[torch.Tensor], steps: int, device: str,
                   trace: str | Path | None, memory: bool) -> tuple[list[OpStat], str | None, PeakMemory]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    runner = repository.load(version_dir, device=device, variant=entry["variant"])
    xs = [x.to(device) for x in xs]
    for _ in range(3):
        runner.run(xs)
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with PeakMemory(device) as mem, torch_profile(activities=activities, profile_memory=memory) as prof:
        for _ in range(steps):
            runner.run(xs)
        if cuda:
            torch.cuda.synchronize()
    ops = []
    for e in prof.key_averages():
        self_us = e.self_cpu_time_total + (getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) if cuda else 0)
        ops.append(OpStat(e.key, self_us / 1e3, e.count))
    ops.sort(key=lambda o: o.self_ms, reverse=True)
    out = None
    if trace:
        prof.export_chrome_trace(str(trace))
        out = str(trace)
    return ops, out, mem


def _profile_ort(version_dir: Path, entry: dict, inputs: list[TensorSpec], xs: list[torch.Tensor], steps: int,
                 device: str, trace: str | Path | None) -> tuple[list[OpStat], str | None, PeakMemory]:
    from kiln.backends import onnxruntime as ortb

    directory = repository.verify_artifact(version_dir, entry)
    tmp = tempfile.mkdtemp(prefix="kiln-ort-profile-")
    sess = ortb.session(directory / entry["artifact"]["meta"]["file"], device=device,
                        profile_prefix=os.path.join(tmp, "ort"))
    feeds = {s.name: x.numpy() for s, x in zip(inputs, xs)}
    names = [o.name for o in sess.get_outputs()]
    with PeakMemory(device) as mem:
        for _ in range(steps):
            sess.run(names, feeds)
    produced = sess.end_profiling()
    try:
        events = json.loads(Path(produced).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KilnError(f"cannot read ONNX Runtime's profile {produced}: {e}", hint="rerun; the profile may be truncated") from None
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", ev["name"])
            totals[op][0] += ev.get("dur", 0) / 1e3
            totals[op][1] += 1
    ops = sorted((OpStat(k, v[0], int(v[1])) for k, v in totals.items()), key=lambda o: o.self_ms, reverse=True)
    out = None
    if trace:
        shutil.copyfile(produced, trace)  # ONNX Runtime writes the Chrome trace format already
        out = str(trace)
    shutil.rmtree(tmp, ignore_errors=True)
    return ops, out, mem


def _timeline(mem: PeakMemory, width: int = 60) -> str:
    pts = mem.timeline
    if not pts:
        return f"peak memory growth {mem.peak_mb:.1f} MB (no samples)"
    lo = min(v for _, v in pts)
    hi = max(v for _, v in pts)
    span = pts[-1][0] or 1e-9
    buckets = [max((v for t, v in pts if int(t / span * (width - 1)) == i), default=None) for i in range(width)]
    last = lo
    chars = []
    for b in buckets:
        last = b if b is not None else last
        chars.append(_SPARK[int((last - lo) / (hi - lo) * (len(_SPARK) - 1))] if hi > lo else _SPARK[0])
    return (f"memory: peak growth {mem.peak_mb:.1f} MB; RSS {lo:.0f}..{hi:.0f} MB over {span * 1e3:.0f} ms\n"
            f"  {''.join(chars)}")
