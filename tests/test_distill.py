"""kiln distill: derived students, the training loop, the build of the student, and that distillation pays."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kiln
from kiln.distiller import _run, fit
from kiln.errors import KilnError
from kiln.source import ModelSource, load_module
from kiln.transforms.student import derive, from_plan
from support import DIGITS, ROOT

ENCODER = ROOT / "examples" / "encoder" / "model.py"


def _teacher() -> nn.Module:
    return load_module(ModelSource.parse(f"{DIGITS}/model.py:DigitsNet", weights=DIGITS / "digits.safetensors"))


def test_a_cnn_student_keeps_the_teachers_most_important_channels() -> None:
    teacher = _teacher()
    student, plan, how = derive(teacher, width=0.25)
    assert "width x0.25" in how and "chprune75" in how
    assert student.features[0].out_channels == 4 and student.head[1].out_features == 16  # 16 -> 4, 64 -> 16
    kept = [int(i) for i in teacher.features[0].weight.abs().flatten(1).sum(1).topk(4).indices.sort().values]
    assert torch.equal(student.features[0].weight, teacher.features[0].weight[kept])  # initialised from the teacher
    rebuilt = from_plan(type(teacher)(), plan)  # what the student's code does: the teacher's class, resized
    rebuilt.load_state_dict(student.state_dict())
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(rebuilt.eval()(x), student.eval()(x))


def test_an_encoder_student_keeps_every_other_layer() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("kiln_test_encoder", ENCODER)  # by path: `model` may be taken
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    teacher = mod.TextEncoder(vocab=64, dim=32, heads=2, layers=6, max_len=16).eval()
    student, plan, how = derive(teacher)
    assert plan == {"keep": {"encoder.layers": [0, 2, 4]}} and "DistilBERT" in how
    assert len(student.encoder.layers) == 3 and student.encoder.num_layers == 3
    torch.testing.assert_close(student.encoder.layers[1].linear1.weight, teacher.encoder.layers[2].linear1.weight)
    ids = torch.randint(0, 64, (2, 8))
    out = student(ids, torch.ones_like(ids))
    assert out["hidden"].shape == (2, 8, 32) and out["logits"].shape == (2, 4)


def test_a_model_with_nothing_to_shrink_is_refused_with_a_hint() -> None:
    with pytest.raises(KilnError, match="cannot derive a student") as e:
        derive(nn.Sequential(nn.Linear(4, 2)))
    assert "--student" in (e.value.hint or "")


class Narrow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                               nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.f(image)


def test_distillation_beats_the_same_student_trained_from_scratch_on_labels() -> None:
    """Same student architecture, data, epochs and seeds: distilled (initialised from the teacher, trained on its
    outputs and the labels) against from scratch (random weights, labels alone). Judged on the test split, which
    neither saw; the margin must exceed the seed-to-seed spread."""
    teacher = _teacher()
    train, test = np.load(DIGITS / "train.npz"), np.load(DIGITS / "test.npz")
    x, y = train["image"], train["labels"]
    with torch.no_grad():
        t_out = _run(teacher, [x], 256)
    order = np.random.default_rng(0).permutation(len(x))
    held, rows = np.sort(order[: len(x) // 4]), order[len(x) // 4:]
    student, plan, _ = derive(teacher, width=0.25)

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(torch.from_numpy(test["image"])).argmax(1).numpy() == test["labels"]).mean())

    scores: dict[str, list[float]] = {"distilled": [], "scratch": []}
    for seed in range(5):
        for how in scores:
            torch.manual_seed(seed)
            m = copy.deepcopy(student) if how == "distilled" else from_plan(type(teacher)(), plan)
            fit(m, t_out, [x], y, rows, held, kinds=["logits"], epochs=3, alpha=0.5 if how == "distilled" else 0.0,
                patience=100, seed=seed)
            scores[how].append(accuracy(m))
    d, s = np.asarray(scores["distilled"]), np.asarray(scores["scratch"])
    assert d.mean() - s.mean() > max(d.std(), s.std()), scores
    assert d.min() > np.median(s), scores


def test_distill_cli_end_to_end(tmp_path: Path) -> None:
    """The README's command: a derived student, trained, built, compared with the teacher on data neither saw."""
    kiln_exe = Path(sys.executable).with_name("kiln")
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^\.venv/bin/kiln distill .*?(?=\n```)", readme, re.M | re.S)
    assert command is not None, "the README's distill command"
    argv = shlex.split(command[0].replace("\\\n", " "))
    argv[argv.index("--repo") + 1] = str(tmp_path)
    t0 = time.monotonic()
    p = subprocess.run([str(kiln_exe), *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    assert took < 120, f"the demo took {took:.0f}s; it promises under two minutes on 2 cores"
    assert "student: width x0.25" in p.stdout and "selected " in p.stdout and "report: " in p.stdout
    assert "epoch 1: train loss" in p.stderr  # one progress line per epoch when not on a terminal
    vdir = tmp_path / "digits-student" / "1"
    m = json.loads((vdir / "kiln.json").read_text())
    d = m["distillation"]
    assert d["teacher"].endswith("model.py:DigitsNet") and d["student"] == "kiln_student.py:Student"
    assert d["student_parameters"] < d["teacher_parameters"] and d["epochs"] >= 1 and len(d["data_sha256"]) == 64
    ev = d["eval"]
    assert ev["items"] == 450 and ev["student_accuracy"] > 0.95 and abs(ev["accuracy_delta"]) < 0.03
    assert all("teacher" in c for c in m["candidates"] if c["status"] == "accepted")
    assert 'id="distill"' in (vdir / "report.html").read_text()
    assert str(ROOT) not in (vdir / "kiln.json").read_text() and str(tmp_path) not in (vdir / "kiln.json").read_text()
    # the student artifact carries its own code: the generated student file and the teacher's model file
    eager = next(c for c in m["candidates"] if c["variant"] == "eager/fp32")
    assert {"code/kiln_student.py", "code/model.py"} <= set(eager["artifact"]["files"])
    runner = kiln.load(vdir, variant="eager/fp32")
    x = np.load(DIGITS / "test.npz")["image"][:8]
    assert runner(x).shape == (8, 10)


def test_a_built_teacher_with_a_users_student_and_resume(digits_repo: Path, tmp_path: Path) -> None:
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "small.py").write_text(textwrap.dedent('''
        from torch import nn


        class Small(nn.Module):
            def __init__(self):
                super().__init__()
                self.f = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

            def forward(self, image):
                return self.f(image)
        '''))
    common = dict(data=DIGITS / "train.npz", student=f"{folder}/small.py:Small", repo=tmp_path / "repo",
                  build_options={"backends": ("eager",), "precision": "fp32"}, patience=100)
    first = kiln.distill(str(digits_repo), epochs=2, **common)  # type: ignore[arg-type]
    assert first.derived is None and len(first.epochs) == 2 and first.build.selected == "eager/fp32"
    assert first.summary["teacher"] == "digits version 1"
    more = kiln.distill(str(digits_repo), epochs=4, resume=True, **common)  # type: ignore[arg-type]
    assert [e.epoch for e in more.epochs] == [1, 2, 3, 4]  # epochs 1-2 from the checkpoint, 3-4 trained now
    assert more.epochs[:2] == first.epochs
    assert more.build.version == 2


def test_pruning_is_recovered_by_distillation(tmp_path: Path) -> None:
    """--prune 0.5 without fine-tuning loses accuracy; distilled from the original it comes back."""
    teacher = _teacher()
    pruned, _, _ = derive(teacher, width=0.5)
    test = np.load(DIGITS / "test.npz")

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m.eval()(torch.from_numpy(test["image"])).argmax(1).numpy() == test["labels"]).mean())

    r = kiln.distill(f"{DIGITS}/model.py:DigitsNet", weights=DIGITS / "digits.safetensors", data=DIGITS / "train.npz",
                     prune=0.5, epochs=8, repo=tmp_path, eval_data=DIGITS / "test.npz",
                     build_options={"backends": ("eager",), "precision": "fp32"})
    assert "chprune50" in (r.derived or "")
    assert r.summary["eval"]["student_accuracy"] >= accuracy(pruned)
    assert r.summary["eval"]["student_accuracy"] > 0.97
