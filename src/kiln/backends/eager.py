"""Eager PyTorch: the fp32 reference, and a variant like any other (also in fp16/bf16, int8 through torchao,
pruned, with CUDA graphs). The artifact is the model code and its original weights; the recipe is replayed
at load, so a transform never has to survive serialisation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kiln.backends import cuda
from kiln.backends.common import Skip, Subject, check_device, rebuild_module, recipe_of, require_module, save_python_source
from kiln.runner import Runner
from kiln.signature import FlatModel
from kiln.spec import TensorSpec
from kiln.transforms import Recipe, apply

NAME = "eager"


def export(subject: Subject, directory: Path, *, options: dict[str, Any]) -> dict[str, Any]:
    module = require_module(subject, NAME)
    recipe = recipe_of(options)
    check_recipe(recipe, subject.device)
    apply(module, recipe, subject.notes)  # fail here, at build time, if the recipe does not fit the model
    return {**save_python_source(subject, directory), **recipe_meta(recipe, options)}


def check_recipe(recipe: Recipe, device: str) -> None:
    if recipe.has("cudagraphs") and not device.startswith("cuda"):
        raise Skip("CUDA graphs need a CUDA device")
    if recipe.precision == "int8-static":
        raise Skip("static int8 on the torch side is compiled by AOTInductor (aoti/int8-static)")


def recipe_meta(recipe: Recipe, options: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"recipe": recipe.tag}
    if recipe.has("cudagraphs"):
        meta["cudagraph_buckets"] = cuda.buckets_for(options.get("batch_sizes", ()))
    return meta


def load(directory: Path, meta: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec],
         *, device: str = "cpu") -> Runner:
    check_device(device)
    recipe = Recipe.parse(meta.get("recipe", "fp32"))
    flat = FlatModel(apply(rebuild_module(directory, meta), recipe)).to(device).eval()
    return module_runner(flat, f"{NAME}/{recipe.tag}", inputs, outputs, device, graphs=meta.get("cudagraph_buckets"))


def module_runner(call: Callable[..., Sequence[torch.Tensor]], variant: str, inputs: list[TensorSpec],
                  outputs: list[TensorSpec], device: str, *, graphs: Sequence[int] | None = None,
                  grad: Callable[[], Any] = torch.inference_mode) -> Runner:
    """A Runner around a torch callable `call(*tensors) -> tensors`; on CUDA through kiln.backends.cuda."""

    def run(xs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        with grad():
            return call(*xs)

    fn = cuda.wrap(run, device, graphs=graphs) if device.startswith("cuda") else run
    return Runner(variant, inputs, outputs, fn, device)
