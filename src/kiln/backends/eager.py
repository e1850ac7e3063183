"""Eager PyTorch: the fp32 reference, and a variant like any other (also in fp16/bf16, int8 through torchao,
pruned, with CUDA graphs). The artifact is the model code and its original weights; the recipe is replayed
at load, so a transform never has to survive serialisation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
from kiln.errors import Skip
from kiln.recipe import Recipe
from kiln.runner import Runner
from kiln.signature import FlatModel
from kiln.spec import TensorSpec
from kiln.transforms import apply

NAME = "eager"
TRIM = True  # runs any sequence length: +trim variants (kiln.transforms.trim) apply
RANK = 10


def variants(t: Target) -> list[Recipe]:
    """The untouched fp32 reference always first; then folding, channels_last (CPU), halves, CUDA graphs, torchao int8."""
    out = [Recipe("fp32")]
    if t.fold:
        out.append(Recipe("fp32", t.fold))
    if t.channels_last and not t.cuda:
        out.append(Recipe("fp32", (*t.fold, *t.channels_last)))
    out += [Recipe(h, (*t.fold, *t.channels_last)) for h in t.halves]
    if t.cuda and t.halves:
        out.append(Recipe(t.halves[0], (*t.fold, *t.channels_last, "cudagraphs")))
        if t.fused:  # the fused kernels need no compiler: cuDNN's fused convolution, cuBLASLt's GELU epilogue
            out.append(Recipe(t.halves[0], (*t.fold, *t.channels_last, *t.fused, "cudagraphs")))
    if t.linear:
        out.append(Recipe("int8-dynamic", t.fold))
    return out + t.pruned(*t.fold)


def export(subject: Subject, directory: Path, *, options: dict[str, Any]) -> dict[str, Any]:
    module = require_module(subject, NAME)
    recipe = recipe_of(options)
    check_recipe(recipe, subject.device)
    apply(module, recipe, subject.notes)  # fail here, at build time, if the recipe does not fit the model
    return {**save_python_source(subject, directory), **recipe_meta(recipe, options)}


def check_recipe(recipe: Recipe, device: str) -> None:
    if recipe.has("cudagraphs") and not device.startswith("cuda"):
        raise Skip("CUDA graphs need a CUDA device")
    if recipe.has("epilogue") and (not device.startswith("cuda") or recipe.precision not in ("fp16", "bf16")):
        raise Skip("the epilogue pass is a cuBLASLt GEMM epilogue: CUDA, fp16 or bf16")
    if recipe.has("convfuse") and not device.startswith("cuda"):
        raise Skip("the convfuse pass is cuDNN's fused convolution: CUDA only")
    if recipe.precision == "int8-static":
        raise Skip("static int8 on the torch side is compiled by AOTInductor (aoti/int8-static)")


def recipe_meta(recipe: Recipe, options: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"recipe": recipe.tag}
    if recipe.has("cudagraphs"):
        from kiln.backends import cuda

        meta["cudagraph_buckets"] = cuda.buckets_for(options.get("batch_sizes", ()))
    return meta


def load(directory: Path, meta: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec],
         *, device: str = "cpu", threads: int | None = None) -> Runner:
    check_device(device)
    recipe = Recipe.parse(meta.get("recipe", "fp32"))
    flat = FlatModel(apply(rebuild_module(directory, meta), recipe)).to(device).eval()
    return module_runner(flat, f"{NAME}/{recipe.tag}", inputs, outputs, device, graphs=meta.get("cudagraph_buckets"))

