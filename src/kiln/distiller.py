"""kiln distill: train a smaller student on a teacher's outputs, then build it like any other model.

The student learns the teacher's logits (temperature-scaled KL, plus cross-entropy on labels when the data has
them) and its other outputs (MSE plus cosine distance), on a training split of --data; a held-out split decides
early stopping and is what the build verifies on. The student then goes through `kiln build` (every runtime and
precision, verified against its own fp32), and each accepted variant is also compared with the teacher's fp32
outputs on the held-out split; the manifest and report say what the student costs and buys.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kiln import repository
from kiln.bench.timing import time_runner
from kiln.builder import BuildResult, build, resolve, write_report
from kiln.data import read_npz
from kiln.errors import KilnError
from kiln.progress import Reporter, Silent
from kiln.signature import FlatModel, is_classifier
from kiln.source import ModelSource, load_module, sha256_file
from kiln.spec import TensorSpec
from kiln.verify import compare, to_dict


@dataclass
class Epoch:
    epoch: int
    train_loss: float
    heldout_loss: float
    agreement: float | None = None
    accuracy: float | None = None
    seconds: float = 0.0


@dataclass
class DistillResult:
    """What was trained and what the build made of it."""

    student: str
    derived: str | None
    epochs: list[Epoch]
    stopped: str
    work_dir: Path
    build: BuildResult
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Teacher:
    name: str
    text: str
    sha256: str
    module: nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    code: Path | None  # folder of the teacher's code (to derive a student from)
    attr: str | None
    file: str | None
    local_files: list[str]


def distill(teacher: str, *, data: str | Path, student: str | None = None, student_weights: str | Path | None = None,
            weights: str | Path | None = None, inputs: Sequence[str | TensorSpec] | None = None,
            repo: str | Path = "models", name: str | None = None, width: float = 0.5, prune: float | None = None,
            epochs: int = 40, max_minutes: float = 10.0, batch: int = 64, lr: float = 2e-3, temperature: float = 4.0,
            alpha: float = 0.5, holdout: float = 0.25, patience: int = 6, seed: int = 0, resume: bool = False,
            eval_data: str | Path | None = None,
            work_dir: str | Path | None = None, progress: Reporter | None = None,
            build_options: dict[str, Any] | None = None) -> DistillResult:
    """Distill `teacher` (anything kiln build takes, or a built repo/<model>) into a student and build it.

    >>> r = kiln.distill("examples/digits/model.py:DigitsNet", weights="examples/digits/digits.safetensors",
    ...                  data="examples/digits/train.npz", repo="models")
    >>> r.build.selected, r.summary["student_accuracy"]

    Without `student`, kiln derives one (`width` for CNNs; every other layer for transformer encoders); `prune`
    makes the student the teacher with that share of channels removed (structured pruning), recovered here.
    """
    prog = progress or Silent()
    if not 0.0 < holdout < 0.9:
        raise KilnError(f"holdout {holdout} must be between 0 and 0.9", hint="e.g. --holdout 0.25")
    if epochs < 1 or batch < 1 or max_minutes <= 0:
        raise KilnError("--epochs and --batch must be at least 1, --max-minutes positive", hint="e.g. --epochs 40")
    torch.manual_seed(seed)
    t = _load_teacher(teacher, weights=weights, inputs=inputs)
    x_all, labels = _arrays(Path(data), t.inputs)
    n = len(x_all[0])
    order = np.random.default_rng(seed).permutation(n)
    n_held = max(1, int(round(n * holdout)))
    held, train = np.sort(order[:n_held]), order[n_held:]
    if len(train) < 2:
        raise KilnError(f"{data} has {n} items: too few to train on", hint="give at least a few dozen examples")
    with torch.no_grad():
        t_out = _run(t.module, x_all, batch)
    kinds = ["logits" if is_classifier(s) else "dense" for s in t.outputs]
    work = Path(work_dir) if work_dir is not None else Path(repo) / ".distill" / (name or f"{t.name}-student")
    work.mkdir(parents=True, exist_ok=True)

    model, source, derived = _student(t, student, student_weights, width, prune, work)
    history, stopped, best_loss = fit(model, t_out, x_all, labels, train, held, kinds=kinds, epochs=epochs,
                                      max_minutes=max_minutes, batch=batch, lr=lr, temperature=temperature, alpha=alpha,
                                      patience=patience, seed=seed, checkpoint=work / "checkpoint.pt", resume=resume,
                                      progress=prog)
    weights_file = work / "student.safetensors"
    from safetensors.torch import save_model

    save_model(model, str(weights_file))
    held_file = work / "heldout.npz"
    arrays: dict[str, Any] = {s.name: a[held] for s, a in zip(t.inputs, x_all)}
    if labels is not None:
        arrays["labels"] = labels[held]
    np.savez(held_file, **arrays)

    opts = {"batch": (1, 32), **(build_options or {})}
    result = build(source, weights=weights_file, inputs=list(t.inputs), name=name or f"{t.name}-student", repo=repo,
                   data=held_file, report=False, **opts)
    summary = _against_teacher(result, t, [a[held] for a in x_all], [o[held].numpy() for o in t_out],
                               labels[held] if labels is not None else None, opts["batch"])
    summary.update(teacher=t.text, teacher_sha256=t.sha256, student=source.split("/")[-1], derived=derived,
                   data=Path(data).name, data_sha256=sha256_file(Path(data)), seed=seed, temperature=temperature,
                   alpha=alpha, holdout_items=int(n_held), train_items=int(len(train)), stopped=stopped,
                   epochs=len(history), final_train_loss=history[-1].train_loss if history else None,
                   best_heldout_loss=best_loss,
                   teacher_parameters=sum(p.numel() for p in t.module.parameters()),
                   student_parameters=sum(p.numel() for p in model.parameters()))
    if eval_data is not None and result.selected is not None and result.path is not None:
        summary["eval"] = _evaluate(Path(eval_data), t, result)
    if result.path is not None:
        result.manifest["distillation"] = summary
        repository.write_manifest(result.path, result.manifest)
        write_report(result)
    return DistillResult(source, derived, history, stopped, work, result, summary)


def fit(model: nn.Module, t_out: list[torch.Tensor], x_all: list[np.ndarray], labels: np.ndarray | None,
        train: np.ndarray, held: np.ndarray, *, kinds: list[str], epochs: int = 40, max_minutes: float = 10.0,
        batch: int = 64, lr: float = 2e-3, temperature: float = 4.0, alpha: float = 0.5, patience: int = 6,
        seed: int = 0, checkpoint: Path | None = None, resume: bool = False,
        progress: Reporter | None = None) -> tuple[list[Epoch], str, float]:
    """Train `model` (in place) on the teacher's outputs `t_out` for the rows `train`; stop early on the held-out
    rows' loss; leave the best weights in the model. `alpha` weighs distillation against labels (1: teacher only,
    0: labels only). Returns the epochs, why training stopped, and the best held-out loss."""
    prog = progress or Silent()
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(True)
    flat = FlatModel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    history: list[Epoch] = []
    best = (math.inf, copy.deepcopy(model.state_dict()))
    bad = 0
    start_epoch = 0
    if resume:
        if checkpoint is None or not checkpoint.is_file():
            raise KilnError(f"--resume: no checkpoint at {checkpoint}", hint="run without --resume to start")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        best = (float(state["best_loss"]), state["best_state"])
        bad, start_epoch = int(state["bad_epochs"]), int(state["epoch"])
        history = [Epoch(**e) for e in state["history"]]
    rng = torch.Generator().manual_seed(seed + start_epoch)
    xt = [torch.from_numpy(a) for a in x_all]
    yt = torch.from_numpy(labels) if labels is not None else None
    deadline = time.perf_counter() + max_minutes * 60
    stopped = f"{epochs} epochs"
    prog.start(max(0, epochs - start_epoch))
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        model.train()
        total, seen = 0.0, 0
        for idx in torch.from_numpy(train)[torch.randperm(len(train), generator=rng)].split(batch):
            if len(idx) < 2:
                continue  # BatchNorm needs two rows in training mode
            opt.zero_grad()
            loss = _loss(flat(*[x[idx] for x in xt]), [o[idx] for o in t_out], kinds, temperature, alpha,
                         yt[idx] if yt is not None else None)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            if time.perf_counter() > deadline:
                break
        model.eval()
        with torch.no_grad():
            h_out = _run(model, [a[held] for a in x_all], 256)
            h_loss = float(_loss(h_out, [o[held] for o in t_out], kinds, temperature, 1.0, None))
        e = Epoch(epoch + 1, total / max(1, seen), h_loss, seconds=time.perf_counter() - t0)
        if "logits" in kinds:
            k = kinds.index("logits")
            e.agreement = float((h_out[k].argmax(1) == t_out[k][held].argmax(1)).float().mean())
            if labels is not None:
                e.accuracy = float((h_out[k].argmax(1).numpy() == labels[held]).mean())
        history.append(e)
        if h_loss < best[0] - 1e-6:
            best, bad = (h_loss, copy.deepcopy(model.state_dict())), 0
        else:
            bad += 1
        if checkpoint is not None:  # weights_only-loadable: tensors, numbers, lists and dicts of them
            torch.save({"epoch": epoch + 1, "student": model.state_dict(), "optimizer": opt.state_dict(),
                        "best_loss": best[0], "best_state": best[1], "bad_epochs": bad,
                        "history": [asdict(h) for h in history]}, checkpoint.with_suffix(".tmp"))
            checkpoint.with_suffix(".tmp").replace(checkpoint)
        prog.step("student", f"epoch {epoch + 1}")
        prog.outcome(f"epoch {epoch + 1}", _epoch_text(e))
        if bad >= patience:
            stopped = f"early stop after epoch {epoch + 1} (held-out loss did not improve for {patience} epochs)"
            break
        if time.perf_counter() > deadline:
            stopped = f"time budget of {max_minutes:g} min reached in epoch {epoch + 1}"
            break
    prog.close()
    model.load_state_dict(best[1])
    model.eval()
    return history, stopped, best[0]


def _epoch_text(e: Epoch) -> str:
    text = f"train loss {e.train_loss:.4f}, held-out loss {e.heldout_loss:.4f}"
    if e.agreement is not None:
        text += f", agreement with teacher {e.agreement:.1%}"
    if e.accuracy is not None:
        text += f", accuracy {e.accuracy:.1%}"
    return text + f" ({e.seconds:.1f}s)"


def _loss(s_out: Sequence[torch.Tensor], t_out: Sequence[torch.Tensor], kinds: list[str], temperature: float,
          alpha: float, labels: torch.Tensor | None) -> torch.Tensor:
    """Logits: KL between temperature-softened distributions (scaled by T^2), mixed with cross-entropy on labels
    (weight 1 - alpha) for the first logits output. Other outputs: MSE against the teacher plus cosine distance."""
    total = torch.zeros(())
    first_logits = True
    for s, t, kind in zip(s_out, t_out, kinds):
        if kind == "logits":
            kd = F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1),
                          reduction="batchmean") * temperature ** 2
            if labels is not None and first_logits:
                total = total + alpha * kd + (1 - alpha) * F.cross_entropy(s, labels)
            else:
                total = total + kd
            first_logits = False
        else:
            scale = t.detach().pow(2).mean().clamp(min=1e-8)
            cos = F.cosine_similarity(s.reshape(len(s), -1), t.reshape(len(t), -1), dim=1).mean()
            total = total + F.mse_loss(s, t) / scale + (1 - cos)
    return total


def _run(module: nn.Module, xs: list[np.ndarray], batch: int) -> list[torch.Tensor]:
    flat = FlatModel(module).eval()
    parts: list[list[torch.Tensor]] = []
    for lo in range(0, len(xs[0]), batch):
        parts.append(list(flat(*(torch.from_numpy(x[lo:lo + batch]) for x in xs))))
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


def _arrays(path: Path, specs: list[TensorSpec]) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Inputs (checked against the specs) and integer labels from an .npz, through kiln.data.read_npz."""
    xs, labels = read_npz(path, specs)
    return [np.ascontiguousarray(x) for x in xs], labels.astype(np.int64) if labels is not None else None


