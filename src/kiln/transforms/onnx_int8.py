"""int8 for ONNX Runtime: dynamic (per-channel weights, MatMul/Gemm only: dynamic ConvInteger is slow)
and static (QDQ, per-channel, activations calibrated on data the verification never sees)."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.spec import TensorSpec

PRECISIONS = ("int8-dynamic", "int8-static")


class _Reader:
    """onnxruntime's CalibrationDataReader: one feed dict per calibration batch."""

    def __init__(self, specs: list[TensorSpec], batches: list[list[torch.Tensor]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(
            [{s.name: x.numpy() for s, x in zip(specs, b)} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - only called by some calibrators
        pass


def quantize(model: Path, out: Path, precision: str, *, inputs: list[TensorSpec],
             calibration: list[list[torch.Tensor]] | None) -> None:
    """Write the int8 version of `model` to `out`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name(out.stem + ".pre.onnx")
    sink = io.StringIO()
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs every node it visits
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            source = model
            if precision == "int8-static":
                try:
                    quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
                    source = prepared
                except Exception:  # pre-processing is an optimisation; quantize the plain model without it
                    source = model
            else:
                # The dynamo exporter records intermediate shapes (value_info) that the dynamic quantizer's strict
                # shape inference then contradicts once MatMul becomes MatMulInteger: drop them and let it re-infer.
                import onnx

                m = onnx.load(str(model))
                del m.graph.value_info[:]
                onnx.save(m, str(prepared))
                source = prepared
            if precision == "int8-dynamic":
                quantize_dynamic(str(source), str(out), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                                 weight_type=QuantType.QInt8)
            elif precision == "int8-static":
                if not calibration:
                    raise KilnError("static int8 needs calibration data", hint="pass --data (a part is held out) or --calib")
                reader = type("Reader", (_Reader, CalibrationDataReader), {})(inputs, calibration)
                quantize_static(str(source), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
            else:
                raise KilnError(f"unknown precision {precision!r}", hint=f"use one of {', '.join(PRECISIONS)}")
    except KilnError:
        raise
    except Exception as e:
        raise KilnError(f"onnxruntime quantization ({precision}) failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                        hint="the fp32 variants remain; this model may use operators the quantizer does not handle") from None
    finally:
        logging.getLogger().setLevel(level)
        prepared.unlink(missing_ok=True)
