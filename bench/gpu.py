"""GPU benchmark: kiln's CUDA variants of ResNet-50 and BERT-base against the code a user writes by hand.

    python3 bench/gpu.py --out results.json          # one H100 or H200; both models in under 10 minutes
    python3 bench/gpu.py --only resnet50             # or --only bert

For each model, `kiln.build(device="cuda")` runs a chosen set of variants (ResNet-50: eager fp32, fp16
channels_last with CUDA graphs, torch.compile fp16 with CUDA graphs, and fp16/bf16 with the `convfuse` pass (cuDNN's
fused convolution + bias + residual + ReLU); BERT: the same in fp16/bf16, with and without the `epilogue` and `qkv` passes
(the FFN's GELU in the GEMM; Q, K and V as one GEMM), plus torchao int8 in eager mode (its torch.compile build ran over 3 minutes
on an H100 without finishing, which would take this run past 10); TensorRT fp16 where tensorrt is installed; `--max-autotune` adds kiln's max-autotune variant), verifies each against
fp32 eager (TF32 off) on 64 random inputs, and times it at batch 1 and at the throughput batch (256
images, 64 sequences of 128 tokens) from device-resident inputs; the throughput column is per call (synchronized
after each), and "back to back" times the selected variant (loaded with kiln.load) and the hand-written compile
with ten calls per synchronize, as a batch job runs them; "two instances" loads it twice and calls each from a
thread of its own on a CUDA stream of its own, synchronized per batch, as `kiln serve` runs `instances = 2` (so
the two overlap), against one such thread. In the same run, two baselines:
eager fp32, and `torch.compile(model.half().to(memory_format=channels_last), mode="reduce-overhead")`
as a user would write it (BERT: fp16 without channels_last); `--baseline-autotune` makes it
mode="max-autotune" (minutes of autotuning). Compiled kernels are cached in TORCHINDUCTOR_CACHE_DIR
(default: $TMPDIR/kiln-bench-inductor), so a second run on the same machine builds in far less time;
--out is rewritten after each model's kiln rows, so a run cut short keeps what it measured.

Targets (H100): ResNet-50 >= 30,000 img/s at 256 and <= 0.45 ms p50 at 1; BERT >= 20,000 seq/s at 64;
cosine >= 0.999 for fp16/bf16 and >= 0.99 for int8.
Random weights: ResNet-50 inputs are N(0, 1) images, BERT inputs random token ids with full masks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
import kiln  # noqa: E402
from kiln.progress import reporter  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "resnet50": {
        "source": "resnet50", "inputs": ["image:float32[batch,3,224,224]"], "batch": 256, "dims": {},
        "variants": ["eager/fp32", "eager/fp16+bnfold+channels_last+cudagraphs",
                     "eager/fp16+bnfold+channels_last+convfuse+cudagraphs",
                     "compile/fp16+bnfold+channels_last+cudagraphs", "compile/fp16+bnfold+channels_last+convfuse+cudagraphs",
                     "compile/bf16+bnfold+channels_last+convfuse+cudagraphs", "tensorrt/fp16"],
        "autotune": "compile/fp16+bnfold+channels_last+max-autotune+cudagraphs",
        "targets": {"items_per_s": 30_000, "p50_ms_1": 0.45}, "unit": "img/s",
    },
    "bert": {
        "source": "BertEncoder", "inputs": ["ids:int64[batch,seq]@0..30521", "mask:int64[batch,seq]@1..1"],
        "batch": 64, "dims": {"seq": 128},
        "variants": ["eager/fp32", "eager/fp16+cudagraphs", "compile/fp16+cudagraphs", "compile/bf16+cudagraphs",
                     "compile/fp16+epilogue+qkv+cudagraphs", "compile/bf16+epilogue+qkv+cudagraphs",
                     "eager/int8-dynamic", "tensorrt/fp16"],
        "autotune": "compile/fp16+max-autotune+cudagraphs",
        "targets": {"items_per_s": 20_000}, "unit": "seq/s",
    },
}


def _p50_ms(fn: Any, *, min_time_s: float = 1.0, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < 20 or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def _sustained_per_s(fn: Any, batch: int, *, calls: int = 10, rounds: int = 20, warmup: int = 10) -> float:
    """Items per second when batches run back to back, as a batch job or a busy server runs them: the median of
    `rounds` rounds of `calls` calls with one synchronize per round, so the host's launch work overlaps the GPU's
    (the per-call figure synchronizes after every call and so adds the host's time to each batch)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        per.append((time.perf_counter() - t0) / calls)
    return batch / statistics.median(per)


def _instances_per_s(runners: list[Any], xs: list[torch.Tensor], batch: int, rounds: int = 5) -> tuple[float, float]:
    """Items per second with one runner, then with two, each called from a thread of its own under a CUDA stream of
    its own, on device-resident inputs and synchronized per batch, as a serving instance waits for its batch (and as
    `kiln serve` runs several instances on one GPU: kiln.server.model.ServedModel.load): the median of `rounds`
    interleaved rounds of 2 s (bench/gpu_streams.py's `rate`)."""
    from gpu_streams import rate

    def work(stop: threading.Event, counts: list[int], i: int) -> None:
        stream = torch.cuda.Stream()
        with torch.inference_mode(), torch.cuda.stream(stream):
            while not stop.is_set():
                runners[i].run(xs)
                stream.synchronize()
                counts[i] += 1

    one, two = [], []
    for _ in range(rounds):
        one.append(rate(work, 1, batch))
        two.append(rate(work, 2, batch))
    return statistics.median(one), statistics.median(two)


def _inputs(name: str, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name == "resnet50":
        return [torch.randn(n, 3, 224, 224, generator=g)]
    return [torch.randint(0, 30522, (n, 128), generator=g), torch.ones(n, 128, dtype=torch.int64)]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def baselines(name: str, module: torch.nn.Module, batch: int, mode: str = "reduce-overhead") -> list[dict[str, Any]]:
    """Eager fp32, and torch.compile fp16 (channels_last for the CNN) as a user writes it: mode reduce-overhead
    (CUDA graphs) by default, max-autotune with --baseline-autotune (it autotunes for minutes)."""
    dev = "cuda"
    model = module.to(dev).eval()
    rows: list[dict[str, Any]] = []
    small, large = [x.to(dev) for x in _inputs(name, 1, 1)], [x.to(dev) for x in _inputs(name, batch, 2)]
    with torch.inference_mode():
        ref = model(*large).float()
        torch.cuda.reset_peak_memory_stats()
        rows.append(_row("baseline eager fp32", lambda xs: model(*xs), small, large, ref, batch, 0.0))
        half = model.half()
        if name == "resnet50":
            half = half.to(memory_format=torch.channels_last)
            small, large = ([x.half().contiguous(memory_format=torch.channels_last) for x in xs] for xs in (small, large))
        t0 = time.perf_counter()
        compiled = torch.compile(half, mode=mode)
        compiled(*small), compiled(*large)  # compile both shapes now, not inside the timing
        label = f"baseline compile {mode} fp16" + (" channels_last" if name == "resnet50" else "")
        torch.cuda.reset_peak_memory_stats()
        rows.append(_row(label, lambda xs: compiled(*xs), small, large, ref, batch, time.perf_counter() - t0))
    model.float()
    return rows


def _row(label: str, fn: Any, small: list[torch.Tensor], large: list[torch.Tensor], ref: torch.Tensor, batch: int,
         build_s: float) -> dict[str, Any]:
    p1 = _p50_ms(lambda: fn(small))
    pb = _p50_ms(lambda: fn(large))
    return {"variant": label, "status": "baseline", "p50_ms_1": p1, "items_per_s": batch / pb * 1e3,
            "items_per_s_sustained": _sustained_per_s(lambda: fn(large), batch),
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20, "cosine": _cosine(fn(large).float(), ref),
            "build_s": build_s}


def run_model(name: str, work: Path, variants: list[str] | None, autotune: bool = False,
              baseline_mode: str = "reduce-overhead", out: Path | None = None, done: list[dict[str, Any]] | None = None,
              profile: bool = False) -> dict[str, Any]:
    spec = MODELS[name]
    variants = variants or spec["variants"] + ([spec["autotune"]] if autotune else [])
    from gpu_models import BertEncoder, resnet50
    from safetensors.torch import save_model

    torch.manual_seed(0)
    module = resnet50() if name == "resnet50" else BertEncoder()
    module.eval()
    save_model(module, str(work / f"{name}.safetensors"))
    data = _inputs(name, 64, 0)
    keys = [s.split(":")[0] for s in spec["inputs"]]
    np.savez(work / f"{name}.npz", **{k: x.numpy() for k, x in zip(keys, data)})
    t0 = time.perf_counter()
    r = kiln.build(f"{ROOT}/bench/gpu_models.py:{spec['source']}", weights=work / f"{name}.safetensors",
                   inputs=spec["inputs"], repo=work / "models", name=name, data=work / f"{name}.npz", device="cuda",
                   batch=(1, spec["batch"]), dim_size=spec["dims"], variants=variants,
                   objective="throughput", progress=reporter())
    build_s = time.perf_counter() - t0
    rows = []
    for c in r.candidates:
        t1, tb = c.timing(1), c.timing(spec["batch"])
        rows.append({"variant": c.variant, "status": c.status, "reason": c.reason,
                     "p50_ms_1": t1.p50_ms if t1 else None, "items_per_s": tb.items_per_s if tb else None,
                     "peak_gpu_mb": c.peak_gpu_mb, "cosine": min((a["cosine"] for a in c.accuracy), default=None),
                     "build_s": c.export_s + c.load_s})
    # The selected variant back to back, loaded as `kiln serve` and `kiln predict` load it (its compile is cached).
    runner = kiln.load(work / "models" / name, device="cuda")
    large = [x.to("cuda") for x in _inputs(name, spec["batch"], 2)]
    with torch.inference_mode():
        sustained = _sustained_per_s(lambda: runner.run(large), spec["batch"])
        from gpu_levers import kernel_us

        total_us, kernels = kernel_us(lambda: runner.run(large))
        print(f"  {r.selected} loaded with kiln.load: {sustained:,.0f} {spec['unit']} back to back, "
              f"{total_us:,.0f} us of kernels per batch: " + "; ".join(f"{k} {us:,.0f}" for us, k in kernels[:5]),
              file=sys.stderr, flush=True)
    # Two instances of it on the GPU, as `kiln serve` runs `instances = 2`: each on a CUDA stream of its own.
    per_batch, two = _instances_per_s([runner, kiln.load(work / "models" / name, device="cuda")], large, spec["batch"])
    print(f"  {r.selected}: {per_batch:,.0f} {spec['unit']} with one instance synchronized per batch, {two:,.0f} with "
          f"two ({two / per_batch:.2f}x)", file=sys.stderr, flush=True)
    for row in rows:
        if row["variant"] == r.selected:
            row.update(items_per_s_sustained=sustained, items_per_s_one_instance=per_batch, items_per_s_two_instances=two)
    res = {"model": name, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": spec["batch"],
           "selected": r.selected, "build_s": build_s, "rows": rows, "targets": spec["targets"], "unit": spec["unit"],
           "selection": r.manifest.get("selection")}
    if profile:  # `kiln profile` on the GPU, as a user runs it: the selected variant's kernels at 1 and at the batch
        res["profiles"] = {}
        for b in (1, spec["batch"]):
            p = subprocess.run([sys.executable, "-m", "kiln", "profile", str(work / "models" / name), "--device", "cuda",
                                "--batch", str(b), "--top", "25"], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])})
            res["profiles"][b] = p.stdout if p.returncode == 0 else f"kiln profile failed ({p.returncode}): {p.stderr[-2000:]}"
            print(res["profiles"][b], file=sys.stderr, flush=True)
    if out is not None:  # partial results as they come: kept if the baselines run out of time
        out.write_text(json.dumps([*(done or []), {**res, "partial": True}], indent=2, default=str))
    rows += baselines(name, module, spec["batch"], baseline_mode)
    return res


