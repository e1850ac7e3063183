"""int8 on the torch side, through torchao: dynamic (int8 weights and per-token int8 activations for Linear,
`quantize_`) and static (PT2E with the x86 Inductor quantizer, calibrated, then compiled by AOTInductor)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
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


def dynamic(model: nn.Module) -> str:
    """int8 weights (per channel) and dynamic per-token int8 activations for every Linear whose in and out features
    are multiples of 8 (cuBLAS's int8 GEMM takes no others; the rest stay in float), in place. Returns a note."""
    torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise Skip("dynamic int8 quantizes Linear layers; this model has none")
    fit = [m for m in linears if _int8_gemm_fits(m)]
    if not fit:
        raise Skip(f"dynamic int8 quantizes Linear layers whose in and out features are multiples of 8 (cuBLAS's int8 "
                   f"GEMM takes no others); none of this model's {len(linears)} do")
    quantize_(model, Int8DynamicActivationInt8WeightConfig(),
              filter_fn=lambda m, _fqn: isinstance(m, nn.Linear) and _int8_gemm_fits(m))
    for m in fit:
        if type(m) is nn.Linear:
            m.__class__ = RowPaddedLinear  # same parameters and state_dict keys; only forward differs
    kept = len(linears) - len(fit)
    return f"int8-dynamic: {len(fit)} Linear layer(s) in int8" + (
        f", {kept} kept in float (in or out features not a multiple of 8, which cuBLAS's int8 GEMM needs)" if kept else "")


def _int8_gemm_fits(m: nn.Linear) -> bool:
    return m.in_features % 8 == 0 and m.out_features % 8 == 0


# cuBLAS's int8 GEMM (torch._int_mm, which torchao's int8 Linear calls on CUDA) refuses 16 rows or fewer: "self.size(0)
# needs to be greater than 16". A batch of one short sequence, or an MLP at batch <= 16, has that few.
INT8_GEMM_MIN_ROWS = 17


def pad_rows(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             min_rows: int = INT8_GEMM_MIN_ROWS) -> torch.Tensor:
    """`forward(x)` for a Linear, with x's rows (every dim but the last, flattened) padded with zeros up to
    `min_rows` when there are fewer, and the padding's output rows cut off again. Rows are independent in a Linear
    (and in per-token activation quantization), so the result is the unpadded one."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows >= min_rows or rows == 0:
        return forward(x)
    flat = torch.nn.functional.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, min_rows - rows))
    y = forward(flat)[:rows]
    return y.reshape(*x.shape[:-1], y.shape[-1])


class RowPaddedLinear(nn.Linear):
    """An int8-quantized Linear that runs on CUDA at any row count (see INT8_GEMM_MIN_ROWS); elsewhere it is nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return pad_rows(super().forward, x)
        return super().forward(x)


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