def _load_teacher(text: str, *, weights: str | Path | None, inputs: Sequence[str | TensorSpec] | None) -> _Teacher:
    p = Path(text)
    if p.is_dir():  # a built model: its eager/fp32 artifact is the teacher
        version_dir, m = repository.resolve(p)
        entry = repository.candidate(m, "eager/fp32")
        directory = repository.verify_artifact(version_dir, entry)
        meta = entry["artifact"]["meta"]
        from kiln.backends.common import rebuild_module

        module = rebuild_module(directory, meta)
        code = directory / "code" if (directory / "code").is_dir() else None
        local = [str(f.relative_to(code)) for f in sorted(code.rglob("*")) if f.is_file()] if code else []
        return _Teacher(m["name"], f"{m['name']} version {m['version']}", m["source"].get("sha256", ""), module,
                        [TensorSpec.from_dict(s) for s in m["inputs"]], [TensorSpec.from_dict(s) for s in m["outputs"]],
                        code, meta.get("attr"), Path(meta["file"]).name if "file" in meta and code else None, local)
    res = resolve(text, weights=weights, inputs=inputs)
    src = res.source
    if res.module is None:
        raise KilnError("an ONNX teacher has no PyTorch module to run while training",
                        hint="give the teacher as Python code with --weights, or a TorchScript/.pt2 file")
    folder = src.path.parent if src.kind == "python" and src.path is not None else None
    # names, not paths: the teacher is recorded in kiln.json, which never holds a build machine's absolute path
    return _Teacher(res.name, src.to_dict()["text"], src.sha256 or (src.weights_sha256 or ""), res.module, res.inputs,
                    res.outputs,
                    folder, src.attr, src.path.name if folder is not None and src.path else None, list(src.local_files))


