"""kiln profile: where one variant spends its time (torch.profiler or ONNX Runtime's profiler)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kiln import repository
from kiln.bench.memory import PeakMemory
from kiln.data import batch_dim
from kiln.errors import KilnError
from kiln.runner import Runner
from kiln.spec import TensorSpec, example_sizes, synthetic, to_tensor

_SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class OpStat:
    name: str
    self_ms: float
    calls: int


@dataclass
class KernelStat:
    name: str
    kind: str  # kernel_kind(name)
    us: float  # GPU time per run
    launches: float  # per run


@dataclass
class ProfileResult:
    variant: str
    profiler: str
    ops: list[OpStat]  # on CUDA: CPU self time only; the GPU's time is in kernels
    trace: str | None
    memory: str | None
    peak_mb: float
    kernels: list[KernelStat] = field(default_factory=list)  # CUDA only, by GPU time
    run_us: float | None = None  # CUDA only: median wall time of one synchronized run, outside the profiler
    shapes: str = ""  # the inputs profiled, e.g. "ids 64x128, mask 64x128"

    def kinds(self) -> list[tuple[str, float]]:
        """GPU time per run by kernel kind, largest first."""
        totals: dict[str, float] = defaultdict(float)
        for k in self.kernels:
            totals[k.kind] += k.us
        return sorted(totals.items(), key=lambda kv: -kv[1])


_KINDS = (  # first match wins: cuDNN names its convolutions "..._implicit_gemm_...", so convolutions come before GEMMs
    ("attention", ("attention", "fmha", "flash", "sdpa")),
    ("convolution", ("conv", "fprop", "implicit_gemm", "dgrad", "wgrad", "winograd")),
    ("GEMM", ("gemm", "cutlass", "nvjet", "matmul", "sm90_xmma", "sm80_xmma")),
    ("layout transform", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("pooling", ("pool",)),
    ("copy/fill", ("memcpy", "memset", "copy", "fill")),
)


def kernel_kind(name: str) -> str:
    """What a CUDA kernel does, from its name: attention, convolution, GEMM, fused pointwise/reduction (Inductor's
    Triton kernels), layout transform, pooling, copy/fill or other.

    >>> kernel_kind("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64")
    'convolution'
    """
    low = name.lower()
    if low.startswith("triton_"):  # Inductor names its kernels after the ops they fuse: "..._convolution_relu" is a ReLU
        if low.startswith("triton_tem"):  # a Triton template (max-autotune) is the GEMM or convolution itself
            return "convolution" if "conv" in low else "GEMM"
        return "fused pointwise/reduction (triton)"
    return next((kind for kind, words in _KINDS if any(w in low for w in words)), "other")


def profile(path: str | Path, *, variant: str | None = None, batch: int = 1, steps: int = 20, device: str = "cpu",
            trace: str | Path | None = None, memory: bool = False, dim_size: dict[str, int] | None = None,
            ) -> ProfileResult:
    """Profile `steps` runs of one variant at `batch`. The other dynamic dims (a sequence length) have the sizes the
    model was built and timed at (`kiln build --dim-size`), or `dim_size`'s. On CUDA the result also has the GPU's
    kernels, one by one (`kernels`, `kinds()`), and the wall time of one run (`run_us`).

    >>> profile("models/digits", batch=32, trace="trace.json").ops[:3]
    """
    if batch < 1 or steps < 1:
        raise KilnError("--batch and --steps must be at least 1", hint="e.g. --batch 8 --steps 20")
    version_dir, m = repository.resolve(path)
    entry = repository.candidate(m, variant)
    inputs = [TensorSpec.from_dict(s) for s in m["inputs"]]
    sizes = {**m.get("dim_sizes", {}), **(dim_size or {})}
    unknown = sorted(set(sizes) - {d for spec in inputs for d in spec.dynamic_dims.values()})
    if unknown:
        raise KilnError(f"--dim-size names {', '.join(unknown)}, which no input of this model has",
                        hint="name a dynamic dim of an input: " + ", ".join(f"{spec.name}{spec.shape}" for spec in inputs))
    xs = _inputs(inputs, batch, sizes)
    shapes = ", ".join(f"{spec.name} {'x'.join(map(str, x.shape))}" for spec, x in zip(inputs, xs))
    if entry["backend"] == "onnxruntime":
        ops, trace_path, mem = _profile_ort(version_dir, entry, inputs, xs, steps, device, trace)
        return ProfileResult(entry["variant"], "onnxruntime profiler", ops, trace_path, _timeline(mem) if memory else None,
                             mem.peak_mb, shapes=shapes)
    ops, trace_path, mem, kernels, run_us = _profile_torch(version_dir, entry, xs, steps, device, trace, memory)
    return ProfileResult(entry["variant"], "torch.profiler", ops, trace_path, _timeline(mem) if memory else None,
                         mem.peak_mb, kernels, run_us, shapes)


def _inputs(inputs: list[TensorSpec], batch: int, dim_sizes: dict[str, int]) -> list[torch.Tensor]:
    sizes = {**example_sizes(inputs), **dim_sizes}
    rng = np.random.default_rng(3)
    xs = [to_tensor(synthetic(s, sizes, rng), s) for s in inputs]
    if batch_dim(inputs) is None:
        return xs
    return [x[:1].repeat(batch, *[1] * (x.dim() - 1)).contiguous() for x in xs]


def _profile_torch(version_dir: Path, entry: dict, xs: list[torch.Tensor], steps: int, device: str,
                   trace: str | Path | None, memory: bool,
                   ) -> tuple[list[OpStat], str | None, PeakMemory, list[KernelStat], float | None]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    runner = repository.load(version_dir, device=device, variant=entry["variant"])
    xs = [x.to(device) for x in xs]
    for _ in range(3):
        runner.run(xs)
    cuda = device.startswith("cuda")
    run_us = _run_us(runner, xs, steps) if cuda else None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with PeakMemory(device) as mem, torch_profile(activities=activities, profile_memory=memory) as prof:
        for _ in range(steps):
            runner.run(xs)
        if cuda:
            torch.cuda.synchronize()
    ops, kernels = [], []
    for e in prof.key_averages():
        if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CUDA:  # a kernel, a copy or a fill on the GPU
            us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
            kernels.append(KernelStat(e.key, kernel_kind(e.key), us / steps, e.count / steps))
        else:
            ops.append(OpStat(e.key, e.self_cpu_time_total / 1e3, e.count))
    ops.sort(key=lambda o: o.self_ms, reverse=True)
    kernels.sort(key=lambda k: k.us, reverse=True)
    out = None
    if trace:
        prof.export_chrome_trace(str(trace))
        out = str(trace)
    return ops, out, mem, kernels, run_us


def _run_us(runner: Runner, xs: list[torch.Tensor], steps: int) -> float:
    """Median wall time of one run, synchronized, outside the profiler (the kernels' share of it is the GPU's busy time)."""
    samples = []
    for _ in range(max(steps, 10)):
        t0 = time.perf_counter()
        runner.run(xs)
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


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
