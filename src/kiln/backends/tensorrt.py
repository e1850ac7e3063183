"""TensorRT: ONNX -> serialized engine at build time, only deserialized at serve time.

Precision lives in the ONNX graph, never in builder flags, so one code path serves TensorRT 10 and 11
(11 removed BuilderFlag.FP16/INT8 and the INT8 calibrators; networks are strongly typed):
- fp32 and fp16/bf16: the model is exported behind kiln's cast adapter, so the graph itself computes in
  fp16/bf16 with fp32 inputs and outputs; the network is created STRONGLY_TYPED (the flag is required on
  10.x and accepted on 11.x).
- int8-static: the Q/DQ ONNX that kiln's static int8 pass writes (calibrated on held-out data), i.e.
  explicit quantization.
Dynamic dims get one optimization profile: min 1 (or the spec's smallest), opt and max from the build's batch
sizes. Engines are cached under $KILN_CACHE/tensorrt by ONNX hash, GPU, compute capability, TensorRT version
and profile, so rebuilding an unchanged model on the same machine reuses the engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from kiln.backends.common import Subject, Target, check_device, module_runner, recipe_of
from kiln.errors import KilnError, Skip
from kiln.recipe import Recipe
from kiln.runner import Runner
from kiln.spec import TensorSpec

NAME = "tensorrt"
RANK = 60
FILE = "model.engine"
WORKSPACE_BYTES = 4 << 30


def variants(t: Target) -> list[Recipe]:
    if not t.cuda:  # on a CPU machine one row says why TensorRT is not here
        return [Recipe("fp32")]
    return [Recipe("fp32"), *(Recipe(h) for h in t.halves), Recipe("int8-static")]


def _trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise Skip("tensorrt is not installed (pip install tensorrt, on a machine with an NVIDIA GPU)") from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise Skip(f"TensorRT {trt.__version__} is too old; kiln uses the TensorRT 10/11 tensor API")
    return trt


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "tensorrt"


def profile_shapes(inputs: list[TensorSpec], batch_sizes: list[int], dim_sizes: dict[str, int] | None = None,
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) per input: the batch dim from 1 to the largest build batch (opt: the largest), other
    dynamic dims from 1 to their given size (opt: that size)."""
    dim_sizes = dim_sizes or {}
    top = max(batch_sizes or [1])
    out = {}
    for i, s in enumerate(inputs):
        lo, opt, hi = [], [], []
        for k, d in enumerate(s.shape):
            if isinstance(d, int):
                lo.append(d)
                opt.append(d)
                hi.append(d)
            elif k == 0 and i == 0 or d == inputs[0].shape[0]:
                lo.append(1)
                opt.append(top)
                hi.append(top)
            else:
                size = dim_sizes.get(d, 128)
                lo.append(1)
                opt.append(size)
                hi.append(size)
        out[s.name] = (tuple(lo), tuple(opt), tuple(hi))
    return out


def export(subject: Subject, directory: Path, *, options: dict[str, Any]) -> dict[str, Any]:
    if not subject.device.startswith("cuda"):
        raise Skip("TensorRT runs on NVIDIA GPUs; build with --device cuda")
    check_device(subject.device)
    trt = _trt()
    recipe = recipe_of(options)
    if recipe.passes or recipe.precision == "int8-dynamic":
        raise Skip(f"kiln builds TensorRT engines in fp32, fp16, bf16 and int8-static, not {recipe.tag}")
    from kiln.backends.onnxruntime import write_onnx

    staging = directory / "onnx"
    staging.mkdir()
    write_onnx(subject, staging, Recipe(recipe.precision if recipe.dtype is not None else "fp32"))
    onnx_path = staging / "model.onnx"
    if recipe.precision == "int8-static":
        from kiln.transforms.onnx_int8 import quantize

        quantize(onnx_path, staging / "model.qdq.onnx", "int8-static", inputs=subject.inputs,
                 calibration=options.get("calibration"))
        onnx_path = staging / "model.qdq.onnx"
    shapes, key = engine_plan(onnx_path, subject.inputs, list(options.get("batch_sizes", [1])), options.get("dim_sizes"),
                              gpu=_gpu(subject.device), trt_version=trt.__version__)
    cached = cache_dir() / f"{key}.engine"
    if cached.is_file():
        subject.notes.append(f"tensorrt: engine reused from the cache ({cached})")
    else:
        data = _build_engine(trt, onnx_path, shapes)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(cached)
    shutil.copyfile(cached, directory / FILE)
    shutil.rmtree(staging)
    return {"file": FILE, "recipe": recipe.tag, "tensorrt": trt.__version__, "gpu": _gpu(subject.device),
            "profile": {k: [list(x) for x in v] for k, v in shapes.items()}, "cache_key": key}