def _student(t: _Teacher, student: str | None, student_weights: str | Path | None, width: float,
             prune: float | None, work: Path) -> tuple[nn.Module, str, str | None]:
    """(module, its source for kiln build, how it was derived or None for a user's student)."""
    if student is not None:
        src = ModelSource.parse(student, weights=student_weights)
        if src.kind != "python":
            raise KilnError("--student must be Python code (file.py:Class or pkg.module:Class)",
                            hint="the student is trained, so kiln needs its code")
        return load_module(src), student, None
    from kiln.transforms.student import derive

    if t.code is None or t.file is None or t.attr is None:
        raise KilnError("kiln derives students only from teachers given as Python code",
                        hint="give --student path/model.py:Student, or the teacher as file.py:Class with --weights")
    model, plan, how = derive(t.module, width=1.0 - prune if prune is not None else width)
    code = work / "student"
    code.mkdir(parents=True, exist_ok=True)
    for rel in t.local_files:  # the teacher's code, beside the student's: the student rebuilds from it
        dest = code / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((t.code / rel).read_bytes())
    module_name = Path(t.file).stem
    (code / "kiln_student.py").write_text(
        f'"""Student of {t.text}, made by kiln distill: {how}."""\n\n'
        f"from {module_name} import {t.attr} as _Teacher\n\n"
        "from kiln.transforms.student import from_plan\n\n"
        f"PLAN = {json.dumps(plan)}\n\n\n"
        "def Student():\n"
        "    return from_plan(_Teacher(), PLAN)\n")
    return model, f"{code / 'kiln_student.py'}:Student", how


