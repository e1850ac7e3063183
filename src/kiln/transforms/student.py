"""Students for distillation, derived from a teacher and rebuilt from a plan.

- CNN-style models (Conv/Linear pairs joined by BatchNorm and activations): fewer channels per layer, a width
  multiplier. The student starts as the teacher with the least important channels removed (structured pruning),
  so it is initialised from the teacher's weights.
- Transformer encoders (a stack of identical layers in a ModuleList): every other layer, initialised from the
  teacher's (the DistilBERT recipe).

A plan (`{"keep": {stack: [indices]}, "shapes": {layer: sizes}}`) records the student's architecture, so that the
student's code can rebuild it from the teacher's class: `from_plan(Teacher(), plan)`, then load its weights.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from kiln.errors import KilnError, Skip

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def derive(teacher: nn.Module, *, width: float = 0.5) -> tuple[nn.Module, dict[str, Any], str]:
    """A student (a new module), its plan, and a sentence saying how it was made."""
    if not 0.05 <= width < 1.0:
        raise KilnError(f"width {width} must be in [0.05, 1)", hint="e.g. --width 0.5 keeps half the channels")
    stack = layer_stack(teacher)
    if stack is not None:
        name, n = stack
        keep = list(range(0, n, 2))
        student = keep_layers(copy.deepcopy(teacher), {name: keep})
        return student, {"keep": {name: keep}}, (f"every other of the {n} layers of {name} ({len(keep)} kept, "
                                                  "initialised from the teacher's: the DistilBERT recipe)")
    from kiln.transforms.prune import structured

    student = copy.deepcopy(teacher)
    try:
        report = structured(student, round(1.0 - width, 2))
    except Skip as e:
        raise KilnError(f"kiln cannot derive a student from this teacher: {e}",
                        hint="give one with --student path/model.py:Student (a smaller model with the same inputs "
                             "and outputs)") from None
    return student, {"shapes": layer_shapes(student)}, f"width x{width:g} ({report})"


def layer_stack(model: nn.Module) -> tuple[str, int] | None:
    """The first ModuleList of at least 2 layers of one class holding attention: a transformer's layer stack."""
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(x) for x in m}) == 1:
            has_attention = any(isinstance(x, nn.MultiheadAttention) or "attention" in type(x).__name__.lower()
                                for x in m[0].modules())
            if has_attention:
                return name, len(m)
    return None


def keep_layers(model: nn.Module, keep: dict[str, list[int]]) -> nn.Module:
    """Keep only the given layers of each stack, in place (nn.TransformerEncoder's num_layers follows)."""
    for name, indices in keep.items():
        stack = model.get_submodule(name)
        if not isinstance(stack, nn.ModuleList) or max(indices, default=-1) >= len(stack):
            raise KilnError(f"the plan keeps layers {indices} of {name}, which the model does not have",
                            hint="the teacher's code changed since the student was made; distill again")
        _set(model, name, nn.ModuleList([stack[i] for i in indices]))
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if isinstance(parent, nn.TransformerEncoder):
            parent.num_layers = len(indices)
    return model


def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if type(m) is nn.Linear:
            out[name] = {"in": m.in_features, "out": m.out_features}
        elif isinstance(m, _CONV):
            out[name] = {"in": m.in_channels, "out": m.out_channels}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = {"features": m.num_features}
    return out


def resize(model: nn.Module, shapes: dict[str, dict[str, int]]) -> nn.Module:
    """Replace each listed layer whose sizes differ with a fresh one of the listed sizes, in place."""
    from kiln.transforms.prune import _like, _set

    for name, want in shapes.items():
        m: Any = model.get_submodule(name)
        if "features" in want:
            if m.num_features != want["features"]:
                _set(model, name, type(m)(want["features"], eps=m.eps, momentum=m.momentum, affine=m.affine,
                                          track_running_stats=m.track_running_stats))
            continue
        have = (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels, m.out_channels)
        if have != (want["in"], want["out"]):
            _set(model, name, _like(m, inp=want["in"], out=want["out"]))
    return model


def from_plan(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """The student's architecture from a freshly built teacher: `from_plan(Teacher(), PLAN)`."""
    keep_layers(model, plan.get("keep", {}))
    return resize(model, plan.get("shapes", {}))


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
