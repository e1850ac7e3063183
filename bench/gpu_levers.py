"""GPU levers for BERT-base, measured before they are built into kiln (batch 64, sequence 128, random weights).

    python3 bench/gpu_levers.py --lever mask     # dropping the all-ones attention mask (SDPA's flash kernel)
    python3 bench/gpu_levers.py --lever fp8      # torchao float8 Linear layers (H100/H200; carry a torchao wheel)

Each row is BERT-base in bf16 under torch.compile(mode="reduce-overhead"), as kiln's compile/bf16+cudagraphs
variant runs it: seq/s (median of 20 timed rounds of 10 calls), the attention kernels the profiler saw (mask
lever), and the row cosine of the last hidden state against the fp32 eager model (worst token).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def timed(f: Callable[[], Any]) -> float:
    """Seconds per call: median of 20 rounds of 10 calls, after 5 warm-up calls."""
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    per = []
    for _ in range(20):
        t0 = time.perf_counter()
        for _ in range(10):
            f()
        torch.cuda.synchronize()
        per.append((time.perf_counter() - t0) / 10)
    return statistics.median(per)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().flatten(0, 1), b.float().flatten(0, 1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lever", choices=("mask", "fp8", "all"), default="all")
    args = p.parse_args()
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    fp32 = BertModel(BertConfig(attn_implementation="sdpa"), add_pooling_layer=False).eval().cuda()
    ids = torch.randint(0, 30522, (64, 128), device="cuda")
    ones = torch.ones(64, 128, dtype=torch.int64, device="cuda")
    with torch.inference_mode():
        ref = fp32(input_ids=ids, attention_mask=ones).last_hidden_state
    bf16 = copy.deepcopy(fp32).bfloat16()
    rows: list[tuple[str, float, float, str]] = []

    def run(label: str, model: torch.nn.Module, mask: torch.Tensor | None) -> None:
        torch._dynamo.reset()
        f = torch.compile(model, mode="reduce-overhead")
        with torch.inference_mode():
            call = lambda: f(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
            out = call().clone()
            s = timed(call)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                call()
                torch.cuda.synchronize()
        kernels = sorted({e.key[:50] for e in prof.key_averages()
                          if any(k in e.key.lower() for k in ("attention", "fmha", "flash"))})
        rows.append((label, 64 / s, cosine(out, ref), ", ".join(kernels) or "-"))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)

    run("bf16, all-ones mask", bf16, ones)
    if args.lever in ("mask", "all"):
        run("bf16, mask dropped (None)", bf16, None)
    if args.lever in ("fp8", "all"):
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_
        except ImportError as e:
            print(f"fp8: torchao is not installed here ({e})", file=sys.stderr)
        else:
            for name, gran in (("per-row", PerRow()), ("per-tensor", PerTensor())):
                m = copy.deepcopy(bf16)
                quantize_(m, Float8DynamicActivationFloat8WeightConfig(granularity=gran))
                run(f"fp8 {name} (torchao), all-ones mask", m, ones)
    print(f"\nBERT-base, batch 64, seq 128, torch.compile reduce-overhead, {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    base = rows[0][1]
    print(f"{'variant':40} {'seq/s':>9} {'vs bf16':>8} {'cosine':>9}  attention kernels")
    for label, rate, cos, kernels in rows:
        print(f"{label:40} {rate:>9,.0f} {rate / base:>7.2f}x {cos:>9.5f}  {kernels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
