"""What the backends share: the plug-in contract's types, the torch Runner factory, self-contained code artifacts.

A backend is one module under `kiln/backends/` (or a `kiln.backends` entry point) with:

- `NAME` and `RANK` (its place in the variants table),
- `variants(target: Target) -> list[Recipe]`: what it can build for this model, device and precision,
- `export(subject: Subject, directory: Path, *, options: dict) -> dict` (the artifact's meta),
- `load(directory: Path, meta: dict, inputs, outputs, *, device: str, threads: int | None) -> Runner`; a backend
  whose runtime owns a busy-waiting thread pool also takes `spin: bool` (False: idle threads sleep, for servers),
- optionally `compatible(meta) -> str | None` (why an artifact cannot load with the libraries here).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.errors import KilnError, Skip
from kiln.recipe import Recipe
from kiln.runner import Runner
from kiln.source import ModelSource, load_module
from kiln.spec import TensorSpec

CODE_DIR = "code"


@dataclass
class Subject:
    """What a backend exports: the source, its eager module (None for ONNX sources) and signature."""

    source: ModelSource
    module: nn.Module | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    examples: list[torch.Tensor]
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    exports: dict[str, Any] = field(default_factory=dict)
    """What one variant exported that another of the same build starts from, by key: the ONNX export of a recipe
    behind ONNX Runtime's fp32 and int8 variants and OpenVINO's (kiln.backends.onnxruntime.write_onnx)."""


@dataclass(frozen=True)
class Target:
    """What the planner knows when it asks a backend which variants it can build.

    `halves` are the float precisions worth trying here (on a CPU only those an eager probe found faster);
    `prune` is the --prune fraction; `transformable` is False for sources that are exported as they are
    (TorchScript, .pt2, ONNX)."""

    device: str = "cpu"
    source_kind: str = "python"
    batchnorm: int = 0
    conv: int = 0
    linear: int = 0
    gelu_ffn: int = 0
    self_attention: int = 0
    conv_relu: int = 0  # counted on CUDA only (it traces the model): kiln.transforms.convfuse.count
    halves: tuple[str, ...] = ()
    prune: float | None = None
    transformable: bool = True

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def fold(self) -> tuple[str, ...]:
        """The bnfold pass where the model has BatchNorm to fold."""
        return ("bnfold",) if self.batchnorm and self.transformable else ()

    @property
    def fused(self) -> tuple[str, ...]:
        """On CUDA, the passes that fuse kernels where the model has the layers for them: a transformer's
        feed-forward Linear + GELU as one GEMM (epilogue), then Q, K and V as one (qkv); a CNN's convolution +
        [residual +] ReLU as one cuDNN call (convfuse)."""
        if not (self.cuda and self.transformable):
            return ()
        if self.gelu_ffn:
            return ("epilogue", "qkv") if self.self_attention else ("epilogue",)
        return ("convfuse",) if self.conv_relu else ()

    @property
    def channels_last(self) -> tuple[str, ...]:
        return ("channels_last",) if self.conv and self.transformable else ()

    def pruned(self, *base: str) -> list[Recipe]:
        """Magnitude and structured pruning after `base` passes, when --prune was given."""
        if self.prune is None or not self.transformable:
            return []
        pct = round(self.prune * 100)
        return [Recipe("fp32", (*base, f"prune{pct}")), Recipe("fp32", (*base, f"chprune{pct}"))]


def require_module(subject: Subject, backend: str) -> nn.Module:
    if subject.module is None:
        why = next((n for n in reversed(subject.source.notes) if n.startswith("onnx import:")), "")
        raise Skip(f"{backend} needs a PyTorch model; this {subject.source.kind} source has none"
                   + (f" ({why.removeprefix('onnx import: ')})" if why else ""))
    return subject.module


def exportable_module(subject: Subject, backend: str) -> nn.Module:
    """The Python model for a backend that goes through torch.export (AOTInductor, ExecuTorch, TVM)."""
    module = require_module(subject, backend)
    if isinstance(module, torch.jit.ScriptModule):
        raise Skip("torch.export cannot export a TorchScript module; give the Python source instead")
    return module


def recipe_of(options: dict[str, Any]) -> Recipe:
    """The variant's recipe from export options (fp32, no passes, when none is given)."""
    recipe: Recipe = options.get("recipe") or Recipe()
    return recipe


