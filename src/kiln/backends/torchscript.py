"""TorchScript: trace, with a check for baked-in control flow that falls back to script."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from kiln.backends.common import (
    Subject,
    Target,
    check_device,
    first_line,
    flatten_outputs,
    module_runner,
    recipe_of,
    require_module,
)
from kiln.errors import KilnError, Skip
from kiln.recipe import Recipe
from kiln.runner import Runner
from kiln.signature import FlatModel, example_inputs
from kiln.source import load_torchscript
from kiln.spec import TensorSpec
from kiln.transforms import apply

NAME = "torchscript"
RANK = 20


def variants(t: Target) -> list[Recipe]:
    return [Recipe("fp32")]
FILE = "model.ts.pt"


def export(subject: Subject, directory: Path, *, options: dict[str, Any]) -> dict[str, Any]:
    module = require_module(subject, NAME)
    recipe = recipe_of(options)
    if recipe.has("cudagraphs") or recipe.precision.startswith("int8"):
        raise Skip(f"kiln does not build TorchScript variants with {recipe.tag}")
    meta: dict[str, Any] = {"file": FILE, "recipe": recipe.tag}
    if isinstance(module, torch.jit.ScriptModule):
        if recipe.tag != "fp32":
            raise Skip("a TorchScript source is exported as it is (fp32)")
        scripted: torch.jit.ScriptModule = module
        meta["method"] = "source"
    else:
        scripted, method, notes = _trace_or_script(apply(module, recipe, subject.notes), subject)
        meta["method"] = method
        subject.notes.extend(notes)
    try:
        scripted = torch.jit.freeze(scripted.eval())
    except Exception as e:  # freezing is an optimisation; some modules (e.g. with hooks) refuse it
        subject.notes.append(f"torchscript: not frozen ({type(e).__name__})")
    torch.jit.save(scripted, str(directory / FILE))
    return meta


def _trace_or_script(module: torch.nn.Module, subject: Subject) -> tuple[torch.jit.ScriptModule, str, list[str]]:
    """Trace; if the tracer warns or disagrees with eager on other inputs, script instead.

    A warning about converting a tensor to a Python boolean means an `if` on tensor values: such a trace
    is never used. Other tracer warnings (iterating over a tensor, shapes turned into ints) are kept only
    if scripting fails and the trace agrees with eager on inputs of other shapes and values.
    """
    flat = FlatModel(module).eval()
    trace_error = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        with torch.no_grad():
            try:
                traced = torch.jit.trace(flat, tuple(subject.examples), check_trace=False)
            except Exception as e:
                traced, trace_error = None, first_line(e)
    tracer = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    control_flow = any("Python boolean" in w for w in tracer)
    disagrees = disagreement(traced, flat, subject.inputs) if traced is not None else None
    if traced is not None and not tracer and not disagrees:
        return traced, "trace", []
    problem = (f"trace failed ({trace_error})" if traced is None else f"tracer warned: {tracer[0]}" if tracer
               else f"trace disagrees with eager: {disagrees}")
    try:
        scripted = torch.jit.script(module)
    except Exception as e:
        if traced is not None and not control_flow and not disagrees:
            return traced, "trace", [f"torchscript: {problem}; torch.jit.script failed, and the trace agrees with "
                                     "eager on inputs of other shapes and values, so kiln kept the trace"]
        raise KilnError(f"{problem}; torch.jit.script also failed: {first_line(e)}",
                        hint="make forward() scriptable, or rely on the other backends") from None
    still = disagreement(scripted, flat, subject.inputs)
    if still:
        raise KilnError(f"{problem}; the scripted model also disagrees with eager: {still}",
                        hint="rely on the other backends") from None
    return scripted, "script", [f"torchscript: {problem}; the trace may bake in one branch, so kiln used torch.jit.script"]


def disagreement(candidate: Any, flat: torch.nn.Module, inputs: list[TensorSpec]) -> str | None:
    """Compare with eager on input sizes and values the export never saw."""
    for scale, seed in ((1, 11), (2, 12), (3, 13), (4, 14), (0, 15), (1, 16)):
        xs = example_inputs(inputs, scale=scale, seed=seed)
        with torch.no_grad():
            ref = flatten_outputs(flat(*xs))
            try:
                got = flatten_outputs(candidate(*xs))
            except Exception as e:
                return f"fails on other input sizes ({type(e).__name__})"
        if len(ref) != len(got):
            return "returns a different number of outputs"
        for r, g in zip(ref, got):
            if r.shape != g.shape:
                return f"output shape {tuple(g.shape)} differs from eager {tuple(r.shape)}"
            if r.is_floating_point():
                tol = 1e-4 * max(float(r.abs().max()), 1.0)
                if not torch.allclose(r, g, rtol=1e-3, atol=tol, equal_nan=True):
                    return f"outputs differ from eager by {float((r - g).abs().max()):.3g} on other inputs"
            elif not torch.equal(r, g):
                return "integer outputs differ from eager on other inputs"
    return None


def load(directory: Path, meta: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec],
         *, device: str = "cpu", threads: int | None = None) -> Runner:
    check_device(device)
    module = load_torchscript(directory / meta["file"], map_location=device)

    def call(*xs: torch.Tensor) -> list[torch.Tensor]:
        return flatten_outputs(module(*xs))

    # no_grad, not inference_mode: a TorchScript module warmed in grad mode breaks under inference_mode.
    runner = module_runner(call, f"{NAME}/{meta.get('recipe', 'fp32')}", inputs, outputs, device, grad=torch.no_grad)
    runner.info["method"] = meta.get("method")
    return runner
