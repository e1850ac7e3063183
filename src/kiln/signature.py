"""A model's flat signature: tensors in (spec order), a tuple of named tensors out."""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from kiln.errors import KilnError
from kiln.spec import TensorSpec, dtype_name, example_sizes, synthetic, to_tensor


class FlatModel(nn.Module):
    """Wraps a model so every backend sees `forward(*tensors) -> tuple[Tensor, ...]`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(tree_flatten(self.model(*args))[0])


def own_frame(flat: FlatModel) -> FlatModel:
    """`flat` with a forward of its own code object, for torch.compile.

    Dynamo keeps compiled code per Python code object, at most `torch._dynamo.config.recompile_limit` (8) entries,
    and past that runs the frame eagerly without a word. Every FlatModel shares one forward, so in a process that
    compiles many (a build's variants and their verification shapes, a server with several models) the ninth one ran
    eager ATen kernels under kiln's CUDA graphs: BERT's selected compile variant made 16,555 seq/s after a full build
    in bench/gpu.py, where the same variant loaded alone makes 19,877 (bench/gpu_levers.py --lever kiln). A copy of
    the code object per loaded model gives each model its own cache and its own limit; Inductor's FX graph cache
    still matches identical graphs, so a second load compiles as fast as before."""
    base = FlatModel.forward
    name = f"forward_{id(flat):x}"
    code = base.__code__.replace(co_name=name, co_qualname=f"FlatModel.{name}")
    forward = types.FunctionType(code, base.__globals__, name, base.__defaults__, base.__closure__)
    flat.__class__ = type("FlatModel", (FlatModel,), {"forward": forward, "__module__": FlatModel.__module__})
    return flat


def output_names(out: Any) -> list[str]:
    """Dict keys for dict outputs, `output` for a single tensor, else `output0`, `output1`, ..."""
    leaves, _ = tree_flatten(out)
    if isinstance(out, dict) and len(out) == len(leaves):
        return [str(k) for k in out]
    if len(leaves) == 1:
        return ["output"]
    return [f"output{i}" for i in range(len(leaves))]


def example_inputs(specs: list[TensorSpec], *, scale: int = 0, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    sizes = example_sizes(specs, scale=scale)
    return [to_tensor(synthetic(s, sizes, rng), s) for s in specs]


def run_module(model: nn.Module, inputs: list[torch.Tensor]) -> Any:
    with torch.no_grad():
        try:
            return model(*inputs)
        except Exception as e:
            raise KilnError(
                f"the model failed on example inputs {', '.join(f'{tuple(t.shape)} {t.dtype}' for t in inputs)}: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                hint="check --input (names, order, dtypes and shapes must match forward())",
            ) from None


def discover_outputs(model: nn.Module, inputs: list[TensorSpec]) -> tuple[list[TensorSpec], bool]:
    """Run the model at two sets of dynamic sizes and name each output dim that follows an input dim.
    Also says whether forward() returns a dict (of tensors, by name)."""
    runs = []
    for scale in (0, 1):
        sizes = example_sizes(inputs, scale=scale)
        out = run_module(model, example_inputs(inputs, scale=scale))
        leaves, _ = tree_flatten(out)
        bad = [type(x).__name__ for x in leaves if not isinstance(x, torch.Tensor)]
        if bad:
            raise KilnError(f"the model returns non-tensor values ({', '.join(bad)})",
                            hint="return a tensor, a tuple/list of tensors or a dict of tensors")
        runs.append((sizes, out, leaves))
    names = output_names(runs[0][1])
    specs = []
    for i, name in enumerate(names):
        a, b = runs[0][2][i], runs[1][2][i]
        if a.dim() != b.dim():
            raise KilnError(f"output {name!r} changes rank with the input sizes", hint="kiln needs a fixed output rank")
        shape: list[int | str] = []
        for k, (da, db) in enumerate(zip(a.shape, b.shape)):
            if da == db:
                shape.append(int(da))
                continue
            dim = next((n for n in runs[0][0] if runs[0][0][n] == da and runs[1][0][n] == db), None)
            shape.append(dim or f"{name}_dim{k}")
        specs.append(TensorSpec(name, dtype_name(a.dtype), tuple(shape)))
    out0 = runs[0][1]
    return specs, isinstance(out0, dict) and len(out0) == len(runs[0][2])


def is_classifier(spec: TensorSpec) -> bool:
    """A 2-D floating output with more than one class column: top-1 agreement is meaningful."""
    return len(spec.shape) == 2 and isinstance(spec.shape[1], int) and spec.shape[1] > 1 and spec.torch_dtype.is_floating_point
