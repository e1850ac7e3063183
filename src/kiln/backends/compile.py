"""torch.compile at load time: the artifact is the model code, its weights, the recipe and the compile mode.

Modes: `default`, or `max-autotune` (the recipe's `max-autotune` pass: Inductor benchmarks Triton GEMM
templates against cuBLAS). Convolutions stay with cuDNN (`max_autotune_conv_backends="ATEN"`): autotuning
Triton conv templates costs ~10 s per conv shape and on an H100 they lost to cuDNN in every case we saw. CUDA
graphs come from kiln's own bucketed graphs (`cudagraphs` pass), so one compiled graph serves every bucket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kiln.backends.common import (
    Subject,
    Target,
    check_device,
    module_runner,
    rebuild_module,
    recipe_of,
    require_module,
    save_python_source,
)
from kiln.backends.eager import check_recipe, recipe_meta
from kiln.errors import Skip
from kiln.recipe import Recipe
from kiln.runner import Runner
from kiln.signature import FlatModel, example_inputs, own_frame
from kiln.spec import TensorSpec
from kiln.transforms import apply

NAME = "compile"
RANK = 50


def variants(t: Target) -> list[Recipe]:
    out = [Recipe("fp32", t.fold)]
    for h in t.halves:
        out.append(Recipe(h, (*t.fold, *t.channels_last)))
        if t.cuda:
            out.append(Recipe(h, (*t.fold, *t.channels_last, "cudagraphs")))
            if t.fused:
                out.append(Recipe(h, (*t.fold, *t.channels_last, *t.fused, "cudagraphs")))
    if t.cuda and t.halves:
        out.append(Recipe(t.halves[0], (*t.fold, *t.channels_last, "max-autotune", "cudagraphs")))
    if t.linear:
        out.append(Recipe("int8-dynamic", t.fold))
    return out
DEFAULT_OPTIONS: dict[str, Any] = {"mode": "default", "fullgraph": False}


def export(subject: Subject, directory: Path, *, options: dict[str, Any]) -> dict[str, Any]:
    module = require_module(subject, NAME)
    if isinstance(module, torch.jit.ScriptModule):
        raise Skip("torch.compile cannot compile a TorchScript module; give the Python source instead")
    recipe = recipe_of(options)
    check_recipe(recipe, subject.device)
    apply(module, recipe, subject.notes)
    meta = {**save_python_source(subject, directory), **recipe_meta(recipe, options)}
    mode = "max-autotune" if recipe.has("max-autotune") else "default"
    meta["compile"] = {**DEFAULT_OPTIONS, "mode": mode, **options.get("compile", {})}
    return meta


def load(directory: Path, meta: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec],
         *, device: str = "cpu", threads: int | None = None) -> Runner:
    check_device(device)
    recipe = Recipe.parse(meta.get("recipe", "fp32"))
    flat = own_frame(FlatModel(apply(rebuild_module(directory, meta), recipe)).to(device).eval())
    opts = meta.get("compile", DEFAULT_OPTIONS)
    static = opts.get("mode") == "max-autotune"
    if static:  # kernels tuned for each bucket's exact shape (tuning for a symbolic batch picked slow GEMMs for BERT)
        compiled = torch.compile(flat, fullgraph=opts.get("fullgraph", False), dynamic=False,
                                 options={"max_autotune": True, "max_autotune_conv_backends": "ATEN"})
    else:
        compiled = torch.compile(flat, mode=opts.get("mode", "default"), fullgraph=opts.get("fullgraph", False))
    runner = module_runner(compiled, f"{NAME}/{recipe.tag}", inputs, outputs, device, graphs=meta.get("cudagraph_buckets"))
    warm_up(runner, inputs, device, dynamic=not static)
    return runner


def warm_up(runner: Runner, inputs: list[TensorSpec], device: str, *, dynamic: bool = True) -> None:
    """Compile now, not on the first request: once with dynamic dims marked, once at batch 1."""
    xs = [x.to(device) for x in example_inputs(inputs)]
    for spec, x in zip(inputs, xs):
        for i in spec.dynamic_dims if dynamic else ():
            torch._dynamo.maybe_mark_dynamic(x, i)  # a hint: a model that specialises a dim still compiles
    runner.run(xs)
    sizes_1 = [x[:1] if spec.dynamic_dims.get(0) else x for spec, x in zip(inputs, xs)]
    runner.run([x.clone() for x in sizes_1])
