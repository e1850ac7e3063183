"""Distillation: teacher against student, each built by kiln and served by its selected variant, in one run.

    .venv/bin/python bench/distill.py                 # digits and the encoder (about 4-6 minutes on 2 cores)
    .venv/bin/python bench/distill.py --only digits

1. digits: the teacher (examples/digits DigitsNet) and students derived by `kiln distill` at width 0.5 and 0.25
   (the teacher structurally pruned to that width: its accuracy before training is printed too), trained on
   examples/digits/train.npz; every model built with the same backends (eager, torchscript,
   onnxruntime); the selected variants timed at batch 1 and 32, alternating, median of --rounds; accuracy on
   examples/digits/test.npz, which no model trained on.
2. encoder: examples/encoder's 6-layer encoder (hidden 384, random weights, seed 0) distilled to 3 layers (every
   other layer, the DistilBERT recipe) on random token sequences (seq 64); speed-up of the selected variants at
   batch 8, and the cosine of the student's outputs to the teacher's on held-out sequences.
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
BACKENDS = ("eager", "torchscript", "onnxruntime")


def timed(paths: dict[str, Path], inputs: dict[int, list[torch.Tensor]], rounds: int) -> dict[str, dict[int, float]]:
    """Median p50 of each model's selected variant per batch size, the models alternating within every round."""
    runners = {name: kiln.load(p) for name, p in paths.items()}
    samples: dict[str, dict[int, list[float]]] = {n: {b: [] for b in inputs} for n in paths}
    for _ in range(rounds):
        for b, xs in inputs.items():
            for name, r in runners.items():
                samples[name][b].append(time_runner(r, xs, batch=b, min_time_s=0.5).p50_ms)
    return {n: {b: statistics.median(v) for b, v in per.items()} for n, per in samples.items()}


def digits(work: Path, rounds: int) -> list[dict[str, Any]]:
    test = np.load(DIGITS / "test.npz")
    teacher = kiln.build(f"{DIGITS}/model.py:DigitsNet", weights=DIGITS / "digits.safetensors", data=DIGITS / "test.npz",
                         repo=work, backends=BACKENDS, precision="fp32", report=False)
    assert teacher.path is not None
    paths = {"teacher DigitsNet": teacher.path}
    info: dict[str, dict[str, Any]] = {"teacher DigitsNet": {"params": None, "selected": teacher.selected}}
    from kiln.source import ModelSource, load_module
    from kiln.transforms.student import derive

    teacher_module = load_module(ModelSource.parse(f"{DIGITS}/model.py:DigitsNet", weights=DIGITS / "digits.safetensors"))
    for width in (0.5, 0.25):
        pruned, _, _ = derive(teacher_module, width=width)  # the student before training: the teacher, pruned
        with torch.no_grad():
            untrained = float((pruned(torch.from_numpy(test["image"])).argmax(1).numpy() == test["labels"]).mean())
        r = kiln.distill(f"{DIGITS}/model.py:DigitsNet", weights=DIGITS / "digits.safetensors",
                         data=DIGITS / "train.npz", eval_data=DIGITS / "test.npz", width=width, repo=work,
                         name=f"digits-w{int(width * 100)}", epochs=40,
                         build_options={"backends": BACKENDS, "precision": "fp32"})
        assert r.build.path is not None
        name = f"student width {width:g}"
        paths[name] = r.build.path
        info[name] = {"params": r.summary["student_parameters"], "selected": r.build.selected,
                      "epochs": r.summary["epochs"], "seconds": sum(e.seconds for e in r.epochs),
                      "accuracy_before_training": untrained}
        info["teacher DigitsNet"]["params"] = r.summary["teacher_parameters"]
    x = torch.from_numpy(test["image"])
    times = timed(paths, {1: [x[:1]], 32: [x[:32]]}, rounds)
    rows = []
    for name, p in paths.items():
        out = kiln.load(p)(test["image"])
        acc = float((np.asarray(out).argmax(1) == test["labels"]).mean())
        rows.append({"model": "digits", "name": name, **info[name], "p50_ms_1": times[name][1],
                     "p50_ms_32": times[name][32], "accuracy": acc,
                     "speedup_1": times["teacher DigitsNet"][1] / times[name][1],
                     "speedup_32": times["teacher DigitsNet"][32] / times[name][32]})
    return rows


