"""kiln build: try every variant that can run here, verify each against fp32 eager, keep the fastest."""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from kiln import __version__, repository
from kiln import backends as registry
from kiln.backends.common import Subject, first_line
from kiln.bench.memory import PeakMemory
from kiln.bench.timing import Timing, time_runner
from kiln.data import VerifyData, batch_dim, timing_inputs, verification_data
from kiln.errors import KilnError, Skip
from kiln.plan import Estimate, Variant, cost, plan, probe_low_precision
from kiln.plan import quick as quick_plan
from kiln.progress import Reporter, Silent
from kiln.runner import Runner
from kiln.selection import is_lossy, select
from kiln.signature import FlatModel, discover_outputs, example_inputs
from kiln.source import ModelSource, load_module
from kiln.spec import TensorSpec, load_toml_columns, load_toml_outputs, load_toml_specs, parse_output_kind
from kiln.transforms import trim as trimming
from kiln.verify import Budget, compare, infer_kind, judge, to_dict

Objective = Literal["latency", "throughput"]
_STEPS = 4  # per variant: export, load, verify, time
QUICK_BUDGET_S = 60.0
Status = Literal["accepted", "rejected", "skipped", "failed"]


@dataclass
class Candidate:
    variant: str
    backend: str
    precision: str = "fp32"
    passes: list[str] = field(default_factory=list)
    status: Status = "failed"
    reason: str = ""
    accuracy: list[dict[str, Any]] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)
    export_s: float = 0.0
    load_s: float = 0.0
    size_bytes: int = 0
    peak_gpu_mb: float | None = None
    memory_mb: float | None = None
    """CPU: peak RSS growth while the artifact loads and runs the verification batches"""
    notes: list[str] = field(default_factory=list)
    artifact: dict[str, Any] | None = None

    def timing(self, batch: int) -> Timing | None:
        return next((t for t in self.timings if t.batch == batch), None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timings"] = [asdict(t) for t in self.timings]
        return {k: v for k, v in d.items() if v not in (None, [], "")}


@dataclass
class BuildResult:
    name: str
    version: int | None
    path: Path | None
    selected: str | None
    objective: Objective
    candidates: list[Candidate]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    verification: str
    batch_sizes: list[int]
    notes: list[str]
    manifest: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    synthetic: bool = False
    dict_outputs: bool = False
    columns: dict[str, list[str]] = field(default_factory=dict)
    dim_sizes: dict[str, int] = field(default_factory=dict)  # --dim-size: the other dynamic dims' sizes it was timed at

    def candidate(self, variant: str) -> Candidate:
        return next(c for c in self.candidates if c.variant == variant)


@dataclass
class Resolved:
    """Stage 1's result: the source, its eager module (None for ONNX), its signature and the fp32 reference."""

    source: ModelSource
    name: str
    module: torch.nn.Module | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    reference: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    preprocess: dict[str, Any] = field(default_factory=dict)
    dict_outputs: bool = False
    """forward() returns a dict: runners return dicts keyed by output name"""
    columns: dict[str, list[str]] = field(default_factory=dict)
    """kiln.toml's [columns]: the table columns that feed each input (kiln predict)"""


def build(source: str | torch.nn.Module, *, weights: str | Path | None = None,
          inputs: Sequence[str | TensorSpec] | None = None, name: str | None = None, repo: str | Path = "models",
          data: str | Path | None = None, budget: Budget | None = None, batch: int | Sequence[int] = (1, 32),
          objective: Objective = "latency", backends: str | Sequence[str] | None = None, device: str = "cpu",
          dim_size: dict[str, int] | None = None,
          progress: Reporter | None = None, report: bool = True, precision: str = "auto",
          calib: str | Path | None = None, prune: float | None = None,
          variants: Sequence[str] | None = None, outputs: Sequence[str] | dict[str, str] | None = None,
          prefer: Literal["fastest", "lossless"] = "fastest", max_load_s: float | None = None,
          quick: bool = False, time_budget_s: float | None = None, tvm_trials: int = 32) -> BuildResult:
    """Build, verify and select; write repo/<name>/<version>/ and return what happened.

    >>> result = kiln.build("examples/digits/model.py:DigitsNet", weights="examples/digits/digits.safetensors",
    ...                     data="examples/digits/test.npz", repo="models")
    >>> result.selected
    'onnxruntime/fp32'

    `source` is what `kiln build` takes (file.py:Factory, pkg.module:Class, .pt, .pt2, .onnx) or an nn.Module in
    memory. The keywords are the CLI's flags: `batch=(1, 32)` is --batch, `backends=["eager", "onnxruntime"]` is
    --backends (default: all but the optional runtimes openvino, executorch and tvm; "all" for every one), `dim_size={"seq": 128}` is --dim-size.
    `precision` bounds the search (fp32, fp16, bf16, int8 or auto), `prune` adds pruned variants (a fraction),
    `variants` keeps only variants matching these glob patterns (e.g. ["compile/fp16*", "eager/fp32*"]).
    `outputs` declares output kinds ({"embedding": "embedding"} or ["embedding:embedding"]); undeclared ones are
    inferred and said. `prefer="lossless"` keeps an fp32 variant; `max_load_s` rules out variants slower to load.
    `quick` tries only the variants likeliest to win for their build cost (and sets a 60 s `time_budget_s` unless
    one is given); with a time budget, a variant whose expected build time would pass it is skipped, and says so.
    `tvm_trials` is the MetaSchedule trial budget of the tvm variants (0: untuned).
    The stages, each usable alone: resolve -> plan_variants -> verification data and reference outputs ->
    run_variant (export, load back, verify, time) for each -> select -> write_repository -> report.
    """
    prog = progress or Silent()
    budget = budget or Budget()
    if objective not in ("latency", "throughput"):
        raise KilnError(f"unknown objective {objective!r}", hint="use latency or throughput")
    if prefer not in ("fastest", "lossless"):
        raise KilnError(f"unknown preference {prefer!r}", hint="use fastest or lossless")
    if isinstance(batch, int):
        batch = (batch,)
    if not batch or any(b < 1 for b in batch):
        raise KilnError(f"bad batch sizes {list(batch)}", hint="give positive sizes, e.g. --batch 1,32")
    check_build_device(device)
    if isinstance(backends, str):
        backends = backends.split(",")
    names = registry.names() if backends and list(backends) == ["all"] else list(backends or registry.defaults())
    for n in names:
        registry.get(n)
    dim_sizes = dim_size or {}
    with _exporters_quiet():
        res = resolve(source, weights=weights, inputs=inputs, name=name, device=device, outputs=outputs)
        todo = plan(names, precision=precision, device=device, module=res.module, prune=prune, patterns=variants,
                    transformable=res.source.kind == "python", source_kind=res.source.kind,
                    trim=trimming.plan(res.inputs, res.outputs) is not None)
        left_by_name: dict[str, str] = {}
        if quick:
            left_by_name = quick_plan(todo)
            time_budget_s = QUICK_BUDGET_S if time_budget_s is None else time_budget_s
        int8_static = any(v.recipe.precision == "int8-static" for v in todo)
        verify = verification_data(res.inputs, Path(data) if data else None, calib=Path(calib) if calib else None,
                                   hold_out=int8_static)
        sizes = sorted(set(batch)) if batch_dim(res.inputs) else [1]
        left_out: dict[str, str] = {}
        if res.module is not None and device == "cpu" and precision == "auto" and any(v.recipe.dtype for v in todo):
            left_out = probe_low_precision(res.module, timing_inputs(res.inputs, sizes[-1], verify, dim_sizes))
        trim_note = None
        if any(v.recipe.has("trim") for v in todo) and not trimming.exercised(res.inputs, res.outputs, verify.batches):
            trim_note = ("+trim variants not tried: no verification batch has trailing padding to cut, so trimming "
                         "could not be checked")
            todo = [v for v in todo if not v.recipe.has("trim")]
            if not todo:
                raise KilnError(trim_note, hint="pass --data with real rows padded to a common length")
            trim_note += " (pass --data with real, padded rows)"
        for v in todo:
            # eager's probe speaks for the torch backends; a runtime with its own kernels (OpenVINO) says `HALF_PROBE = False`
            if v.recipe.precision in left_out and getattr(registry.get(v.backend), "HALF_PROBE", True):
                left_by_name.setdefault(v.name, left_out[v.recipe.precision])
        if quick:  # likeliest first, so that a time budget cuts the least promising
            todo.sort(key=lambda v: (v.name in left_by_name, v.name != "eager/fp32", cost(v)))
        runnable = [v for v in todo if v.name not in left_by_name]
        prog.start(len(runnable) * _STEPS)
        prog.note(f"verifying against fp32 {'eager' if res.module is not None else 'onnxruntime'} on {verify.description}")
        notes = list(res.source.notes)
        if trim_note:
            notes.append(trim_note)
            prog.note(trim_note)
        if not verify.from_user:
            notes.append(SYNTHETIC_WARNING)
            prog.note(f"warning: {SYNTHETIC_WARNING}")
        ref_out = [[o.numpy(force=True) for o in res.reference(b)] for b in verify.batches]
        res.outputs = kinds_of(res.outputs, ref_out, notes)
        subject = Subject(res.source, res.module, res.inputs, res.outputs, example_inputs(res.inputs), device)
        runners: dict[str, Runner] = {}
        est = Estimate([cost(v) for v in runnable], fixed_s=len(runnable) * 0.5)  # + selection's rounds
        t_start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="kiln-build-") as tmp:
            candidates = []
            for v in todo:
                why = left_by_name.get(v.name)
                nxt = est.next_s() if why is None else None
                if why is None and time_budget_s is not None and nxt is not None \
                        and time.perf_counter() - t_start + nxt > time_budget_s:
                    why = f"left out by the time budget ({time_budget_s:.0f}s): it would take ~{nxt:.0f}s more"
                    est.skip()
                    for _ in range(_STEPS):
                        prog.step(v.name, "skipped")
                    prog.outcome(v.name, f"skipped - {why}")
                if why is not None:
                    candidates.append(Candidate(v.name, v.backend, v.recipe.precision, list(v.recipe.passes), "skipped", why))
                    continue
                candidates.append(run_variant(v, subject, Path(tmp) / repository.variant_dir(v.name), verify, ref_out,
                                              budget, sizes, dim_sizes, prog, keep=runners, estimate=est,
                                              settings={"objective": objective, "tvm_trials": tvm_trials}))
            distrust_orphans(candidates)
            prog.note("selecting: timing the contenders in alternating rounds")
            sel = select([c for c in candidates if c.status == "accepted"], objective, sizes, runners=runners,
                         inputs=lambda b: timing_inputs(res.inputs, b, verify, dim_sizes), prefer=prefer,
                         max_load_s=max_load_s)
            runners.clear()
            result = BuildResult(res.name, None, None, sel.selected, objective, candidates,
                                 res.inputs, res.outputs, verify.description, sizes, notes + subject.notes + sel.notes,
                                 selection=sel.to_dict(), synthetic=not verify.from_user, dict_outputs=res.dict_outputs,
                                 dim_sizes=dim_sizes)
            result.preprocess, result.columns = res.preprocess, res.columns
            if sel.selected is not None:
                write_repository(result, Path(repo), Path(tmp), res.source, budget, device)
    if report and result.path is not None:
        write_report(result)
    prog.close()
    return result