def _against_teacher(result: BuildResult, t: _Teacher, xs: list[np.ndarray], t_ref: list[np.ndarray],
                     labels: np.ndarray | None, batch_sizes: Sequence[int]) -> dict[str, Any]:
    """Each accepted student variant against the teacher's fp32 outputs on the held-out split, and both timed."""
    from kiln.backends.common import module_runner

    out: dict[str, Any] = {"variants": {}}
    k = next((i for i, s in enumerate(t.outputs) if is_classifier(s)), None)
    if labels is not None and k is not None:
        out["teacher_accuracy"] = float((t_ref[k].argmax(1) == labels).mean())
    teacher_runner = module_runner(FlatModel(t.module).eval(), "teacher/eager/fp32", t.inputs, t.outputs, "cpu")
    out["teacher_timings"] = [asdict(_time(teacher_runner, t.inputs, xs, b)) for b in batch_sizes]
    for c in result.candidates:
        if c.status != "accepted" or result.path is None:
            continue
        runner = repository.load(result.path, variant=c.variant)
        got = [[np.asarray(o) for o in runner.run([torch.from_numpy(x) for x in xs])]]
        checks = to_dict(compare(t.outputs, [t_ref], got, labels))
        c.notes.append("against the teacher: " + ", ".join(
            f"{d['name']} cosine {d['cosine']:.4f}" + (f", top-1 agreement {d['top1_agreement']:.2%}" if "top1_agreement" in d else "")
            for d in checks if "cosine" in d))
        out["variants"][c.variant] = checks
        for cand in result.manifest.get("candidates", []):
            if cand["variant"] == c.variant:
                cand["teacher"] = checks
    sel = result.selected
    if sel is not None and k is not None and labels is not None:
        out["student_accuracy"] = out["variants"][sel][k].get("accuracy")
    if sel is not None:
        cand = result.candidate(sel)
        t1 = {d["batch"]: d for d in out["teacher_timings"]}
        out["speedup_vs_teacher_eager"] = {str(tm.batch): t1[tm.batch]["p50_ms"] / tm.p50_ms for tm in cand.timings
                                           if tm.batch in t1}
    return out


