"""torch.export with dynamic dims, compiled ahead of time by AOTInductor into a .pt2 package."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from kiln.backends.common import (
    Subject,
    Target,
    check_device,
    data_dependent,
    exportable_module,
    first_line,
    flatten_outputs,
    module_runner,
    recipe_of,
    torch_dynamic_shapes,
)
from kiln.errors import KilnError, Skip
from kiln.recipe import Recipe
from kiln.runner import Runner
from kiln.signature import FlatModel
from kiln.spec import TensorSpec
from kiln.transforms import apply

NAME = "aoti"
RANK = 30
FILE = "model.aoti.pt2"


def variants(t: Target) -> list[Recipe]:
    out = [Recipe("fp32", t.fold)] + [Recipe(h, (*t.fold, *t.channels_last)) for h in t.halves]
    if not t.cuda and t.transformable:
        out.append(Recipe("int8-static"))
    return out


def export(subject: Subject, directory: Path, *, options: dict[str, Any]) -> dict[str, Any]:
    module = exportable_module(subject, NAME)
    check_device(subject.device)
    recipe = recipe_of(options)
    if recipe.has("cudagraphs"):
        raise Skip("AOTInductor packages run without kiln's CUDA graphs; use compile or eager with +cudagraphs")
    configs: dict[str, Any] = {}
    if recipe.precision == "int8-static":
        if subject.device != "cpu":
            raise Skip("PT2E static int8 with the x86 Inductor quantizer targets CPUs")
        from kiln.transforms.torch_int8 import static

        base = apply(module, Recipe("fp32", recipe.passes), subject.notes)
        examples = tuple(subject.examples)
        ep = static(FlatModel(base).eval(), examples, torch_dynamic_shapes(subject.inputs), options.get("calibration"))
        configs["freezing"] = True  # lets Inductor fuse the int8 patterns into oneDNN quantized kernels
    else:
        module = apply(module, recipe, subject.notes)  # a copy: the other backends still need the CPU module
        ep = export_program(FlatModel(module).eval(), subject)
    torch._inductor.aoti_compile_and_package(ep, package_path=str(directory / FILE), inductor_configs=configs)
    probe_load(directory / FILE, subject.device)
    return {"file": FILE, "device": subject.device.split(":")[0], "torch": torch.__version__.split("+")[0],
            "recipe": recipe.tag}


_PROBED: set[str] = set()  # device kinds whose packages this process has seen load in a child process


def probe_load(path: Path, device: str) -> None:
    """Load the package in a child process first: on some torch/machine combinations loading a package segfaults
    (seen with torch 2.11+cu130 on H200 hosts, for CUDA packages and for plain CPU ones, without kiln involved),
    which would take the build down with it. The crash belongs to the torch build and the machine, not to one
    package, so one clean probe per device kind and process is enough (each probe costs a Python start with torch,
    about 5 s)."""
    kind = device.split(":")[0]
    if kind in _PROBED:
        return
    index = (int(device.split(":")[1]) if ":" in device else 0) if device.startswith("cuda") else -1
    code = f"import torch; torch._inductor.aoti_load_package({str(path)!r}, device_index={index})"
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise KilnError("loading the AOTInductor package hung for 10 minutes in a test process",
                        hint="rely on the other variants") from None
    if p.returncode != 0:
        how = f"signal {signal.Signals(-p.returncode).name}" if p.returncode < 0 else f"exit code {p.returncode}"
        tail = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-1:] or [""]
        raise KilnError(f"the AOTInductor package crashed on load in a test process ({how}) with torch "
                        f"{torch.__version__} on {device} {tail[0][:200]}".rstrip(),
                        hint="a torch/driver problem; rely on the other variants or try another torch release")
    _PROBED.add(kind)


def export_program(flat: torch.nn.Module, subject: Subject) -> torch.export.ExportedProgram:
    """torch.export with named dynamic dims; on a range conflict retry letting export infer ranges."""
    examples = tuple(x.to(subject.device) for x in subject.examples)
    flat = flat.to(subject.device)
    try:
        return torch.export.export(flat, examples, dynamic_shapes=torch_dynamic_shapes(subject.inputs), strict=False)
    except Exception as first:
        if data_dependent(first):
            raise KilnError("torch.export hit data-dependent control flow (an `if` on tensor values)",
                            hint="rewrite the branch with torch.cond, or rely on the torchscript/compile variants") from None
        try:
            ep = torch.export.export(flat, examples, dynamic_shapes=torch_dynamic_shapes(subject.inputs, auto=True), strict=False)
        except Exception as e:
            raise KilnError(f"torch.export failed: {type(e).__name__}: {first_line(e)}",
                            hint="see https://pytorch.org/docs/stable/export.html for supported constructs") from None
        subject.notes.append(f"torch.export: named dims conflicted ({first_line(first)}); used inferred ranges")
        return ep


def compatible(meta: dict[str, Any]) -> str | None:
    built = meta.get("torch", "")
    here = torch.__version__.split("+")[0]
    if built.split(".")[:2] != here.split(".")[:2]:
        return f"AOTInductor package built with torch {built}, this is torch {here}"
    return None


def load(directory: Path, meta: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec],
         *, device: str = "cpu", threads: int | None = None) -> Runner:
    check_device(device)
    if meta.get("device", "cpu") != device.split(":")[0]:
        raise KilnError(f"this AOTInductor package was compiled for {meta.get('device')}, not {device}",
                        hint=f"rebuild with --device {device}")
    index = int(device.split(":")[1]) if ":" in device else -1
    compiled = torch._inductor.aoti_load_package(str(directory / meta["file"]), device_index=index) if index >= 0 \
        else torch._inductor.aoti_load_package(str(directory / meta["file"]))

    def call(*xs: torch.Tensor) -> list[torch.Tensor]:
        return flatten_outputs(compiled(*xs))

    return module_runner(call, f"{NAME}/{meta.get('recipe', 'fp32')}", inputs, outputs, device)
