"""kiln build: try every variant that can run here, verify each against fp32 eager, keep the fastest."""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import logging
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from kiln import __version__, backends, repository
from kiln.backends.common import Skip, Subject, first_line
from kiln.bench.timing import Timing, time_runner
from kiln.data import VerifyData, batch_dim, timing_inputs, verification_data
from kiln.errors import KilnError
from kiln.plan import Variant, plan, probe_low_precision
from kiln.progress import Reporter, Silent
from kiln.runner import Runner
from kiln.signature import FlatModel, discover_outputs, example_inputs
from kiln.source import ModelSource, load_module
from kiln.spec import TensorSpec, load_toml_specs
from kiln.verify import Budget, compare, judge, to_dict

Objective = Literal["latency", "throughput"]
_STEPS = 4  # per variant: export, load, verify, time
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

    def candidate(self, variant: str) -> Candidate:
        return next(c for c in self.candidates if c.variant == variant)


def build(source: str, *, weights: str | Path | None = None, inputs: Sequence[str | TensorSpec] | None = None,
          name: str | None = None, repo: str | Path = "models", data: str | Path | None = None,
          budget: Budget | None = None, batch_sizes: Sequence[int] = (1, 32), objective: Objective = "latency",
          backend_names: Sequence[str] | None = None, device: str = "cpu", dim_sizes: dict[str, int] | None = None,
          progress: Reporter | None = None, report: bool = True, precision: str = "auto",
          calib: str | Path | None = None, prune: float | None = None,
          variants: Sequence[str] | None = None) -> BuildResult:
    """Build, verify and select; write repo/<name>/<version>/ and return what happened.

    >>> result = kiln.build("examples/digits/model.py:DigitsNet", weights="examples/digits/digits.safetensors",
    ...                     data="examples/digits/test.npz", repo="models")
    >>> result.selected
    'onnxruntime/fp32'

    `precision` bounds the search (fp32, fp16, bf16, int8 or auto), `prune` adds pruned variants (a fraction),
    `variants` keeps only variants matching these glob patterns (e.g. ["compile/fp16*", "eager/fp32*"]).
    """
    prog = progress or Silent()
    budget = budget or Budget()
    if objective not in ("latency", "throughput"):
        raise KilnError(f"unknown objective {objective!r}", hint="use latency or throughput")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise KilnError(f"bad batch sizes {list(batch_sizes)}", hint="give positive sizes, e.g. --batch 1,32")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KilnError(f"--device {device} but this machine has no CUDA GPU", hint="build with --device cpu, or on a GPU machine")
    names = list(backend_names or backends.ORDER)
    for n in names:
        backends.get(n)
    src = ModelSource.parse(source, weights=weights)
    in_specs, toml_name, preprocess = _input_specs(src, inputs)
    name = repository.check_name(name or toml_name or _default_name(src))
    with _quiet():
        module = load_module(src) if src.kind != "onnx" else None
        if module is not None:
            if not in_specs:
                raise KilnError(f"no input spec for {src.text}",
                                hint="give --input NAME:DTYPE[DIMS] (e.g. image:float32[batch,1,8,8]) or a kiln.toml beside the model")
            out_specs = discover_outputs(module, in_specs)
            reference: Callable[[list[torch.Tensor]], list[torch.Tensor]] = _eager_reference(module, device)
        else:
            from kiln.backends import onnxruntime as ortb

            graph_in, out_specs = ortb.signature(src.path)  # type: ignore[arg-type]
            in_specs = _merge_onnx_inputs(graph_in, in_specs)
            sess = ortb.session(src.path)  # type: ignore[arg-type]
            reference = _onnx_reference(sess, in_specs, out_specs)
        todo = plan(names, precision=precision, device=device, module=module, prune=prune, patterns=variants,
                    transformable=src.kind == "python")
        int8_static = any(v.recipe.precision == "int8-static" for v in todo)
        verify = verification_data(in_specs, Path(data) if data else None, calib=Path(calib) if calib else None,
                                   hold_out=int8_static)
        sizes = sorted(set(batch_sizes)) if batch_dim(in_specs) else [1]
        left_out: dict[str, str] = {}
        if module is not None and device == "cpu" and precision == "auto" and any(v.recipe.dtype for v in todo):
            left_out = probe_low_precision(module, timing_inputs(in_specs, sizes[-1], verify, dim_sizes or {}))
        prog.start(sum(v.recipe.precision not in left_out for v in todo) * _STEPS)
        prog.note(f"verifying against fp32 {'eager' if module is not None else 'onnxruntime'} on {verify.description}")
        ref_out = [[o.numpy(force=True) for o in reference(b)] for b in verify.batches]
        subject = Subject(src, module, in_specs, out_specs, example_inputs(in_specs), device)
        with tempfile.TemporaryDirectory(prefix="kiln-build-") as tmp:
            candidates = [
                Candidate(v.name, v.backend, v.recipe.precision, list(v.recipe.passes), "skipped", left_out[v.recipe.precision])
                if v.recipe.precision in left_out else
                _try_variant(v, subject, Path(tmp) / repository.variant_dir(v.name), verify, ref_out, budget, sizes,
                             dim_sizes or {}, prog)
                for v in todo
            ]
            accepted = [c for c in candidates if c.status == "accepted"]
            selected = _select(accepted, objective, sizes)
            result = BuildResult(name, None, None, selected.variant if selected else None, objective, candidates,
                                 in_specs, out_specs, verify.description, sizes, src.notes + subject.notes)
            result.preprocess = preprocess
            if selected is None:
                prog.close()
                return result
            version, vdir = repository.new_version_dir(Path(repo), name)
            for c in accepted:
                art = repository.add_artifact(vdir, c.variant, Path(tmp) / repository.variant_dir(c.variant))
                c.artifact = {**art, "meta": c.artifact}
        result.version, result.path = version, vdir
        result.manifest = _manifest(result, src, budget, device)
        repository.write_manifest(vdir, result.manifest)
        if report:
            from kiln.report import from_manifest, write_html

            write_html(from_manifest(result.manifest), vdir / "report.html")
    prog.close()
    return result