def encoder(work: Path, rounds: int) -> list[dict[str, Any]]:
    import importlib.util

    from safetensors.torch import save_model

    # by path: after the digits part, `model` in sys.modules is the digits students' copy of their model file
    spec = importlib.util.spec_from_file_location("kiln_bench_encoder", ENCODER / "model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    TextEncoder = mod.TextEncoder

    torch.manual_seed(0)
    save_model(TextEncoder().eval(), str(work / "encoder.safetensors"))
    rng = np.random.default_rng(0)
    n, seq = 1024, 64
    ids = rng.integers(0, 8192, (n, seq)).astype(np.int64)
    np.savez(work / "tokens.npz", ids=ids, mask=np.ones_like(ids))
    specs = ["ids:int64[batch,seq<=512]@0..8191", "mask:int64[batch,seq<=512]@1..1"]
    opts = {"backends": ("eager", "onnxruntime"), "precision": "fp32", "batch": (1, 8),
            "dim_sizes": {"seq": seq}}
    teacher = kiln.build(f"{ENCODER}/model.py:TextEncoder", weights=work / "encoder.safetensors", inputs=specs,
                         repo=work, name="encoder", report=False, **opts)
    r = kiln.distill(f"{ENCODER}/model.py:TextEncoder", weights=work / "encoder.safetensors", inputs=specs,
                     data=work / "tokens.npz", repo=work, name="encoder-student", epochs=20, max_minutes=3,
                     batch=32, lr=5e-4, build_options=opts)
    assert teacher.path is not None and r.build.path is not None
    held = rng.integers(0, 8192, (64, seq)).astype(np.int64)
    xs = [torch.from_numpy(held[:8]), torch.ones(8, seq, dtype=torch.int64)]
    times = timed({"teacher": teacher.path, "student": r.build.path}, {8: xs}, rounds)
    t_out = kiln.load(teacher.path, variant="eager/fp32").named(held, np.ones_like(held))
    s_out = kiln.load(r.build.path).named(held, np.ones_like(held))

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
        return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

    return [{"model": "encoder", "name": "teacher 6 layers", "selected": teacher.selected, "p50_ms_8": times["teacher"][8]},
            {"model": "encoder", "name": f"student {r.derived}", "selected": r.build.selected,
             "p50_ms_8": times["student"][8], "speedup_8": times["teacher"][8] / times["student"][8],
             "cosine_hidden": cosine(s_out["hidden"], t_out["hidden"]),
             "cosine_logits": cosine(s_out["logits"], t_out["logits"]), "epochs": r.summary["epochs"],
             "params": r.summary["student_parameters"], "teacher_params": r.summary["teacher_parameters"]}]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("digits", "encoder"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-distill-") as tmp:
        if args.only in (None, "digits"):
            rows += digits(Path(tmp), args.rounds)
        if args.only in (None, "encoder"):
            rows += encoder(Path(tmp), args.rounds)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    print(f"\n{'model':<8} {'name':<22} {'selected':<18} {'params':>8} {'p50 ms @1':>10} {'p50 ms @32':>11} "
          f"{'speed-up':>9} {'accuracy / cosine':>18}")
    for r in rows:
        if r["model"] == "digits":
            print(f"{r['model']:<8} {r['name']:<22} {r['selected']:<18} {r['params'] or 0:>8,} {r['p50_ms_1']:>10.3f} "
                  f"{r['p50_ms_32']:>11.3f} {r['speedup_1']:>5.2f}x@1 {r['speedup_32']:>5.2f}x@32 {r['accuracy']:>8.2%}"
                  + (f" (pruned, untrained: {r['accuracy_before_training']:.2%})" if "accuracy_before_training" in r else ""))
        else:
            name = r["name"][:22]
            extra = (f"{r['speedup_8']:>5.2f}x@8  hidden {r['cosine_hidden']:.4f} logits {r['cosine_logits']:.4f}"
                     if "speedup_8" in r else "")
            print(f"{r['model']:<8} {name:<22} {r['selected']:<18} {'':>8} {'':>10} {'p50 ' + format(r['p50_ms_8'], '.3f') + ' @8':>11} {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
