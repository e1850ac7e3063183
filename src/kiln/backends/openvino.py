"""OpenVINO: the ONNX export converted to OpenVINO IR (model.xml + model.bin), compiled for the CPU at load time.

- fp32: the IR as converted, compiled with INFERENCE_PRECISION_HINT f32 (OpenVINO would otherwise run bf16 on a
  CPU that has it, silently).
- bf16: the same IR compiled with INFERENCE_PRECISION_HINT bf16, only where the CPU reports BF16.
- int8: NNCF post-training quantization of the IR on the build's calibration batches (the same held-out data the
  other int8 paths calibrate on); the quantized IR is the artifact.
The PERFORMANCE_HINT is LATENCY or THROUGHPUT after the build's --objective and is stored in kiln.json, so the
server compiles the artifact the way it was measured.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.backends.common import Subject, Target, cpu_only, first_line, quiet, recipe_of
from kiln.errors import KilnError, Skip
from kiln.recipe import Recipe
from kiln.runner import Runner
from kiln.spec import TensorSpec

NAME = "openvino"
DEFAULT = False  # an optional runtime: --backends all (or naming it) adds it
TRIM = True  # runs any sequence length: +trim variants (kiln.transforms.trim) apply
RANK = 45
COST = 3.0
HALF_PROBE = False  # its bf16 runs its own kernels: eager's bf16 probe says nothing about it
FILE = "model.xml"
_HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}


def variants(t: Target) -> list[Recipe]:
    if t.cuda:  # kiln drives OpenVINO on CPUs only; one row says so
        return [Recipe("fp32")]
    return [Recipe("fp32"), Recipe("bf16"), Recipe("int8-static")]


def _ov() -> Any:
    try:
        import openvino
    except ImportError:
        raise Skip("openvino is not installed (pip install 'kiln[openvino]')") from None
    return openvino


def cpu_has_bf16() -> bool:
    return "BF16" in _ov().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def export(subject: Subject, directory: Path, *, options: dict[str, Any]) -> dict[str, Any]:
    cpu_only(subject.device, "OpenVINO")
    ov = _ov()
    recipe = recipe_of(options)
    if recipe.passes or recipe.precision not in ("fp32", "bf16", "int8-static"):
        raise Skip(f"kiln builds OpenVINO variants in fp32, bf16 and int8, not {recipe.tag}")
    if recipe.precision == "bf16" and not cpu_has_bf16():
        caps = ", ".join(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        raise Skip(f"this CPU has no bf16 in OpenVINO (it reports {caps})")
    from kiln.backends.onnxruntime import write_onnx

    with tempfile.TemporaryDirectory(prefix="kiln-ov-") as tmp:
        meta = write_onnx(subject, Path(tmp), Recipe("fp32"))
        try:
            model = ov.convert_model(str(Path(tmp) / meta["file"]))
        except Exception as e:
            raise KilnError(f"OpenVINO cannot convert the ONNX export: {first_line(e)}",
                            hint="the model uses an operator OpenVINO's ONNX frontend lacks; the onnxruntime variants still apply") from None
    if recipe.precision == "int8-static":
        model = _quantize(model, subject, options.get("calibration"))
    ov.save_model(model, str(directory / FILE), compress_to_fp16=False)
    hint = _HINTS[options.get("objective", "latency")]
    return {"file": FILE, "recipe": recipe.tag, "openvino": ov.__version__.split("-")[0], "hint": hint,
            "precision_hint": "bf16" if recipe.precision == "bf16" else "f32"}


def _quantize(model: Any, subject: Subject, calibration: list[list[torch.Tensor]] | None) -> Any:
    try:
        import nncf
    except ImportError:
        raise Skip("nncf is not installed (pip install 'kiln[openvino]')") from None
    if not calibration:
        raise Skip("OpenVINO int8 needs calibration batches (give --calib or --data)")
    names = [s.name for s in subject.inputs]
    feeds = [{n: x.numpy() for n, x in zip(names, batch)} for batch in calibration]
    transformer = any(s.dtype.startswith("int") for s in subject.inputs)  # token ids in: an encoder
    try:
        with quiet("nncf"):
            return nncf.quantize(model, nncf.Dataset(feeds), subset_size=sum(len(b[0]) for b in calibration),
                                 model_type=nncf.ModelType.TRANSFORMER if transformer else None)
    except Exception as e:
        raise KilnError(f"NNCF quantization failed: {type(e).__name__}: {first_line(e)}",
                        hint="the fp32 OpenVINO variant still applies") from None


def compatible(meta: dict[str, Any]) -> str | None:
    try:
        import openvino
    except ImportError:
        return "openvino is not installed here (pip install 'kiln[openvino]')"
    if meta.get("precision_hint") == "bf16" and "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return "this CPU has no bf16 in OpenVINO"
    return None


def load(directory: Path, meta: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec],
         *, device: str = "cpu", threads: int | None = None) -> Runner:
    cpu_only(device, "OpenVINO")
    ov = _ov()
    config: dict[str, Any] = {"PERFORMANCE_HINT": meta.get("hint", "LATENCY"),
                              "INFERENCE_PRECISION_HINT": meta.get("precision_hint", "f32")}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = ov.Core().compile_model(str(directory / meta["file"]), "CPU", config)
    except Exception as e:
        raise KilnError(f"OpenVINO cannot compile {directory / meta['file']}: {first_line(e)}",
                        hint="the IR is corrupt or was written by a newer OpenVINO; rebuild the model") from None
    got = sorted(p.get_any_name() for p in compiled.inputs)
    if got != sorted(s.name for s in inputs):
        raise KilnError(f"the OpenVINO IR's inputs {got} do not match the manifest's", hint="rebuild the model")
    in_index = {p.get_any_name(): i for i, p in enumerate(compiled.inputs)}
    feed_order = [in_index[s.name] for s in inputs]
    out_index = [next(i for i, p in enumerate(compiled.outputs) if o.name in p.get_names()) for o in outputs]
    local = threading.local()  # an infer request runs one inference at a time: one per calling thread

    def fn(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        req = getattr(local, "req", None)
        if req is None:
            req = local.req = compiled.create_infer_request()
        # Tensors set one by one: infer(dict)'s Python-side conversion costs ~0.2 ms a call, more than a small model.
        for i, x in zip(feed_order, xs):
            req.set_input_tensor(i, ov.Tensor(np.ascontiguousarray(x.numpy(force=True)), shared_memory=True))
        req.infer()
        return [torch.from_numpy(req.get_output_tensor(i).data.copy()) for i in out_index]

    return Runner(f"{NAME}/{meta.get('recipe', 'fp32')}", inputs, outputs, fn, device,
                  {"hint": config["PERFORMANCE_HINT"], "precision_hint": config["INFERENCE_PRECISION_HINT"]})
