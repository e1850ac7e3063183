"""Helpers the backends share: what is exported, how a backend says 'not here', dynamic shapes."""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.source import ModelSource, load_module
from kiln.spec import TensorSpec
from kiln.transforms import Recipe


class Skip(Exception):
    """A variant that cannot run here (missing package, no GPU, unsupported source): never faked."""


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


def require_module(subject: Subject, backend: str) -> nn.Module:
    if subject.module is None:
        raise Skip(f"{backend} needs a PyTorch model; an {subject.source.kind} source runs only on onnxruntime")
    return subject.module


def recipe_of(options: dict[str, Any]) -> Recipe:
    """The variant's recipe from export options (fp32, no passes, when none is given)."""
    return options.get("recipe") or Recipe()


def torch_dynamic_shapes(specs: list[TensorSpec], *, auto: bool = False) -> tuple[tuple[dict[int, Any], ...]]:
    """torch.export dynamic_shapes for FlatModel's `*args`; dims sharing a name share one Dim."""
    dims: dict[str, Any] = {}
    out = []
    for s in specs:
        d = {}
        for i, name in s.dynamic_dims.items():
            d[i] = torch.export.Dim.AUTO if auto else dims.setdefault(name, torch.export.Dim(name, min=1))
        out.append(d)
    # FlatModel.forward takes *args: export sees one positional argument, the tuple of inputs.
    return (tuple(out),)


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
        return [v for v in out.values()]
    return [t for t in out]


def save_python_source(subject: Subject, directory: Path) -> dict[str, Any]:
    """Eager and compile artifacts: a copy of the model code plus its weights as safetensors."""
    from safetensors.torch import save_model

    src = subject.source
    module = require_module(subject, "this backend")
    meta: dict[str, Any] = {"source_kind": src.kind}
    if src.kind == "python":
        if src.path is not None:
            shutil.copyfile(src.path, directory / "model_source.py")
            meta.update(file="model_source.py", source_dir=str(src.path.parent), attr=src.attr)
        else:
            meta.update(module=src.module, attr=src.attr)
        save_model(module, str(directory / "weights.safetensors"))
    elif src.kind in ("torchscript", "exported"):
        name = "model.pt" if src.kind == "torchscript" else "model.pt2"
        shutil.copyfile(src.path, directory / name)  # type: ignore[arg-type]
        meta.update(file=name)
    return meta


def rebuild_module(directory: Path, meta: dict[str, Any]) -> nn.Module:
    """Inverse of save_python_source."""
    kind = meta["source_kind"]
    if kind == "python":
        if "file" in meta:
            src = ModelSource("python", meta["attr"], path=directory / meta["file"], attr=meta["attr"],
                              weights=directory / "weights.safetensors")
            # The model file may import modules that sat beside the original.
            extra = meta.get("source_dir")
            if extra and extra not in sys.path:
                sys.path.append(extra)
        else:
            src = ModelSource("python", meta["module"], module=meta["module"], attr=meta["attr"],
                              weights=directory / "weights.safetensors")
        return load_module(src)
    src = ModelSource(kind, meta["file"], path=directory / meta["file"])
    return load_module(src)


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Skip("no CUDA GPU on this machine")
    if not (device == "cpu" or device.startswith("cuda")):
        raise KilnError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N")
