"""torch.export with dynamic dims, compiled ahead of time by AOTInductor into a .pt2 package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kiln.backends.common import Skip, Subject, check_device, first_line, flatten_outputs, require_module, torch_dynamic_shapes
from kiln.errors import KilnError
from kiln.runner import Runner
from kiln.signature import FlatModel
from kiln.spec import TensorSpec

NAME = "aoti"
FILE = "model.aoti.pt2"


def export(subject: Subject, directory: Path, *, options: dict[str, Any]) -> dict[str, Any]:
    module = require_module(subject, NAME)
    if isinstance(module, torch.jit.ScriptModule):
        raise Skip("torch.export cannot export a TorchScript module; give the Python source instead")
    check_device(subject.device)
    ep = export_program(FlatModel(module).eval(), subject)
    torch._inductor.aoti_compile_and_package(ep, package_path=str(directory / FILE))
    return {"file": FILE, "device": subject.device.split(":")[0], "torch": torch.__version__.split("+")[0]}


def export_program(flat: torch.nn.Module, subject: Subject) -> torch.export.ExportedProgram:
    """torch.export with named dynamic dims; on a range conflict retry letting export infer ranges."""
    examples = tuple(x.to(subject.device) for x in subject.examples)
    flat = flat.to(subject.device)
    try:
        return torch.export.export(flat, examples, dynamic_shapes=torch_dynamic_shapes(subject.inputs), strict=False)
    except Exception as first:
        if _data_dependent(first):
            raise KilnError("torch.export hit data-dependent control flow (an `if` on tensor values)",
                            hint="rewrite the branch with torch.cond, or rely on the torchscript/compile variants") from None
        try:
            ep = torch.export.export(flat, examples, dynamic_shapes=torch_dynamic_shapes(subject.inputs, auto=True), strict=False)
        except Exception as e:
            raise KilnError(f"torch.export failed: {type(e).__name__}: {first_line(e)}",
                            hint="see https://pytorch.org/docs/stable/export.html for supported constructs") from None
        subject.notes.append(f"torch.export: named dims conflicted ({first_line(first)}); used inferred ranges")
        return ep


def _data_dependent(e: Exception) -> bool:
    text = f"{type(e).__name__} {e}"
    return any(k in text for k in ("GuardOnDataDependentSymNode", "data-dependent", "data dependent", "UserError: Dynamic control flow"))



def compatible(meta: dict[str, Any]) -> str | None:
    built = meta.get("torch", "")
    here = torch.__version__.split("+")[0]
    if built.split(".")[:2] != here.split(".")[:2]:
        return f"AOTInductor package built with torch {built}, this is torch {here}"
    return None


def load(directory: Path, meta: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec],
         *, device: str = "cpu") -> Runner:
    check_device(device)
    if meta.get("device", "cpu") != device.split(":")[0]:
        raise KilnError(f"this AOTInductor package was compiled for {meta.get('device')}, not {device}",
                        hint=f"rebuild with --device {device}")
    index = int(device.split(":")[1]) if ":" in device else -1
    compiled = torch._inductor.aoti_load_package(str(directory / meta["file"]), device_index=index) if index >= 0 \
        else torch._inductor.aoti_load_package(str(directory / meta["file"]))

    def fn(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return flatten_outputs(compiled(*(x.to(device, non_blocking=True) for x in xs)))

    return Runner(f"{NAME}/fp32", inputs, outputs, fn, device)
