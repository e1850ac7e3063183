"""ExecuTorch: a `.pte` program for phones and edge devices, lowered to the XNNPACK delegate and verified here by
running it through the `executorch.runtime` Python bindings, the same runtime an Android or iOS app links.

torch.export (dynamic dims bounded: ExecuTorch plans memory for the largest shape ahead of time) ->
`to_edge_transform_and_lower` with the XnnpackPartitioner -> `.to_executorch()` -> model.pte. int8 quantizes
with the XNNPACKQuantizer (PT2E, symmetric, per-channel weights) calibrated on the build's calibration batches.
kiln.json records what share of the graph's operators XNNPACK took; the rest runs on ExecuTorch's portable
kernels. A batch larger than the bound is run in slices. This replaces torch.utils.mobile_optimizer's
`optimize_for_mobile`, which targets the retired PyTorch Mobile (lite interpreter).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import torch

from kiln.backends.common import (
    Subject,
    Target,
    cpu_only,
    data_dependent,
    exportable_module,
    first_line,
    flatten_outputs,
    quiet,
    recipe_of,
    torch_dynamic_shapes,
)
from kiln.data import batch_dim
from kiln.errors import KilnError, Skip
from kiln.recipe import Recipe
from kiln.runner import Runner
from kiln.signature import FlatModel
from kiln.spec import TensorSpec
from kiln.transforms import apply

NAME = "executorch"
DEFAULT = False  # an optional runtime: --backends all (or naming it) adds it
RANK = 47
COST = 4.0
FILE = "model.pte"
MAX_BATCH = 64  # the batch bound unless the build times a larger one
MAX_DIM = 512  # another dynamic dim's bound unless --dim-size gives one


def variants(t: Target) -> list[Recipe]:
    if t.cuda:
        return [Recipe("fp32")]
    return [Recipe("fp32", t.fold), Recipe("int8-static", t.fold)]


_LOGGERS = ("executorch", "torchao", "torch.utils._pytree", "root")


def _require() -> None:
    try:
        with quiet(*_LOGGERS):
            import executorch.exir
            import executorch.runtime  # noqa: F401
    except ImportError:
        raise Skip("executorch is not installed (pip install 'kiln[executorch]')") from None


def bounds(inputs: list[TensorSpec], batch_sizes: list[int], dim_sizes: dict[str, int] | None) -> dict[str, int]:
    """The upper bound of every named dynamic dim: the batch from the build's sizes (at least MAX_BATCH), others
    from --dim-size (at least MAX_DIM)."""
    dim_sizes = dim_sizes or {}
    batch = batch_dim(inputs)
    out: dict[str, int] = {}
    for s in inputs:
        for name in s.dynamic_dims.values():
            if name == batch:
                out[name] = max(MAX_BATCH, *batch_sizes)
            else:
                out[name] = max(MAX_DIM, dim_sizes.get(name, 0))
    return out


def export(subject: Subject, directory: Path, *, options: dict[str, Any]) -> dict[str, Any]:
    cpu_only(subject.device, "ExecuTorch programs (XNNPACK)")
    module = exportable_module(subject, NAME)
    recipe = recipe_of(options)
    if recipe.precision not in ("fp32", "int8-static") or recipe.has("channels_last") or recipe.has("cudagraphs"):
        raise Skip(f"kiln builds ExecuTorch programs in fp32 and int8, not {recipe.tag}")
    _require()
    top = bounds(subject.inputs, list(options.get("batch_sizes", [1])), options.get("dim_sizes"))
    flat = FlatModel(apply(module, Recipe("fp32", recipe.passes), subject.notes)).eval()
    examples = tuple(subject.examples)
    try:
        with quiet(*_LOGGERS):
            try:
                program, share = _lower(flat, examples, torch_dynamic_shapes(subject.inputs, bounds=top), recipe, options)
            except Exception as e:
                if not (data_dependent(e) or "onstraint" in str(e)):  # value-dependent shapes, or bounds export refuses
                    raise
                # a graph that guards on its shapes (onnx2torch's Reshape, for one) still exports at fixed shapes
                program, share = _lower(flat, examples, None, recipe, options)
                top = {n: int(examples[i].shape[d]) for i, s in enumerate(subject.inputs) for d, n in s.dynamic_dims.items()}
                subject.notes.append(f"executorch: dynamic dims failed to export ({first_line(e)[:120]}); exported at the "
                                     f"fixed shapes {top}, larger batches run in slices")
        (directory / FILE).write_bytes(program.buffer)
        batch = batch_dim(subject.inputs)
        if batch in top:
            top[batch] = _batch_capacity(directory / FILE, subject, batch, top[batch])
    except (Skip, KilnError):
        raise
    except Exception as e:
        raise KilnError(f"ExecuTorch lowering failed: {type(e).__name__}: {first_line(e)}",
                        hint="see https://pytorch.org/executorch for the operators XNNPACK and the portable kernels cover") from None
    subject.notes.append(f"executorch: XNNPACK runs {share['delegated']} of {share['delegated'] + share['portable']} "
                         f"operators ({share['share']:.0%}); the rest run on the portable CPU kernels")
    from importlib.metadata import version

    return {"file": FILE, "recipe": recipe.tag, "executorch": version("executorch"), "bounds": top,
            "delegation": share}


def _lower(flat: torch.nn.Module, examples: tuple[torch.Tensor, ...], shapes: Any, recipe: Recipe,
           options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    if recipe.precision == "int8-static":
        flat = _quantize(flat, examples, shapes, options.get("calibration"))
    ep = torch.export.export(flat, examples, dynamic_shapes=shapes, strict=False)
    lowered = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    share = delegated(lowered.exported_program().graph_module)
    # memory planned for the dims' upper bounds (the default plans for the example's sizes)
    return lowered.to_executorch(ExecutorchBackendConfig(sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass())), share


def _batch_capacity(path: Path, subject: Subject, batch: str, bound: int) -> int:
    """The largest batch the program accepts, measured: XNNPACK's delegate can cap a dynamic dim below the exported
    bound (ExecuTorch 1.5 caps a small CNN's batch at 15 of 64), and a call past it fails. The runner slices there."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")

    def fits(n: int) -> bool:
        xs = [x[:1].expand(n, *x.shape[1:]).contiguous() if s.dynamic_dims.get(0) == batch else x
              for s, x in zip(subject.inputs, subject.examples)]
        try:
            with _fd2_quiet():
                method.execute(xs)
            return True
        except Exception:
            return False

    if fits(bound):
        return bound
    lo, hi = 1, bound  # fits(lo), not fits(hi)
    if not fits(lo):
        raise KilnError("the ExecuTorch program refuses even a batch of 1", hint="the other variants still apply")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    subject.notes.append(f"executorch: the program takes batches up to {lo} (exported bound {bound}); larger ones run in slices")
    return lo


@contextlib.contextmanager
def _fd2_quiet() -> Any:
    """ExecuTorch's runtime logs refusals from C++ to file descriptor 2."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _quantize(flat: torch.nn.Module, examples: tuple[torch.Tensor, ...], shapes: Any,
              calibration: list[list[torch.Tensor]] | None) -> torch.nn.Module:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not calibration:
        raise KilnError("ExecuTorch int8 needs calibration data", hint="pass --data (a part is held out) or --calib")
    quantizer = XNNPACKQuantizer()
    quantizer.set_global(get_symmetric_quantization_config(is_per_channel=True))
    captured = torch.export.export(flat, examples, dynamic_shapes=shapes, strict=False).module()
    prepared = prepare_pt2e(captured, quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(*batch)
    converted = convert_pt2e(prepared)
    if not any("quantize" in str(n.target) for n in converted.graph.nodes if n.op == "call_function"):
        raise KilnError("the XNNPACK quantizer inserted no quantize/dequantize ops", hint="the fp32 program still applies")
    # exported again below with FlatModel's one-tuple signature: wrap the captured module back into it
    return _Flat(converted)


class _Flat(torch.nn.Module):
    """The PT2E-converted module (separate tensor arguments) behind FlatModel's `*args` signature."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *xs: torch.Tensor) -> Any:
        return self.inner(*xs)


def delegated(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """How many of the edge graph's operators the XNNPACK delegate took, and how many run outside it."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(gm)
    d, p = info.num_delegated_nodes, info.num_non_delegated_nodes
    outside = sorted({str(row["op_type"]) for row in info.get_operator_delegation_dataframe().to_dict("records")
                      if row.get("non_delegated_nodes", 0) and row["op_type"] != "Total"})
    return {"delegated": d, "portable": p, "share": d / max(1, d + p), "portable_ops": outside}


def compatible(meta: dict[str, Any]) -> str | None:
    try:
        from importlib.metadata import version

        version("executorch")
    except Exception:
        return "executorch is not installed here (pip install 'kiln[executorch]')"
    return None


def load(directory: Path, meta: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec],
         *, device: str = "cpu", threads: int | None = None) -> Runner:
    cpu_only(device, "ExecuTorch programs")
    _require()
    from executorch.runtime import Runtime, Verification

    try:
        with quiet(*_LOGGERS):
            program = Runtime.get().load_program(directory / meta["file"], verification=Verification.InternalConsistency)
            method = program.load_method("forward")
    except Exception as e:
        raise KilnError(f"ExecuTorch cannot load {directory / meta['file']}: {first_line(e)}",
                        hint="the .pte is corrupt or was written by another ExecuTorch release; rebuild the model") from None
    batch = batch_dim(inputs)
    top = meta.get("bounds", {}).get(batch) if batch else None
    lock = threading.Lock()  # a loaded method holds one set of buffers: one call at a time

    def once(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        with lock:
            return [o.clone() for o in flatten_outputs(method.execute([x.contiguous() for x in xs]))]

    def fn(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        n = xs[0].shape[0] if xs and xs[0].dim() else 0
        if top is None or n <= top:
            return once(xs)
        parts = [once([x[i:i + top] for x in xs]) for i in range(0, n, top)]  # past the planned bound: in slices
        return [torch.cat(col) for col in zip(*parts)]

    return Runner(f"{NAME}/{meta.get('recipe', 'fp32')}", inputs, outputs, fn, device,
                  {"delegated_share": meta.get("delegation", {}).get("share")})
