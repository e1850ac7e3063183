"""int8 on the torch side, through torchao: dynamic (int8 weights and per-token int8 activations for Linear,
`quantize_`) and static (PT2E with the x86 Inductor quantizer, calibrated, then compiled by AOTInductor)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any

import torch
from torch import nn

from kiln.errors import KilnError, Skip


def torchao() -> Any:
    """Import torchao quietly (it reports every optional CUDA kernel it cannot load); Skip when absent."""
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    # torch.compile's cache asks tensor subclasses for a stable hash that torchao's Int8Tensor does not provide
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            import torchao
            import torchao.quantization
    except ImportError:
        raise Skip("torchao is not installed (pip install torchao)") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return torchao


def _version() -> str:
    from importlib.metadata import version

    return version("torchao")


def dynamic(model: nn.Module) -> None:
    """int8 weights (per channel) and dynamic per-token int8 activations for every Linear, in place."""
    torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise Skip("dynamic int8 quantizes Linear layers; this model has none")
    quantize_(model, Int8DynamicActivationInt8WeightConfig())


def static(flat: nn.Module, examples: tuple[torch.Tensor, ...], dynamic_shapes: Any,
           calibration: list[list[torch.Tensor]] | None) -> torch.export.ExportedProgram:
    """PT2E: export, annotate with the x86 Inductor quantizer, calibrate, convert, export again."""
    torchao()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    if not calibration:
        raise KilnError("static int8 needs calibration data", hint="pass --data (a part is held out) or --calib")
    captured = torch.export.export(flat, examples, dynamic_shapes=dynamic_shapes, strict=False).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(captured, quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(*batch)
    converted = convert_pt2e(prepared)
    ops = {str(n.target) for n in converted.graph.nodes if n.op == "call_function"}
    if not any("quantize" in t for t in ops):  # never label an fp32 graph int8
        raise KilnError(f"the PT2E quantizer inserted no quantize/dequantize ops (torchao {_version()} with torch "
                        f"{torch.__version__})", hint="use a torch release this torchao supports; onnxruntime/int8-static remains")
    # The captured module takes the tensors as separate arguments, not FlatModel's one `*args` tuple.
    flat_shapes = dynamic_shapes[0] if isinstance(dynamic_shapes, tuple) and len(dynamic_shapes) == 1 else dynamic_shapes
    return torch.export.export(converted, examples, dynamic_shapes=flat_shapes, strict=False)