def _gpu(device: str) -> str:
    p = torch.cuda.get_device_properties(device)
    return f"{p.name} sm_{p.major}{p.minor}"


def engine_plan(onnx_path: Path, inputs: list[TensorSpec], batch_sizes: list[int], dim_sizes: dict[str, int] | None,
                *, gpu: str, trt_version: str) -> tuple[dict[str, Any], str]:
    """What an engine is built from, without TensorRT: the optimization profile and the cache key (the ONNX
    bytes, the GPU, the TensorRT version and the profile; any change means another engine)."""
    shapes = profile_shapes(inputs, batch_sizes, dim_sizes)
    h = hashlib.sha256()
    with open(onnx_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(json.dumps({"gpu": gpu, "trt": trt_version, "profile": shapes}, sort_keys=True).encode())
    return shapes, h.hexdigest()[:32]


def _build_engine(trt: Any, onnx_path: Path, shapes: dict[str, Any]) -> bytes:
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(flag) if flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise KilnError(f"TensorRT cannot parse the ONNX model: {errors[:300]}",
                        hint="an operator TensorRT lacks; rely on the other variants")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        lo, opt, hi = shapes[name]
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise KilnError("TensorRT failed to build an engine", hint="run with a smaller batch range, or rely on the other variants")
    return bytes(data)


def compatible(meta: dict[str, Any]) -> str | None:
    try:
        trt = _trt()
    except Skip as e:
        return str(e)
    if meta.get("tensorrt") != trt.__version__:
        return f"engine built with TensorRT {meta.get('tensorrt')}, this is TensorRT {trt.__version__}"
    return None


def load(directory: Path, meta: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec],
         *, device: str = "cpu", threads: int | None = None) -> Runner:
    trt = _trt()
    if not device.startswith("cuda"):
        raise Skip("TensorRT engines run on NVIDIA GPUs")
    check_device(device)
    if _gpu(device) != meta.get("gpu"):
        raise KilnError(f"this engine was built for {meta.get('gpu')}, not {_gpu(device)}",
                        hint="TensorRT engines are specific to a GPU model; rebuild on this machine")
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine((directory / meta["file"]).read_bytes())
    if engine is None:
        raise KilnError("TensorRT could not deserialize the engine", hint="rebuild it with this TensorRT and GPU")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    in_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    out_dtypes = {o.name: _torch_dtype(trt, engine.get_tensor_dtype(o.name)) for o in outputs}
    if sorted(in_names) != sorted(s.name for s in inputs):
        raise KilnError(f"the engine's inputs {in_names} do not match the manifest's", hint="rebuild the model")
    dev = torch.device(device)

    def call(*xs: torch.Tensor) -> list[torch.Tensor]:
        stream = torch.cuda.current_stream(dev)
        keep = []
        for s, x in zip(inputs, xs):
            x = x.contiguous()
            keep.append(x)
            context.set_input_shape(s.name, tuple(x.shape))
            context.set_tensor_address(s.name, x.data_ptr())
        outs = []
        for o in outputs:
            t = torch.empty(tuple(context.get_tensor_shape(o.name)), dtype=out_dtypes[o.name], device=dev)
            context.set_tensor_address(o.name, t.data_ptr())
            outs.append(t)
        if not context.execute_async_v3(stream.cuda_stream):
            raise KilnError("TensorRT execution failed", hint="check the input shapes against the engine's profile")
        return outs

    runner = module_runner(call, f"{NAME}/{meta.get('recipe', 'fp32')}", inputs, outputs, device)
    runner.info["tensorrt"] = meta.get("tensorrt")
    return runner


def _torch_dtype(trt: Any, dt: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool, trt.int64: torch.int64}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dt not in table:
        raise KilnError(f"TensorRT output type {dt} is not handled", hint="rely on the other variants")
    return table[dt]