def _evaluate(path: Path, t: _Teacher, result: BuildResult) -> dict[str, Any]:
    """Teacher and selected student on data neither trained on (e.g. the test split): accuracy and agreement."""
    xs, labels = _arrays(path, t.inputs)
    k = next((i for i, s in enumerate(t.outputs) if is_classifier(s)), None)
    assert result.path is not None
    runner = repository.load(result.path)
    with torch.no_grad():
        t_out = [o.numpy() for o in _run(t.module, xs, 256)]
    s_out = [np.asarray(o) for o in runner.run([torch.from_numpy(x) for x in xs])]
    out: dict[str, Any] = {"data": path.name, "items": len(xs[0]), "variant": result.selected,
                           "against_teacher": to_dict(compare(t.outputs, [t_out], [s_out], labels))}
    if k is not None:
        out["agreement"] = float((s_out[k].argmax(1) == t_out[k].argmax(1)).mean())
        if labels is not None:
            out["teacher_accuracy"] = float((t_out[k].argmax(1) == labels).mean())
            out["student_accuracy"] = float((s_out[k].argmax(1) == labels).mean())
            out["accuracy_delta"] = out["student_accuracy"] - out["teacher_accuracy"]
    return out


def _time(runner: Any, inputs: list[TensorSpec], xs: list[np.ndarray], b: int) -> Any:
    reps = [np.concatenate([x] * (b // len(x) + 1))[:b] for x in xs]
    return time_runner(runner, [torch.from_numpy(np.ascontiguousarray(r)) for r in reps], batch=b)

