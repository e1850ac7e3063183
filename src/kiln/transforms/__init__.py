"""Model-to-model passes applied before export (see kiln.recipe for the names a variant carries)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from kiln.errors import KilnError
from kiln.recipe import PRECISIONS, Recipe

__all__ = ["PRECISIONS", "Adapted", "Recipe", "apply", "layer_kinds"]


class Adapted(nn.Module):
    """Runs `inner` in another dtype and/or memory format behind the original signature: float inputs are cast
    in, float outputs cast back to float32, so every variant keeps the fp32 TensorSpecs of the model."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype | None, channels_last: bool) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        self.channels_last = channels_last

    def forward(self, *args: Any) -> Any:
        xs = []
        for x in args:
            if self.dtype is not None and x.is_floating_point():
                x = x.to(self.dtype)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            xs.append(x)
        out = self.inner(*xs)
        return tree_map(lambda o: o.float() if isinstance(o, torch.Tensor) and o.is_floating_point() else o, out)


def apply(module: nn.Module, recipe: Recipe, notes: list[str] | None = None) -> nn.Module:
    """The eager module for `recipe` (a copy; the original is untouched). int8-static is not here: it needs
    calibration and an export (see kiln.transforms.torch_int8.static)."""
    out = copy.deepcopy(module).eval()
    if recipe.has("bnfold"):
        from kiln.transforms.bnfold import fold_batchnorm

        folded = fold_batchnorm(out)
        if notes is not None:
            notes.append(f"bnfold: folded {folded} BatchNorm layer(s)")
    if recipe.has("epilogue"):
        from kiln.transforms.epilogue import LinearGELU, is_gelu_ffn

        _fused("epilogue", replace_layers(out, is_gelu_ffn, lambda m: LinearGELU(m.dense)),
               "feed-forward Linear + GELU layer", "Linear + GELU layer(s) as one GEMM each", notes)
    if recipe.has("qkv"):
        from kiln.transforms.qkv import FusedQKVAttention, is_fusable_attention, key_only_masks

        _fused("qkv", replace_layers(out, is_fusable_attention, FusedQKVAttention),
               "self-attention layer with query, key and value projections",
               "self-attention layer(s) with Q, K and V as one GEMM each", notes)
        if key_only_masks(out) and notes is not None:
            notes.append("qkv: the padding mask handed to the fused layers as [batch, 1, 1, seq]")
    if recipe.has("convfuse"):
        from kiln.transforms import convfuse

        out, n = convfuse.fuse(out, channels_last=recipe.has("channels_last"))
        _fused("convfuse", n, "convolution followed by ReLU (directly or after a residual add)",
               "convolution(s) + bias [+ residual] + ReLU as one cuDNN call each", notes)
    prune = recipe.prune()
    if prune is not None:
        from kiln.transforms import prune as pruning

        report = pruning.magnitude(out, prune[1]) if prune[0] == "magnitude" else pruning.structured(out, prune[1])
        if notes is not None:
            notes.append(report)
    if recipe.precision == "int8-dynamic":
        from kiln.transforms.torch_int8 import dynamic

        note = dynamic(out)
        if notes is not None:
            notes.append(note)
    elif recipe.precision == "int8-static":
        raise KilnError("int8-static on the torch side needs calibration and export", hint="use the aoti backend")
    channels_last = recipe.has("channels_last")
    if recipe.dtype is not None:
        out = out.to(recipe.dtype)
    if channels_last:
        out = out.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if recipe.dtype is not None or channels_last:
        out = Adapted(out, recipe.dtype, channels_last)
    return out


_APPLIES_TO = {"epilogue": "Hugging Face encoder layers (BERT, RoBERTa, ...)",
               "qkv": "Hugging Face encoder layers (BERT, RoBERTa, ...)",
               "convfuse": "CNNs whose Conv2d outputs go straight into a ReLU, or into an add and then a ReLU (ResNets)"}


def _fused(name: str, count: int, missing: str, done: str, notes: list[str] | None) -> None:
    """A fusion pass replaced `count` layers: refuse none, note how many."""
    if not count:
        raise KilnError(f"the {name} pass found no {missing} to fuse", hint=f"it applies to {_APPLIES_TO[name]}; drop +{name}")
    if notes is not None:
        notes.append(f"{name}: {count} {done}")


def replace_layers(module: nn.Module, match: Callable[[nn.Module], bool], make: Callable[[Any], nn.Module]) -> int:
    """Replace, in place, every submodule for which `match` holds by `make(submodule)`; returns how many."""
    targets = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if match(child)]
    for parent, name, child in targets:
        setattr(parent, name, make(child))
    return len(targets)


def layer_kinds(module: nn.Module) -> dict[str, int]:
    """How many of each layer kind the model has: which passes are worth trying."""
    from kiln.transforms.epilogue import is_gelu_ffn
    from kiln.transforms.qkv import is_fusable_attention

    counts = {"batchnorm": 0, "conv": 0, "linear": 0, "gelu_ffn": 0, "self_attention": 0}
    for m in module.modules():
        if is_gelu_ffn(m):
            counts["gelu_ffn"] += 1
        if is_fusable_attention(m):
            counts["self_attention"] += 1
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            counts["batchnorm"] += 1
        elif isinstance(m, nn.modules.conv._ConvNd):
            counts["conv"] += 1
        elif isinstance(m, nn.Linear):
            counts["linear"] += 1
    return counts