def check_build_device(device: str) -> None:
    """Refuse a device this machine does not have before anything loads."""
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise KilnError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N (e.g. cuda:0)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KilnError(f"--device {device} but this machine has no CUDA GPU", hint="build with --device cpu, or on a GPU machine")


SYNTHETIC_WARNING = ("verification ran on synthetic inputs (random values, masks as valid prefixes): pass --data "
                     "with real inputs (.npz keyed by input name) for a check that reflects your traffic")


def kinds_of(outputs: list[TensorSpec], ref_out: list[list[np.ndarray]], notes: list[str]) -> list[TensorSpec]:
    """Every output with its kind: declared ones kept, the rest inferred from name, shape and the reference's
    values, each inference said in `notes` so a user can correct it."""
    kinded = []
    for k, spec in enumerate(outputs):
        if spec.kind:
            kinded.append(spec)
            continue
        kind, why = infer_kind(spec, [b[k] for b in ref_out])
        notes.append(f"output {spec.name!r} is judged as {kind} ({why}); declare --output {spec.name}:KIND "
                     f"(logits, embedding, regression, mask, boxes) if it is something else")
        kinded.append(replace(spec, kind=kind))
    return kinded


def distrust_orphans(candidates: list[Candidate]) -> None:
    """A lossy variant is not trusted when the exact export it derives from (same backend, fp32) was rejected:
    its looser budget would hide the export's error."""
    for c in candidates:
        if c.status != "accepted" or not is_lossy(c):
            continue
        base = [b for b in candidates if b.backend == c.backend and not is_lossy(b) and not b.passes]
        if base and all(b.status == "rejected" for b in base):
            c.status = "rejected"
            c.reason = f"derives from {base[0].variant}, which was rejected ({base[0].reason})"


