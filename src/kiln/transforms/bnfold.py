"""BatchNorm folding: `bn(conv(x))` becomes one conv with adjusted weights and bias (eval-mode statistics).

The pattern is found on the module's FX graph (a BN whose only input is a Conv/Linear output used nowhere
else); where the model cannot be traced symbolically, each child is (a block usually traces), and adjacent pairs
inside an untraceable nn.Sequential are folded.
The model's class stays the same: the conv gets the folded parameters and the BN becomes nn.Identity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

_BN = nn.modules.batchnorm._BatchNorm
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold in place; returns how many BatchNorm layers were folded."""
    pairs = _pairs(model)
    done = 0
    for prev_name, bn_name in pairs:
        prev, bn = model.get_submodule(prev_name), model.get_submodule(bn_name)
        if not _foldable(prev, bn):
            continue
        _fold(prev, bn)
        _replace(model, bn_name, nn.Identity())
        done += 1
    return done


def _foldable(prev: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(bn, _BN) or not bn.track_running_stats or bn.running_mean is None:
        return False
    if isinstance(prev, _CONV):
        return isinstance(prev, nn.Conv2d) == isinstance(bn, nn.BatchNorm2d) and prev.out_channels == bn.num_features
    return isinstance(prev, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and prev.out_features == bn.num_features


def _fold(prev: Any, bn: Any) -> None:  # a Conv/Linear and its BatchNorm
    with torch.no_grad():
        w_bn = bn.weight if bn.affine else torch.ones_like(bn.running_mean)
        b_bn = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        if isinstance(prev, _CONV):
            w, b = fuse_conv_bn_weights(prev.weight, prev.bias, bn.running_mean, bn.running_var, bn.eps, w_bn, b_bn)
        else:
            w, b = fuse_linear_bn_weights(prev.weight, prev.bias, bn.running_mean, bn.running_var, bn.eps, w_bn, b_bn)
    prev.weight = nn.Parameter(w.detach(), requires_grad=False)
    prev.bias = nn.Parameter(b.detach(), requires_grad=False)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _pairs_from_graph(model: nn.Module) -> list[tuple[str, str]] | None:
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow, unsupported Python: fall back to nn.Sequential pairs
        return None
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(modules.get(src.target), (*_CONV, nn.Linear))
                and calls[str(src.target)] == 1 and calls[str(node.target)] == 1):  # a shared layer cannot be folded once
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _pairs(model: nn.Module, prefix: str = "") -> list[tuple[str, str]]:
    """(layer, BatchNorm) names to fold: from the FX graph where `model` traces; where it does not, adjacent pairs
    if it is an nn.Sequential, and each child's own pairs (a block of an untraceable model usually traces)."""
    pairs = _pairs_from_graph(model)
    if pairs is not None:
        return [(prefix + a, prefix + b) for a, b in pairs]
    pairs = []
    children = list(model.named_children())
    if isinstance(model, nn.Sequential):
        pairs += [(prefix + a, prefix + b) for (a, ma), (b, mb) in zip(children, children[1:])
                  if isinstance(ma, (*_CONV, nn.Linear)) and isinstance(mb, _BN)]
    for name, child in children:
        if any(isinstance(m, _BN) for m in child.modules()):
            pairs += _pairs(child, f"{prefix}{name}.")
    return pairs