def torch_dynamic_shapes(specs: list[TensorSpec], *, auto: bool = False,
                         bounds: dict[str, int] | None = None) -> tuple[tuple[dict[int, Any], ...]]:
    """torch.export dynamic_shapes for FlatModel's `*args`; dims sharing a name share one Dim, bounded above by
    `bounds[name]` where given (ExecuTorch plans memory for the largest shape), else by the spec's own limit
    (`seq<=512`: without it, export refuses a model that indexes a position table with the dim)."""
    dims: dict[str, Any] = {}
    top = {**{n: m for s in specs for n, m in s.dim_max}, **(bounds or {})}
    out = []
    for s in specs:
        d = {}
        for i, name in s.dynamic_dims.items():
            d[i] = torch.export.Dim.AUTO if auto else dims.setdefault(name, torch.export.Dim(name, min=1, max=top.get(name)))
        out.append(d)
    # FlatModel.forward takes *args: export sees one positional argument, the tuple of inputs.
    return (tuple(out),)


def data_dependent(e: BaseException) -> bool:
    """Whether an exporter failed on control flow or shapes that depend on tensor values."""
    text = f"{type(e).__name__} {e}"
    return any(k in text for k in ("GuardOnDataDependentSymNode", "data-dependent", "data dependent",
                                   "UserError: Dynamic control flow"))


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Silence a runtime's Python-side chatter: these loggers below ERROR, and stdout/stderr."""
    found = [logging.getLogger(n) for n in loggers]
    levels = [lg.level for lg in found]
    for lg in found:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(found, levels):
            lg.setLevel(level)


def cpu_only(device: str, runtime: str) -> None:
    """The optional runtimes kiln drives on CPUs only (OpenVINO, ExecuTorch, TVM)."""
    check_device(device)
    if device != "cpu":
        raise Skip(f"kiln runs {runtime} on the CPU; build with --device cpu")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception (its root cause, where exporters wrap one), without colour codes."""
    while e.__cause__ is not None and not isinstance(e, KilnError):
        e = e.__cause__
    lines = [ln for ln in _ANSI.sub("", str(e)).strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return list(out.values())
    return list(out)


def module_runner(call: Callable[..., Sequence[torch.Tensor]], variant: str, inputs: list[TensorSpec],
                  outputs: list[TensorSpec], device: str, *, graphs: Sequence[int] | None = None,
                  grad: Callable[[], Any] = torch.inference_mode) -> Runner:
    """The Runner of every torch backend: `call(*tensors) -> tensors`, on CUDA through kiln.backends.cuda.

    >>> runner = module_runner(FlatModel(model), "eager/fp32", inputs, outputs, "cpu")
    """

    def run(xs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        with grad():
            return call(*xs)

    if device.startswith("cuda"):
        from kiln.backends import cuda

        return Runner(variant, inputs, outputs, cuda.wrap(run, device, graphs=graphs), device)
    return Runner(variant, inputs, outputs, run, device)


def save_python_source(subject: Subject, directory: Path) -> dict[str, Any]:
    """Eager and compile artifacts: the model's code (its file and every file it imported from its own folder,
    under code/) plus its weights as safetensors. Loading reads only these copies."""
    from safetensors.torch import save_model

    src = subject.source
    module = require_module(subject, "this backend")
    if not src.rebuildable:
        raise Skip(f"{src.text} cannot be rebuilt from code (see the note); give a file.py:factory source for this variant")
    meta: dict[str, Any] = {"source_kind": src.kind}
    if src.kind == "python":
        if src.path is not None:
            folder = src.path.parent
            for rel in src.local_files:
                dest = directory / CODE_DIR / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / rel, dest)
            meta.update(file=f"{CODE_DIR}/{src.path.name}", attr=src.attr,
                        code=[f"{CODE_DIR}/{rel}" for rel in src.local_files])
        else:
            meta.update(module=src.module, attr=src.attr)
        save_model(module, str(directory / "weights.safetensors"))
    elif src.kind in ("torchscript", "exported", "onnx"):  # an ONNX source is converted again at load (onnx2torch)
        name = {"torchscript": "model.pt", "exported": "model.pt2", "onnx": "model.onnx"}[src.kind]
        assert src.path is not None
        shutil.copyfile(src.path, directory / name)
        meta.update(file=name)
    return meta


def rebuild_module(directory: Path, meta: dict[str, Any]) -> nn.Module:
    """Inverse of save_python_source: the model from the artifact's own copies, never from the build machine."""
    kind = meta["source_kind"]
    if kind == "python":
        weights = directory / "weights.safetensors"
        if "file" in meta:
            path = directory / meta["file"]
            src = ModelSource("python", meta["attr"], path=path, attr=meta["attr"], weights=weights, from_artifact=True)
        else:
            src = ModelSource("python", meta["module"], module=meta["module"], attr=meta["attr"], weights=weights)
        return load_module(src)
    return load_module(ModelSource(kind, meta["file"], path=directory / meta["file"]))


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Skip("no CUDA GPU on this machine")
    if not (device == "cpu" or device.startswith("cuda")):
        raise KilnError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N")
