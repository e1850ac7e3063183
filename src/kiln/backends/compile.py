"""torch.compile at load time: the artifact is the model code, its weights and the compile options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kiln.backends.common import Skip, Subject, check_device, rebuild_module, require_module, save_python_source
from kiln.backends.eager import module_runner
from kiln.runner import Runner
from kiln.signature import FlatModel, example_inputs
from kiln.spec import TensorSpec

NAME = "compile"
DEFAULT_OPTIONS: dict[str, Any] = {"mode": "default", "fullgraph": False}


def export(subject: Subject, directory: Path, *, options: dict[str, Any]) -> dict[str, Any]:
    module = require_module(subject, NAME)
    if isinstance(module, torch.jit.ScriptModule):
        raise Skip("torch.compile cannot compile a TorchScript module; give the Python source instead")
    meta = save_python_source(subject, directory)
    meta["compile"] = {**DEFAULT_OPTIONS, **options.get("compile", {})}
    return meta


def load(directory: Path, meta: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec],
         *, device: str = "cpu") -> Runner:
    check_device(device)
    flat = FlatModel(rebuild_module(directory, meta)).to(device).eval()
    opts = meta.get("compile", DEFAULT_OPTIONS)
    compiled = torch.compile(flat, mode=opts.get("mode", "default"), fullgraph=opts.get("fullgraph", False))
    runner = module_runner(compiled, f"{NAME}/fp32", inputs, outputs, device)
    warm_up(runner, inputs, device)
    return runner


def warm_up(runner: Runner, inputs: list[TensorSpec], device: str) -> None:
    """Compile now, not on the first request: once with dynamic dims marked, once at batch 1."""
    xs = [x.to(device) for x in example_inputs(inputs)]
    for spec, x in zip(inputs, xs):
        for i in spec.dynamic_dims:
            torch._dynamo.mark_dynamic(x, i)
    runner.run(xs)
    sizes_1 = [x[:1] if spec.dynamic_dims.get(0) else x for spec, x in zip(inputs, xs)]
    runner.run([x.clone() for x in sizes_1])
