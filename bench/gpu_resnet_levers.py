"""GPU levers for ResNet-50 (batch 256, fp16, BatchNorm folded, channels_last), measured before they are built into kiln.

    python3 bench/gpu_resnet_levers.py                      # every lever, each in a process of its own
    python3 bench/gpu_resnet_levers.py --lever ref,limit    # a subset

Each lever is kiln's `compile/fp16+bnfold+channels_last+cudagraphs` module (kiln.transforms.apply: fp32 in, fp16
inside, fp32 out) compiled by hand with torch.compile(mode="reduce-overhead"), with one thing changed:

    ref       nothing changed (the reference)
    limit     torch.backends.cudnn.benchmark_limit = 0: cuDNN benchmarks every algorithm for each convolution, not
              only the first 10 its heuristics rank
    1x1       inductor's conv_1x1_as_mm: 1x1 convolutions (two thirds of ResNet-50's) as cuBLAS GEMMs
    fused     cuDNN's fused convolution + bias + ReLU, and convolution + bias + residual add + ReLU at the end of a
              block, through kiln's convfuse pass (kiln.transforms.convfuse: torch.cudnn_convolution_relu / _add_relu
              behind a custom op, so Inductor calls them whole), instead of a convolution and a Triton kernel that
              reads its output back
    freezing  inductor's freezing (weights as constants, folded and laid out at compile time)
    fused-dynamic  the same, compiled with dynamic=True (every dim symbolic), one CUDA graph per batch size on top
    eager     the same module without torch.compile, in one CUDA graph (what kiln's eager/...+cudagraphs runs)

Each lever runs in a process of its own (cuDNN caches its algorithm choice per process, so `limit` would leak), and
prints img/s at 256 (median of 20 rounds of 10 calls, one synchronize per round: back to back), p50 ms at batch 1
(synchronized per call), the GPU kernel time per batch of 256 by kind (kiln.profile.kernel_kind), the convolutions'
achieved TFLOP/s, and the cosine against fp32 eager. Inductor's cache is TORCHINDUCTOR_CACHE_DIR, as in bench/gpu.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

LEVERS = ("ref", "limit", "1x1", "fused", "fused-dynamic", "freezing", "eager")
BATCH = 256
CONV_FLOP = 2 * 4.09e9  # ResNet-50 at 224x224: 4.09 GMACs per image, nearly all in convolutions


def p50_ms(f: Callable[[], Any], n: int = 200) -> float:
    for _ in range(10):
        f()
    torch.cuda.synchronize()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def kernels(f: Callable[[], Any], calls: int = 10) -> list[tuple[str, float, float]]:
    """(name, us per call, launches per call) of every CUDA kernel, from torch.profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            f()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / calls, e.count / calls) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def graphed(fn: Callable[[torch.Tensor], torch.Tensor], shapes: tuple[torch.Tensor, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`fn` replayed from one CUDA graph per batch size (captured after three warm-up calls on a side stream)."""
    graphs = {}
    for x in shapes:
        static = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn(static)
        torch.cuda.current_stream().wait_stream(side)
        cg = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cg):
            out = fn(static)
        graphs[x.shape[0]] = (cg, static, out)

    def run(x: torch.Tensor) -> torch.Tensor:
        cg, static, out = graphs[x.shape[0]]
        static.copy_(x)
        cg.replay()
        return out

    return run


def one(lever: str) -> dict[str, Any]:
    """Build and time one lever in this process."""
    import torch._inductor.config as inductor
    from gpu_levers import timed  # seconds per call back to back: median of 20 rounds of 10 calls
    from gpu_models import resnet50

    from kiln.profile import kernel_kind
    from kiln.recipe import Recipe
    from kiln.transforms import apply

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    fp32 = resnet50().eval().cuda()
    g = torch.Generator().manual_seed(2)
    x256, x1 = torch.randn(BATCH, 3, 224, 224, generator=g).cuda(), torch.randn(1, 3, 224, 224, generator=g).cuda()
    with torch.inference_mode():
        ref = fp32(x256).double()
    model = apply(copy.deepcopy(fp32).cpu(), Recipe.parse("fp16+bnfold+channels_last")).cuda().eval()
    notes = ""
    if lever == "limit":
        torch.backends.cudnn.benchmark_limit = 0
    elif lever == "1x1":
        inductor.conv_1x1_as_mm = True
    elif lever == "freezing":
        inductor.freezing = True
    elif lever in ("fused", "fused-dynamic"):
        from kiln.transforms import convfuse

        model.inner, n = convfuse.fuse(model.inner, channels_last=True)
        notes = f"kiln's convfuse pass: {n} fused"
    t0 = time.perf_counter()
    with torch.inference_mode():
        if lever == "eager":
            run = graphed(model, (x1, x256))
        elif lever == "fused-dynamic":  # as kiln builds it: one compile for every batch size, kiln's CUDA graphs on top
            run = graphed(torch.compile(model, dynamic=True), (x1, x256))
        else:
            run = torch.compile(model, mode="reduce-overhead")
        run(x1), run(x256)
        build_s = time.perf_counter() - t0
        out = run(x256).double()
        cosine = float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
        per = timed(lambda: run(x256))
        lat = p50_ms(lambda: run(x1))
        ks = kernels(lambda: run(x256))
    kinds: dict[str, float] = {}
    for name, us, _ in ks:
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + us
    conv_us = kinds.get("convolution", 0.0) + kinds.get("GEMM", 0.0)  # 1x1 as mm moves convolutions into GEMMs
    return {"lever": lever, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "img_s": BATCH / per,
            "p50_ms_1": lat, "cosine": cosine, "build_s": build_s, "kernel_us": sum(kinds.values()),
            "kinds_us": kinds, "conv_tflops": CONV_FLOP * BATCH / (conv_us * 1e-6) / 1e12 if conv_us else None,
            "top": [(n[:110], round(us, 1), c) for n, us, c in ks[:30]], "notes": notes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lever", default=",".join(LEVERS), help=f"comma-separated subset of {','.join(LEVERS)}")
    p.add_argument("--one", choices=LEVERS, help=argparse.SUPPRESS)  # the child process: one lever, JSON on stdout
    p.add_argument("--out", type=Path, help="write every number as JSON here, as results come")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_resnet_levers.py needs an NVIDIA GPU", file=sys.stderr)
        return 2
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "kiln-bench-inductor"))
    if args.one:
        print("RESULT " + json.dumps(one(args.one)), flush=True)
        return 0
    rows: list[dict[str, Any]] = []
    for lever in args.lever.split(","):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--one", lever], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            rows.append({"lever": lever, "error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]})
        else:
            rows.append(json.loads(line[len("RESULT "):]))
        print(f"  {lever}: {time.perf_counter() - t0:.0f} s {json.dumps(rows[-1])[:1500]}", file=sys.stderr, flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=2))
    base = next((r["img_s"] for r in rows if r["lever"] == "ref" and "img_s" in r), None)
    gpu = next((r["gpu"] for r in rows if "gpu" in r), "?")
    print(f"\nResNet-50 fp16 channels_last bnfold, batch {BATCH}, {gpu}")
    print(f"{'lever':10} {'img/s':>8} {'vs ref':>7} {'ms @1':>7} {'kernels us':>10} {'conv TFLOP/s':>12} {'cosine':>8}  "
          "kernel us by kind")
    for r in rows:
        if "error" in r:
            print(f"{r['lever']:10} failed: {' | '.join(r['error'])[:300]}")
            continue
        kinds = ", ".join(f"{k} {us:,.0f}" for k, us in sorted(r["kinds_us"].items(), key=lambda kv: -kv[1]))
        print(f"{r['lever']:10} {r['img_s']:>8,.0f} {r['img_s'] / base if base else 0:>6.2f}x {r['p50_ms_1']:>7.3f} "
              f"{r['kernel_us']:>10,.0f} {r['conv_tflops'] or 0:>12,.0f} {r['cosine']:>8.5f}  {kinds} {r['notes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