def resolve(source: str | torch.nn.Module, *, weights: str | Path | None = None, inputs: Sequence[str | TensorSpec] | None = None,
            name: str | None = None, device: str = "cpu", outputs: Sequence[str] | dict[str, str] | None = None) -> Resolved:
    """Stage 1: parse and load the source, find its input specs, discover its outputs, make the fp32 reference."""
    if isinstance(source, torch.nn.Module):
        if weights is not None:
            raise KilnError("weights= is for sources named by path; an nn.Module already holds its weights",
                            hint="load them into the module first: module.load_state_dict(...)")
        src = ModelSource.from_module(source)
    elif isinstance(source, (str, Path)):
        src = ModelSource.parse(str(source), weights=weights)
    else:
        raise KilnError(f"kiln.build takes a path, 'file.py:Factory' or an nn.Module, not a {type(source).__name__}",
                        hint="e.g. kiln.build('model.py:Net', weights='net.safetensors') or kiln.build(net, inputs=[...])")
    in_specs, toml_name, preprocess = _input_specs(src, inputs)
    model_name = repository.check_name(name or toml_name or _default_name(src))
    if src.kind == "onnx":
        from kiln.backends import onnxruntime as ortb

        assert src.path is not None
        graph_in, out_specs = ortb.signature(src.path)
        in_specs = _merge_onnx_inputs(graph_in, in_specs)
        ref = _onnx_reference(ortb.session(src.path), in_specs, out_specs)
        return Resolved(src, model_name, _onnx_module(src), in_specs, _declare_kinds(src, out_specs, outputs), ref,
                        preprocess, columns=_toml_columns(src, in_specs))
    module = load_module(src)
    if not in_specs:
        args = _forward_arguments(module)
        example = " ".join(f"--input '{a}:float32[batch,...]'" for a in args) if args else \
            "--input 'image:float32[batch,1,8,8]'"
        raise KilnError(f"no input spec for {src.text}" + (f": forward() takes {', '.join(args)}" if args else ""),
                        hint=f"give one --input NAME:DTYPE[DIMS] per argument, in order ({example}), "
                             "or a kiln.toml beside the model")
    try:
        out_specs, as_dict = discover_outputs(module, in_specs)
    except ModuleNotFoundError as e:
        raise KilnError(f"running the model imported {e.name!r}, which is not installed or not in the model's folder",
                        hint="import every module at the top of the model file (kiln copies the model's folder "
                             "modules it imports into the artifact), or install the package") from None
    out_specs = _declare_kinds(src, out_specs, outputs)
    return Resolved(src, model_name, module, in_specs, out_specs, _eager_reference(module, device), preprocess, as_dict,
                    _toml_columns(src, in_specs))


