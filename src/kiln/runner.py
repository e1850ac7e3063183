"""Runner: a loaded variant, callable on numpy arrays or tensors by position or by input name."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.spec import TensorSpec, layout_hint, out_of_range, to_tensor

BatchFn = Callable[[list[torch.Tensor]], Sequence[torch.Tensor]]

_FLOAT_KINDS = "f"
_INT_KINDS = "iu"


@dataclass
class Runner:
    """Calls one variant. Numpy in gives numpy out; tensors in give tensors out. One output comes back as an array,
    several as a tuple in the manifest's order, and a model whose forward() returns a dict gives a dict.

    >>> runner = kiln.load("models/digits")
    >>> logits = runner(np.zeros((4, 1, 8, 8), np.float32))      # or runner(image=...)
    >>> runner.named(image=x)                                      # always {output name: array}
    """

    variant: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    fn: BatchFn
    device: str = "cpu"
    info: dict[str, Any] = field(default_factory=dict)
    as_dict: bool = False
    """forward() returned a dict: calls return {output name: array} (kiln.load sets it from the manifest)"""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        numpy_out = not any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values()))
        outs = self.run(self.validate(args, kwargs))
        res = [o.float().numpy(force=True) if o.dtype == torch.bfloat16 else o.numpy(force=True) for o in outs] if numpy_out else list(outs)
        if self.as_dict:
            return {s.name: r for s, r in zip(self.outputs, res)}
        return res[0] if len(res) == 1 else tuple(res)

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The hot path: validated tensors in spec order -> outputs in spec order."""
        outs = list(self.fn(tensors))
        if len(outs) != len(self.outputs):
            raise KilnError(f"variant {self.variant} returned {len(outs)} outputs, expected {len(self.outputs)}",
                            hint="the artifact does not match its manifest; rebuild it")
        return outs

    def named(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Like calling the runner, but returns a dict keyed by output name."""
        res = self(*args, **kwargs)
        if isinstance(res, dict):
            return res
        res = res if isinstance(res, tuple) else (res,)
        return {s.name: r for s, r in zip(self.outputs, res)}

    def validate(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Match arguments to input specs and check dtype and shape, with a message that says how to fix it."""
        names = [s.name for s in self.inputs]
        if args and kwargs:
            raise KilnError("pass inputs either all by position or all by name", hint=f"inputs are {names}")
        if kwargs:
            unknown = [k for k in kwargs if k not in names]
            missing = [n for n in names if n not in kwargs]
            if unknown or missing:
                raise KilnError(f"input names do not match: unknown {unknown}, missing {missing}", hint=f"inputs are {names}")
            args = [kwargs[n] for n in names]
        if len(args) != len(self.inputs):
            raise KilnError(f"expected {len(self.inputs)} inputs ({', '.join(map(str, self.inputs))}), got {len(args)}",
                            hint="pass one array per input, in this order, or by name")
        sizes: dict[str, int] = {}
        out = []
        for spec, a in zip(self.inputs, args):
            out.append(check_tensor(spec, a, sizes))
        return out


def check_tensor(spec: TensorSpec, a: Any, sizes: dict[str, int]) -> torch.Tensor:
    """Validate one input against its spec; `sizes` binds named dims across inputs."""
    if isinstance(a, (list, tuple)):
        a = np.asarray(a)
    if not isinstance(a, (np.ndarray, torch.Tensor)):
        raise KilnError(f"input {spec.name!r} must be a numpy array or a torch tensor, got {type(a).__name__}",
                        hint=f"pass an array of shape {spec.shape}")
    got_dtype = str(a.dtype).replace("torch.", "")
    kind = _kind(a)
    want = spec.torch_dtype
    ok = (got_dtype == spec.dtype or (want.is_floating_point and kind == _FLOAT_KINDS)
          or (not want.is_floating_point and want != torch.bool and kind in _INT_KINDS))
    shape = tuple(a.shape)
    expect = f"{spec.dtype}[{','.join(map(str, spec.shape))}]"
    if not ok:
        raise KilnError(f'expected input "{spec.name}" {expect}, got {got_dtype}[{",".join(map(str, shape))}]',
                        hint=f"convert it with .astype({spec.dtype!r})" if spec.dtype != "bfloat16" else "send float32")
    if len(shape) != len(spec.shape) or not spec.matches(shape):
        hint = layout_hint(spec, shape) or ("add a batch dimension" if len(shape) == len(spec.shape) - 1 else "fix the shape")
        raise KilnError(f'expected input "{spec.name}" {expect}, got {got_dtype}[{",".join(map(str, shape))}]', hint=hint)
    if kind in _INT_KINDS and got_dtype != spec.dtype and (bad := out_of_range(spec.dtype, a)) is not None:
        info = np.iinfo(spec.dtype)
        raise KilnError(f'input "{spec.name}" is {spec.dtype}; values {bad[0]}..{bad[1]} do not fit in it',
                        hint=f"map them into {info.min}..{info.max}")
    for i, d in spec.dynamic_dims.items():
        if shape[i] == 0:
            raise KilnError(f'input "{spec.name}" has an empty dim {d!r}', hint="send at least one item")
        if sizes.setdefault(d, shape[i]) != shape[i]:
            raise KilnError(f'dim {d!r} is {sizes[d]} in an earlier input but {shape[i]} in "{spec.name}"',
                            hint="inputs that share a dim name must agree on its size")
    return to_tensor(a, spec)


def _kind(a: np.ndarray | torch.Tensor) -> str:
    if isinstance(a, np.ndarray):
        return a.dtype.kind
    if a.dtype.is_floating_point:
        return "f"
    return "b" if a.dtype == torch.bool else "i"
