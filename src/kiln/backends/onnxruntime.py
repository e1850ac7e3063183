"""ONNX Runtime: the dynamo exporter with dynamic axes (legacy exporter for TorchScript), ORT sessions."""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.backends.common import (
    Subject,
    Target,
    check_device,
    data_dependent,
    first_line,
    recipe_of,
    require_module,
    torch_dynamic_shapes,
)
from kiln.errors import KilnError, Skip
from kiln.recipe import Recipe
from kiln.runner import Runner
from kiln.signature import FlatModel
from kiln.spec import TensorSpec
from kiln.transforms import apply

NAME = "onnxruntime"
TRIM = True  # runs any sequence length: +trim variants (kiln.transforms.trim) apply
RANK = 40
FILE = "model.onnx"
# Beyond this the protobuf limit (2 GiB) is near: keep weights in an external data file.
_EXTERNAL_BYTES = 1 << 30
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16", "tensor(int64)": "int64", "tensor(int32)": "int32",
    "tensor(int16)": "int16", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}


def variants(t: Target) -> list[Recipe]:
    return [Recipe("fp32"), Recipe("int8-dynamic"), Recipe("int8-static"), *t.pruned()]


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise Skip("onnxruntime is not installed (pip install onnxruntime)") from None
    return onnxruntime


def export(subject: Subject, directory: Path, *, options: dict[str, Any]) -> dict[str, Any]:
    _ort()
    recipe = recipe_of(options)
    if recipe.dtype is not None or recipe.has("cudagraphs") or recipe.has("channels_last"):
        raise Skip(f"kiln builds ONNX Runtime variants in fp32 and int8 only, not {recipe.tag}")
    meta = write_onnx(subject, directory, Recipe("fp32", recipe.passes))
    if recipe.precision.startswith("int8"):
        from kiln.transforms.onnx_int8 import quantize

        fp32 = directory / meta["file"]
        quantize(fp32, directory / "model.int8.onnx", recipe.precision, inputs=subject.inputs,
                 calibration=options.get("calibration"))
        fp32.unlink()
        meta["file"] = "model.int8.onnx"
    return {**meta, "recipe": recipe.tag}


def write_onnx(subject: Subject, directory: Path, recipe: Recipe) -> dict[str, Any]:
    """The model (after the recipe's torch-side passes) as model.onnx in `directory`.

    Exported once per build and recipe: a later call copies the first one's files (or raises its error again).
    ONNX Runtime's fp32 and both int8 variants and OpenVINO's start from the same fp32 export, which is most of
    their build time (3-4 s each for a small MLP here; minutes for a large model)."""
    key = f"onnx:{recipe.tag}"
    hit = subject.exports.get(key)
    if isinstance(hit, Exception):
        raise hit
    if hit is not None and all(f.is_file() for f in hit[1]):
        for f in hit[1]:
            shutil.copyfile(f, directory / f.name)
        return dict(hit[0])
    before = set(directory.iterdir())
    try:
        meta = _export_onnx(subject, directory, recipe)
    except (KilnError, Skip) as e:
        subject.exports[key] = e
        raise
    keep = Path(tempfile.mkdtemp(prefix="kiln-onnx-"))
    weakref.finalize(subject, shutil.rmtree, keep, True)
    files = []
    for f in sorted(set(directory.iterdir()) - before):
        if f.is_file():
            shutil.copyfile(f, keep / f.name)
            files.append(keep / f.name)
    subject.exports[key] = (dict(meta), files)
    return meta