def _onnx_module(src: ModelSource) -> torch.nn.Module | None:
    """An ONNX source as a torch module for the torch backends (verified, like every variant, against ONNX Runtime on
    the original file), or None with a note saying why not."""
    try:
        return load_module(src)
    except (Skip, KilnError) as e:
        why = e.message if isinstance(e, KilnError) else str(e)
        src.notes.append(f"onnx import: {why}")
        return None


def _toml_columns(src: ModelSource, inputs: list[TensorSpec]) -> dict[str, list[str]]:
    toml = src.path.parent / "kiln.toml" if src.path is not None else None
    return load_toml_columns(toml, inputs) if toml is not None and toml.is_file() else {}


def _declare_kinds(src: ModelSource, specs: list[TensorSpec], given: Sequence[str] | dict[str, str] | None) -> list[TensorSpec]:
    """Output kinds from kiln.toml's [[outputs]], overridden by --output NAME:KIND."""
    toml = src.path.parent / "kiln.toml" if src.path is not None else None
    kinds = load_toml_outputs(toml) if toml is not None and toml.is_file() else {}
    if isinstance(given, dict):
        kinds.update({n: parse_output_kind(f"{n}:{k}")[1] for n, k in given.items()})
    else:
        kinds.update(dict(parse_output_kind(t) for t in given or ()))
    names = [s.name for s in specs]
    unknown = [n for n in kinds if n not in names]
    if unknown:
        raise KilnError(f"output kind declared for {unknown}, but the model's outputs are {names}",
                        hint="use the output names kiln prints (dict keys, or output / output0, output1 ...)")
    return [replace(s, kind=kinds.get(s.name, s.kind)) for s in specs]


