"""ONNX -> PyTorch: an ONNX source becomes a torch module (onnx2torch), so it gets the torch variants too (eager,
compile, AOTInductor, ExecuTorch), each verified against ONNX Runtime's output of the original file.

onnx2torch has converters up to a given opset per operator: a graph it cannot convert as it is, is lowered to
opset 17 with onnx's version converter (ReduceMean-18, for one, has no converter), and the operators left
without one are named in the error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.errors import KilnError, Skip

LOWER_TO = 17


def _onnx2torch() -> Any:
    if importlib.util.find_spec("onnx2torch") is None:
        raise Skip("onnx2torch is not installed (pip install 'kiln[onnx-import]'): an ONNX source gets only the "
                   "variants that read ONNX (onnxruntime, openvino, tvm, tensorrt)")
    absent = importlib.util.find_spec("torchvision") is None
    if absent:
        # onnx2torch imports torchvision for two converters (NonMaxSuppression, RoiAlign) and nothing else. Where
        # torchvision is absent (PyPI's build needs a CUDA torch), those two say so when a graph uses them. The
        # placeholder lives only while onnx2torch imports: other libraries must go on seeing no torchvision.
        tv = _without_torchvision()
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, tv.ops
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import onnx2torch
    finally:
        if absent:
            sys.modules.pop("torchvision", None)
            sys.modules.pop("torchvision.ops", None)
    return onnx2torch


def _without_torchvision() -> types.ModuleType:
    def missing(*_: Any, **__: Any) -> Any:
        raise KilnError("this ONNX graph uses NonMaxSuppression or RoiAlign, whose converters need torchvision",
                        hint="pip install a torchvision built for this torch, or rely on the onnxruntime variants")

    tv = types.ModuleType("torchvision")
    tv.ops = types.ModuleType("torchvision.ops")  # type: ignore[attr-defined]
    for name in ("nms", "batched_nms", "box_convert", "roi_align"):
        setattr(tv.ops, name, missing)
    return tv


def unconvertible(model: Any) -> list[str]:
    """The graph's operators (op_type-opset) that onnx2torch has no converter for."""
    from onnx2torch.node_converters.registry import get_converter

    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing = set()
    for node in model.graph.node:
        domain = node.domain or ""
        try:
            get_converter(node.op_type, opsets.get(domain, opsets.get("", LOWER_TO)), domain or "")
        except NotImplementedError:
            missing.add(f"{node.op_type}-{opsets.get(domain, '?')}")
    return sorted(missing)


def _reshape_allowzero(model: Any, notes: list[str]) -> None:
    """torch's exporter writes Reshape with allowzero=1 (a 0 in the shape means a zero-size dim, as in torch), which
    onnx2torch refuses. The two readings differ only when the target shape holds a 0: clear the attribute where the
    shape is a constant without one, and say so where the shape is computed (verification checks the result)."""
    import numpy as np
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
    computed = 0
    for node in model.graph.node:
        if node.op_type != "Reshape":
            continue
        attrs = [a for a in node.attribute if a.name == "allowzero" and a.i == 1]
        if not attrs:
            continue
        shape = consts.get(node.input[1])
        if shape is None:
            computed += 1
        elif np.any(shape == 0):
            continue  # a literal zero-size dim: leave it to onnx2torch's refusal
        node.attribute.remove(attrs[0])
    if computed:
        notes.append(f"onnx import: {computed} Reshape(allowzero=1) with computed shapes read as allowzero=0 "
                     "(they differ only for zero-size dims)")


class OnnxModule(nn.Module):
    """The converted graph, called with the ONNX inputs in graph order; returns a tuple of its outputs."""

    def __init__(self, graph: nn.Module, n_out: int) -> None:
        super().__init__()
        self.graph = graph
        self.n_out = n_out

    def forward(self, *xs: torch.Tensor) -> Any:
        out = self.graph(*xs)
        return out if self.n_out > 1 else (out,)


def to_torch(path: Path, notes: list[str]) -> nn.Module:
    """The ONNX file as a torch module; notes say what was lowered."""
    import onnx

    o2t = _onnx2torch()
    model = onnx.load(str(path))
    missing = unconvertible(model)
    opset = next((o.version for o in model.opset_import if (o.domain or "") == ""), LOWER_TO)
    if missing and opset > LOWER_TO:
        from onnx import version_converter

        try:
            lowered = version_converter.convert_version(model, LOWER_TO)
        except Exception as e:
            raise KilnError(f"onnx2torch has no converter for {', '.join(missing)} and lowering opset {opset} to "
                            f"{LOWER_TO} failed: {str(e).strip().splitlines()[0][:200]}",
                            hint="the onnxruntime variants still run the file as it is") from None
        still = unconvertible(lowered)
        if not still:
            notes.append(f"onnx import: lowered opset {opset} to {LOWER_TO} for onnx2torch ({', '.join(missing)} has no converter)")
        model, missing = lowered, still
    _reshape_allowzero(model, notes)
    if missing:
        raise KilnError(f"onnx2torch has no converter for {', '.join(missing)}",
                        hint="the onnxruntime (and openvino, tvm) variants still run the file as it is")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            graph = o2t.convert(model)
    except KilnError:
        raise
    except Exception as e:
        raise KilnError(f"onnx2torch could not convert {path.name}: {type(e).__name__}: {str(e).strip()[:200]}",
                        hint="the onnxruntime variants still run the file as it is") from None
    return OnnxModule(graph, len(model.graph.output)).eval()