def _export_onnx(subject: Subject, directory: Path, recipe: Recipe) -> dict[str, Any]:
    out = directory / FILE
    names_in = [s.name for s in subject.inputs]
    names_out = [s.name for s in subject.outputs]
    if subject.source.kind == "onnx":
        import onnx

        if recipe.tag != "fp32":
            raise Skip(f"an ONNX source is used as it is; {recipe.tag} needs the PyTorch model")
        model = onnx.load(str(subject.source.path))
        onnx.save(model, str(out), save_as_external_data=model.ByteSize() > _EXTERNAL_BYTES)
        return {"file": FILE, "exporter": "source"}
    module = require_module(subject, NAME)
    if recipe.tag != "fp32":
        if isinstance(module, torch.jit.ScriptModule):
            raise Skip(f"a TorchScript source is exported as it is; {recipe.tag} needs the Python model")
        module = apply(module, recipe, subject.notes)
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > _EXTERNAL_BYTES
    quiet = io.StringIO()
    if isinstance(module, torch.jit.ScriptModule):
        # The dynamo exporter cannot read TorchScript; the legacy (TorchScript-based) exporter can.
        axes = {s.name: dict(s.dynamic_dims) for s in subject.inputs + subject.outputs if s.dynamic_dims}
        try:
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                torch.onnx.export(module, tuple(subject.examples), str(out), dynamo=False, input_names=names_in,
                                  output_names=names_out, dynamic_axes=axes)
        except Exception as e:
            raise KilnError(f"ONNX export (legacy exporter) failed: {type(e).__name__}: {first_line(e)}",
                            hint="see the torch.onnx docs for unsupported operators") from None
        return {"file": FILE, "exporter": "legacy"}
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            program = torch.onnx.export(FlatModel(module).eval(), tuple(subject.examples), dynamo=True,
                                        dynamic_shapes=torch_dynamic_shapes(subject.inputs), input_names=names_in,
                                        optimize=True)
            assert program is not None  # no file given: export returns the program
            name_outputs(program.model.graph, names_out)
            program.save(str(out), external_data=big)
    except Exception as e:
        if data_dependent(e):
            raise KilnError("ONNX export hit data-dependent control flow (an `if` on tensor values)",
                            hint="rewrite the branch with torch.cond, or rely on the torchscript/compile variants") from None
        raise KilnError(f"ONNX export failed: {type(e).__name__}: {first_line(e)}",
                        hint="see the torch.onnx docs for unsupported operators") from None
    return {"file": FILE, "exporter": "dynamo"}



def name_outputs(graph: Any, names: list[str]) -> None:
    """Give the graph's outputs kiln's names. The exporter's own `output_names` can make an invalid model: it
    names values after their op (`embedding` for aten.embedding), so an output called `embedding` would be
    defined twice; here a clashing inner value is renamed first."""
    from onnx_ir.traversal import RecursiveGraphIterator

    values = [*graph.inputs, *graph.initializers.values(), *(o for n in RecursiveGraphIterator(graph) for o in n.outputs)]
    taken = {v.name: v for v in values if v.name}
    for value, want in zip(graph.outputs, names):
        other = taken.get(want)
        if other is not None and other is not value:
            k = 1
            while f"{want}__{k}" in taken:
                k += 1
            other.name = f"{want}__{k}"
            taken[other.name] = other
        taken.pop(value.name, None)
        value.name = want
        taken[want] = value


def session(path: Path, *, device: str = "cpu", threads: int = 0, spin: bool = True, profile_prefix: str | None = None) -> Any:
    """An InferenceSession. `spin=False` lets idle intra-op threads sleep instead of busy-waiting for the next
    operator: what a server wants, whose event loop needs the CPU that a spinning pool burns."""
    ort = _ort()
    opts = ort.SessionOptions()
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip("onnxruntime here has no CUDA provider (pip install onnxruntime-gpu)")
        index = int(device.split(":")[1]) if ":" in device else 0
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:
        raise KilnError(f"onnxruntime cannot load {path}: {first_line(e)}",
                        hint="the file is corrupt or uses operators this onnxruntime lacks") from None


def signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output TensorSpecs read from an ONNX graph (dim_params become named dynamic dims)."""
    sess = session(path)

    def specs(args: Any) -> list[TensorSpec]:
        out = []
        for a in args:
            if a.type not in _ORT_TYPES:
                raise KilnError(f"ONNX tensor {a.name!r} has type {a.type}, which kiln does not handle", hint="use a float or integer tensor")
            shape = tuple(d if isinstance(d, int) else (d if isinstance(d, str) and d.isidentifier() else f"{a.name}_dim{i}")
                          for i, d in enumerate(a.shape))
            out.append(TensorSpec(a.name, _ORT_TYPES[a.type], shape))
        return out

    return specs(sess.get_inputs()), specs(sess.get_outputs())


def load(directory: Path, meta: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec],
         *, device: str = "cpu", threads: int | None = None, spin: bool = True) -> Runner:
    check_device(device)
    sess = session(directory / meta["file"], device=device, threads=threads or 0, spin=spin)
    in_names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in outputs]
    if sorted(in_names) != sorted(s.name for s in inputs):
        raise KilnError(f"the ONNX file's inputs {in_names} do not match the manifest's", hint="rebuild the model")

    def fn(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        feeds = {s.name: x.numpy(force=True) for s, x in zip(inputs, xs)}
        return [torch.from_numpy(np.asarray(o)) for o in sess.run(out_names, feeds)]

    try:  # read back from the session: what the runtime was actually told
        spinning = sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") != "0"
    except RuntimeError:  # absent: onnxruntime's default, spinning
        spinning = True
    return Runner(f"{NAME}/{meta.get('recipe', meta.get('precision', 'fp32'))}", inputs, outputs, fn, device,
                  {"providers": sess.get_providers(), "spin": spinning})