def _forward_arguments(module: torch.nn.Module) -> list[str]:
    import inspect

    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def write_repository(result: BuildResult, repo: Path, staged: Path, src: ModelSource, budget: Budget, device: str) -> None:
    """Stage 6: a new version folder with every accepted variant's files and kiln.json."""
    version, vdir = repository.new_version_dir(repo, result.name)
    for c in result.candidates:
        if c.status == "accepted":
            art = repository.add_artifact(vdir, c.variant, staged / repository.variant_dir(c.variant))
            c.artifact = {**art, "meta": c.artifact}
    result.version, result.path = version, vdir
    result.manifest = _manifest(result, src, budget, device)
    repository.write_manifest(vdir, result.manifest)


def write_report(result: BuildResult) -> Path:
    """Stage 7: report.html beside kiln.json."""
    from kiln.report import from_manifest, write_html

    assert result.path is not None
    out = result.path / "report.html"
    write_html(from_manifest(result.manifest), out)
    return out


def run_variant(variant: Variant, subject: Subject, staged: Path, verify: VerifyData,
                ref_out: list[list[np.ndarray]], budget: Budget, batch_sizes: list[int], dim_sizes: dict[str, int],
                prog: Reporter, keep: dict[str, Runner] | None = None, estimate: Estimate | None = None,
                settings: dict[str, Any] | None = None) -> Candidate:
    """Stage 4, for one variant: export into `staged`, load it back from its files, verify it, time it.
    `estimate`, when given, learns how long this variant took (for the time left that progress shows); `settings`
    reach the backend's export options (`objective`, `tvm_trials`)."""
    started = time.perf_counter()
    backend = registry.get(variant.backend)
    recipe = variant.recipe
    c = Candidate(variant.name, variant.backend, recipe.precision, list(recipe.passes))
    staged.mkdir(parents=True)
    before = len(subject.notes)
    steps = iter(("exporting", "loading the artifact back", "verifying", f"timing at batch {', '.join(map(str, batch_sizes))}"))
    try:
        prog.step(c.variant, next(steps))
        t0 = time.perf_counter()
        options = {**(settings or {}), "recipe": recipe.without("trim"), "calibration": verify.calibration,
                   "batch_sizes": batch_sizes, "dim_sizes": dim_sizes}
        meta = backend.export(subject, staged, options=options)
        c.export_s = time.perf_counter() - t0
        c.size_bytes = sum(f.stat().st_size for f in staged.rglob("*") if f.is_file())
        prog.step(c.variant, next(steps))
        cuda = subject.device.startswith("cuda")
        if cuda:  # what this variant holds and needs on the GPU: its weights, workspace and activations
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(subject.device)
            mem0 = torch.cuda.memory_allocated(subject.device)
        t0 = time.perf_counter()
        with PeakMemory("cpu", interval_s=0.02) as rss:  # CPU: RSS growth while loading and verifying (not timing)
            runner: Runner = backend.load(staged, meta, subject.inputs, subject.outputs, device=subject.device)
            if recipe.has("trim"):
                runner = trimming.wrap(runner)
            c.load_s = time.perf_counter() - t0
            c.artifact = meta
            prog.step(c.variant, next(steps))
            try:
                got = [[o.numpy(force=True) for o in runner.run(b)] for b in verify.batches]
            except Exception as e:
                raise KilnError(f"the artifact fails on verification inputs: {type(e).__name__}: {first_line(e)}") from None
        if not cuda:
            c.memory_mb = max(0.0, rss.peak_mb)
        checks = compare(subject.outputs, ref_out, got, verify.labels)
        c.accuracy = to_dict(checks)
        problems = judge(checks, budget.for_recipe(recipe.precision, lossy=recipe.prune() is not None))
        if problems and recipe.prune() is None:
            c.status, c.reason = "rejected", "; ".join(problems)
            return c
        prog.step(c.variant, next(steps))
        for b in batch_sizes:  # pruned variants are timed even when rejected: the report shows what pruning buys
            xs = timing_inputs(subject.inputs, b, verify, dim_sizes)
            if cuda:  # on a GPU the model is timed, not the PCIe link: inputs start on the device
                xs = [x.to(subject.device) for x in xs]
            c.timings.append(time_runner(runner, xs, batch=b))
        if cuda:
            c.peak_gpu_mb = (torch.cuda.max_memory_allocated(subject.device) - mem0) / 2**20
        c.status, c.reason = ("rejected", "; ".join(problems)) if problems else ("accepted", "")
        if keep is not None and c.status == "accepted":  # selection times the contenders again, side by side
            keep[c.variant] = runner
    except Skip as e:
        c.status, c.reason = "skipped", str(e)
    except KilnError as e:
        c.status, c.reason = "failed", e.message + (f" ({e.hint})" if e.hint else "")
    except Exception as e:  # an exporter's internal error must not end the whole build
        c.status, c.reason = "failed", f"{type(e).__name__}: {first_line(e)}"
    finally:
        c.notes = subject.notes[before:]
        del subject.notes[before:]
        for _ in steps:  # a variant that stopped early still counts its steps as done
            prog.step(c.variant, c.status)
    if estimate is not None:
        estimate.finished(time.perf_counter() - started)
        prog.eta(estimate.left_s())
    prog.outcome(c.variant, f"{c.status}{' - ' + c.reason if c.reason else ''}")
    return c


