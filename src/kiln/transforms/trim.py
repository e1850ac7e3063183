"""`trim`: a runtime pass that cuts a batch's trailing padding before the model sees it.

Tokenizers pad every row of a batch to one length (`padding="max_length"`, or a client's fixed 64/128/512), and a
transformer spends its time on every position, padded or not. When a model has a mask input (`attention_mask`,
a valid prefix of ones per row) and no output carries the sequence dim (pooled embeddings, sentence logits), the
columns past the batch's longest row change nothing a caller sees: with `+trim` the runner cuts them from the
mask and from every input sharing its sequence dim, and calls the variant on the shorter batch.

That is exact only for a model that ignores masked positions. kiln does not assume it: a `+trim` variant is
verified like every other one against the untrimmed fp32 reference, and the build refuses it when no
verification batch had trailing padding to cut (nothing would have been checked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kiln.runner import Runner
from kiln.spec import TensorSpec, is_mask_input


@dataclass(frozen=True)
class Trim:
    mask: int  # index of the mask among the inputs
    dim: str  # the sequence dim's name
    axes: tuple[int | None, ...]  # per input: the axis carrying `dim`, or None

    def length(self, xs: Sequence[torch.Tensor]) -> int:
        """The batch's longest row: one past the last column where any row's mask is set (at least 1)."""
        m = xs[self.mask]
        axis = self.axes[self.mask]
        assert axis is not None
        used = m.ne(0).movedim(axis, -1).reshape(-1, m.shape[axis]).any(0)
        idx = used.nonzero()
        return int(idx[-1]) + 1 if len(idx) else 1

    def cut(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        n = self.length(xs)
        return [x if a is None or x.shape[a] == n else x.narrow(a, 0, n).contiguous() for x, a in zip(xs, self.axes)]


def plan(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> Trim | None:
    """How to trim this signature, or None: it needs one mask input with a named dynamic sequence dim (besides
    the batch dim) that no output carries."""
    masks = [i for i, s in enumerate(inputs) if is_mask_input(s)]
    if len(masks) != 1:
        return None
    spec = inputs[masks[0]]
    seq = [d for axis, d in spec.dynamic_dims.items() if axis != 0]
    if len(seq) != 1 or any(seq[0] in o.dynamic_dims.values() for o in outputs):
        return None
    dim = seq[0]
    axes = tuple(next((a for a, d in s.dynamic_dims.items() if d == dim), None) for s in inputs)
    return Trim(masks[0], dim, axes)


def reason(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> str | None:
    """Why this signature cannot be trimmed (None when it can)."""
    if plan(inputs, outputs) is not None:
        return None
    return ("trim needs one input named like a mask with a dynamic sequence dim that no output carries "
            "(per-token outputs keep their padding)")


def wrap(runner: Runner) -> Runner:
    """The runner, calling its variant on trimmed batches."""
    t = plan(runner.inputs, runner.outputs)
    if t is None:
        raise ValueError(reason(runner.inputs, runner.outputs))
    inner = runner.fn

    def fn(xs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        return inner(t.cut(xs))

    runner.fn = fn
    runner.info["trim"] = {"mask": runner.inputs[t.mask].name, "dim": t.dim}
    return runner


def exercised(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], batches: Sequence[Sequence[torch.Tensor]]) -> bool:
    """Whether trimming cuts anything from at least one of these batches (so verifying on them checks it)."""
    t = plan(inputs, outputs)
    if t is None:
        return False
    axis = t.axes[t.mask]
    assert axis is not None
    return any(t.length(b) < b[t.mask].shape[axis] for b in batches)