def _try_variant(variant: Variant, subject: Subject, staged: Path, verify: VerifyData,
                 ref_out: list[list[np.ndarray]], budget: Budget, batch_sizes: list[int], dim_sizes: dict[str, int],
                 prog: Reporter) -> Candidate:
    backend = backends.get(variant.backend)
    recipe = variant.recipe
    c = Candidate(variant.name, variant.backend, recipe.precision, list(recipe.passes))
    staged.mkdir(parents=True)
    before = len(subject.notes)
    steps = iter(("exporting", "loading the artifact back", "verifying", f"timing at batch {', '.join(map(str, batch_sizes))}"))
    try:
        prog.step(c.variant, next(steps))
        t0 = time.perf_counter()
        options = {"recipe": recipe, "calibration": verify.calibration, "batch_sizes": batch_sizes, "dim_sizes": dim_sizes}
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
        runner: Runner = backend.load(staged, meta, subject.inputs, subject.outputs, device=subject.device)
        c.load_s = time.perf_counter() - t0
        c.artifact = meta
        prog.step(c.variant, next(steps))
        try:
            got = [[o.numpy(force=True) for o in runner.run(b)] for b in verify.batches]
        except Exception as e:
            raise KilnError(f"the artifact fails on verification inputs: {type(e).__name__}: {first_line(e)}") from None
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
    prog.note(f"{c.variant}: {c.status}{' - ' + c.reason if c.reason else ''}")
    return c


def _select(accepted: list[Candidate], objective: Objective, sizes: list[int]) -> Candidate | None:
    if not accepted:
        return None
    if objective == "latency":
        return min(accepted, key=lambda c: c.timing(sizes[0]).p50_ms)  # type: ignore[union-attr]
    return max(accepted, key=lambda c: c.timing(sizes[-1]).items_per_s)  # type: ignore[union-attr]


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
    return src.path.stem.replace(".", "-") if src.path else "model"  # type: ignore[union-attr]


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
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": src.to_dict(),
        "inputs": [s.to_dict() for s in r.inputs],
        "outputs": [s.to_dict() for s in r.outputs],
        "selected": r.selected,
        "objective": r.objective,
        "batch_sizes": r.batch_sizes,
        "verification": {"data": r.verification, "budget": asdict(budget)},
        "candidates": [c.to_dict() for c in r.candidates],
        "notes": r.notes,
        "preprocess": r.preprocess,
        "libraries": library_versions(),
        "device": device_info(device),
    }


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"kiln": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("numpy", "onnx", "onnxruntime", "onnxscript", "safetensors"):
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
def _quiet() -> Iterator[None]:
    """Exporters print pages of warnings and progress; the build reports what matters itself."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch._dynamo", "torch._inductor", "torch.onnx", "onnxscript", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, lvl in zip(loggers, levels):
                lg.setLevel(lvl)