def _input_specs(src: ModelSource, given: Sequence[str | TensorSpec] | None) -> tuple[list[TensorSpec], str | None, dict[str, Any]]:
    toml = src.path.parent / "kiln.toml" if src.path is not None else None
    toml_name, toml_specs = load_toml_specs(toml) if toml is not None and toml.is_file() else (None, [])
    preprocess: dict[str, Any] = {}
    if toml is not None and toml.is_file():
        import tomllib

        from kiln.inputs import Preprocess

        preprocess = tomllib.loads(toml.read_text()).get("preprocess", {})
        Preprocess.from_dict(preprocess)  # refuse unknown settings now, not at predict time
    if given:
        specs = [s if isinstance(s, TensorSpec) else TensorSpec.parse(s) for s in given]
    else:
        specs = toml_specs
    dup = {s.name for s in specs if [t.name for t in specs].count(s.name) > 1}
    if dup:
        raise KilnError(f"input names repeat: {sorted(dup)}", hint="give each input once")
    return specs, toml_name, preprocess


def _default_name(src: ModelSource) -> str:
    if src.kind == "python":
        return (src.attr or "model").lower()
    return src.path.stem.replace(".", "-") if src.path else "model"


def _merge_onnx_inputs(graph: list[TensorSpec], given: list[TensorSpec]) -> list[TensorSpec]:
    if not given:
        return graph
    if sorted(s.name for s in given) != sorted(s.name for s in graph):
        raise KilnError(f"--input names {[s.name for s in given]} do not match the ONNX graph's {[s.name for s in graph]}",
                        hint="leave --input out to use the graph's own signature")
    return given


def _eager_reference(module: torch.nn.Module, device: str = "cpu") -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """fp32 eager on the build's device (on CUDA with TF32 off: fp32 means fp32); the module itself stays on the CPU."""
    flat = FlatModel(module).eval()
    if device.startswith("cuda"):
        from kiln.backends import cuda

        cuda.configure(device)
        flat = copy.deepcopy(flat).to(device)

    def run(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(flat(*(x.to(device) for x in xs)))

    return run


def _onnx_reference(sess: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    def run(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        res = sess.run([o.name for o in outputs], {s.name: x.numpy() for s, x in zip(inputs, xs)})
        return [torch.from_numpy(np.asarray(r)) for r in res]

    return run


def _manifest(r: BuildResult, src: ModelSource, budget: Budget, device: str) -> dict[str, Any]:
    return {
        "format": repository.FORMAT,
        "name": r.name,
        "version": r.version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": src.to_dict(),
        "inputs": [s.to_dict() for s in r.inputs],
        "outputs": [s.to_dict() for s in r.outputs],
        "output_structure": "dict" if r.dict_outputs else "sequence",
        "selected": r.selected,
        "objective": r.objective,
        "batch_sizes": r.batch_sizes,
        "dim_sizes": r.dim_sizes,
        "verification": {"data": r.verification, "synthetic": r.synthetic, "budget": asdict(budget)},
        "selection": r.selection,
        "candidates": [c.to_dict() for c in r.candidates],
        "notes": r.notes,
        "preprocess": r.preprocess,
        "columns": r.columns,
        "libraries": library_versions(),
        "device": device_info(device),
    }


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"kiln": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("numpy", "onnx", "onnxruntime", "onnxscript", "safetensors", "openvino", "nncf", "executorch", "apache-tvm", "onnx2torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device, "machine": platform.machine(), "cpu": _cpu_name(),
                            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"



@contextlib.contextmanager
def _exporters_quiet() -> Iterator[None]:
    """Exporters warn and log pages of internals; during a build kiln reports what matters itself. Scoped: the
    warning filters and these loggers' levels are restored on the way out, and stdout/stderr are left alone
    (exporters that print are quieted where they are called)."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch._dynamo", "torch._inductor", "torch.onnx", "onnxscript", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
