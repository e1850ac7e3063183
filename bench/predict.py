"""Offline inference benchmark: `kiln predict` against plain PyTorch loops, in one run.

    .venv/bin/python bench/predict.py              # 20,000 digits-size inputs

Baselines: a per-item loop (eager DigitsNet, one item per call, under no_grad) and a batched loop
without workers (eager, 256 items per call). kiln predict runs the build's selected variant from the
.npz on disk, writing sharded .npz output; its time includes loading the model and writing.
Target: at least 10x the per-item loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "examples" / "digits"))
from model import DigitsNet  # noqa: E402

import kiln  # noqa: E402
from kiln.predict import predict  # noqa: E402
from kiln.source import load_weights  # noqa: E402

DIGITS = ROOT / "examples" / "digits"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=3, help="runs of each method; the median is reported")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-predict-"))
    r = kiln.build(f"{DIGITS}/model.py:DigitsNet", weights=DIGITS / "digits.safetensors", data=DIGITS / "test.npz",
                   repo=work / "models", backends=("eager", "torchscript", "onnxruntime"))
    rng = np.random.default_rng(0)
    base = np.concatenate([np.load(DIGITS / "test.npz")["image"], np.load(DIGITS / "calib.npz")["image"]])
    x = np.clip(base[rng.integers(0, len(base), args.items)] + rng.normal(0, 0.02, (args.items, 1, 8, 8)), 0, 1).astype(np.float32)
    np.savez(work / "inputs.npz", image=x)
    model = DigitsNet().eval()
    load_weights(model, DIGITS / "digits.safetensors")
    xt = torch.from_numpy(x)

    def per_item() -> None:
        with torch.no_grad():
            for i in range(len(xt)):
                model(xt[i:i + 1])

    def batched() -> None:
        with torch.no_grad():
            for i in range(0, len(xt), 256):
                model(xt[i:i + 256])

    runs = [0]

    def kiln_predict(workers: int) -> None:
        runs[0] += 1
        predict(r.path, [work / "inputs.npz"], work / f"out{runs[0]}.npz", batch=512, workers=workers, progress=False)

    methods = [("per-item PyTorch loop", per_item), ("batched PyTorch loop (256, no workers)", batched),
               (f"kiln predict ({r.selected}, batch 512)", lambda: kiln_predict(0)),
               (f"kiln predict ({r.selected}, batch 512, 2 workers)", lambda: kiln_predict(2))]
    results = []
    for name, fn in methods:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        results.append((name, args.items / statistics.median(times)))
        print(f"  {name}: {results[-1][1]:,.0f} items/s", file=sys.stderr, flush=True)
    base_rate = results[0][1]
    print(f"\n{'method':52s} {'items/s':>10s} {'vs per-item':>12s}")
    for name, rate in results:
        print(f"{name:52s} {rate:10,.0f} {rate / base_rate:11.1f}x")
    best = max(rate for name, rate in results if name.startswith("kiln"))
    print(f"\ntarget: kiln predict >= 10x the per-item loop: {'PASS' if best >= 10 * base_rate else 'MISS'} ({best / base_rate:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