def table(res: dict[str, Any]) -> str:
    eager = next(x for x in res["rows"] if x["variant"] == "baseline eager fp32")
    hand = next((x for x in res["rows"] if x["variant"].startswith("baseline compile")), eager)
    b = res["batch"]
    lines = [f"\n{res['model']} on {res['gpu']} (torch {res['torch']}), selected {res['selected']}",
             f"{'variant':58} {'status':9} {'p50 ms @1':>9} {res['unit'] + ' @' + str(b):>13} {'vs eager':>8} "
             f"{'vs hand':>7} {'peak MB':>8} {'cosine':>9} {'back to back':>12}"]
    for x in res["rows"]:
        ips = x.get("items_per_s")
        lines.append(
            f"{x['variant'][:58]:58} {x['status'][:9]:9} {_f(x.get('p50_ms_1'), '.3f'):>9} {_f(ips, ',.0f'):>13} "
            f"{_f(ips / eager['items_per_s'] if ips else None, '.2f'):>7}x {_f(ips / hand['items_per_s'] if ips else None, '.2f'):>6}x "
            f"{_f(x.get('peak_gpu_mb'), ',.0f'):>8} {_f(x.get('cosine'), '.5f'):>9} "
            f"{_f(x.get('items_per_s_sustained'), ',.0f'):>12}")
        if x["status"] not in ("accepted", "baseline") and x.get("reason"):
            lines.append(f"    {x['reason'][:150]}")
    kiln_rows = [x for x in res["rows"] if x["status"] == "accepted"]
    t = res["targets"]
    best_ips = max((x["items_per_s"] for x in kiln_rows if x.get("items_per_s")), default=0)
    lines.append(f"target {t['items_per_s']:,} {res['unit']} @{b}: best kiln {best_ips:,.0f} per call -> "
                 f"{'PASS' if best_ips >= t['items_per_s'] else 'MISS'}")
    back = next((x.get("items_per_s_sustained") for x in kiln_rows if x["variant"] == res["selected"]), None)
    if back:
        lines.append(f"target {t['items_per_s']:,} {res['unit']} @{b}: selected {back:,.0f} back to back -> "
                     f"{'PASS' if back >= t['items_per_s'] else 'MISS'}")
    two = next((x for x in kiln_rows if x["variant"] == res["selected"] and x.get("items_per_s_two_instances")), None)
    if two:
        lines.append(f"target {t['items_per_s']:,} {res['unit']} @{b}: selected, two instances (CUDA streams of their own) "
                     f"{two['items_per_s_two_instances']:,.0f} (one, synchronized per batch: "
                     f"{two['items_per_s_one_instance']:,.0f}) -> "
                     f"{'PASS' if two['items_per_s_two_instances'] >= t['items_per_s'] else 'MISS'}")
    if "p50_ms_1" in t:
        best = min((x["p50_ms_1"] for x in kiln_rows if x.get("p50_ms_1")), default=float("inf"))
        lines.append(f"target <= {t['p50_ms_1']} ms p50 @1: best kiln {best:.3f} ms -> {'PASS' if best <= t['p50_ms_1'] else 'MISS'}")
    return "\n".join(lines)


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=tuple(MODELS))
    p.add_argument("--variants", help="comma-separated globs instead of the default set")
    p.add_argument("--max-autotune", action="store_true",
                   help="also build kiln's compile max-autotune variant (minutes more; it measured slower, see README)")
    p.add_argument("--baseline-autotune", action="store_true",
                   help="the hand-written baseline compiles with mode=max-autotune (autotunes for minutes) instead of "
                        "reduce-overhead")
    p.add_argument("--profile", action="store_true",
                   help="run `kiln profile --device cuda` on the selected variant at batch 1 and at the throughput batch "
                        "(kernel by kernel; the text goes to stderr and into --out)")
    p.add_argument("--out", type=Path, help="write every number as JSON here, as results come")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py needs an NVIDIA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "kiln-bench-inductor"))
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-gpu-"))
    results = []
    for name in ([args.only] if args.only else list(MODELS)):
        results.append(run_model(name, work, args.variants.split(",") if args.variants else None, args.max_autotune,
                                 "max-autotune" if args.baseline_autotune else "reduce-overhead", args.out, results,
                                 args.profile))
        if args.out:
            args.out.write_text(json.dumps(results, indent=2, default=str))
        print(table(results[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
