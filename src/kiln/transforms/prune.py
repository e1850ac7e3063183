"""Pruning, judged like any other variant by the accuracy budget.

- magnitude: in every Conv/Linear the given fraction of weights with the smallest |w| become exactly zero
  (same shapes; the speed and size gains need a sparse runtime, the report shows whether there are any).
- structured: the given fraction of channels (lowest L1 norm) between a producing Conv/Linear and the one
  Conv/Linear that consumes it is removed, through BatchNorm and element-wise activations in between;
  the layers really shrink. Pairs are found on the FX graph; a model without such pairs is not pruned.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import Skip

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Hardswish,
                        nn.Dropout, nn.Identity, nn.ELU, nn.Mish)
_ELEMENTWISE_FUNCTIONS = {F.relu, F.gelu, F.silu, F.leaky_relu, F.hardswish, F.elu, F.mish, F.dropout, torch.relu,
                          torch.tanh, torch.sigmoid, F.relu6}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid"}


def magnitude(model: nn.Module, amount: float) -> str:
    """Zero the `amount` fraction of smallest-magnitude weights in each Conv/Linear, in place."""
    layers = [m for m in model.modules() if isinstance(m, _LAYERS)]
    if not layers:
        raise Skip("magnitude pruning needs Conv or Linear layers; this model has none")
    zeroed = total = 0
    with torch.no_grad():
        for m in layers:
            w = m.weight
            k = int(round(w.numel() * amount))
            if k:
                idx = w.detach().abs().flatten().topk(k, largest=False).indices
                w.view(-1)[idx] = 0
            zeroed += int((w == 0).sum())
            total += w.numel()
    return f"prune{round(amount * 100)}: {zeroed:,} of {total:,} Conv/Linear weights are zero ({zeroed / total:.0%}) in {len(layers)} layers"


def structured(model: nn.Module, amount: float) -> str:
    """Remove the `amount` fraction of channels between Conv/Linear pairs, in place."""
    pairs = _pairs(model)
    if not pairs:
        raise Skip("structured pruning found no Conv->Conv or Linear->Linear pair joined only by BatchNorm and "
                   "element-wise activations; use magnitude pruning (prune<P>) instead")
    before = sum(p.numel() for p in model.parameters())
    removed = channels = 0
    for producer, middle, consumer in pairs:
        prod: Any = model.get_submodule(producer)
        cons = model.get_submodule(consumer)
        n = prod.weight.shape[0]
        keep_n = max(1, n - int(round(n * amount)))
        score = prod.weight.detach().abs().flatten(1).sum(1)
        keep = score.topk(keep_n).indices.sort().values
        _set(model, producer, _slice_out(prod, keep))
        for name in middle:
            _set(model, name, _slice_bn(model.get_submodule(name), keep))
        _set(model, consumer, _slice_in(cons, keep))
        removed += n - keep_n
        channels += n
    after = sum(p.numel() for p in model.parameters())
    return (f"chprune{round(amount * 100)}: removed {removed} of {channels} channels in {len(pairs)} layer pair(s); "
            f"parameters {before:,} -> {after:,}")


def _pairs(model: nn.Module) -> list[tuple[str, list[str], str]]:
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node in graph.nodes:
        prod = modules.get(str(node.target)) if node.op == "call_module" else None
        if not _plain(prod) or calls[str(node.target)] != 1:
            continue
        middle: list[str] = []
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            mod = modules.get(str(nxt.target)) if nxt.op == "call_module" else None
            if nxt.op == "call_module" and isinstance(mod, nn.modules.batchnorm._BatchNorm) and calls[str(nxt.target)] == 1:
                middle.append(str(nxt.target))
            elif not _elementwise(nxt, mod):
                break
            if nxt.args and nxt.args[0] is not cur:
                break
            cur = nxt
        else:
            continue
        nxt = next(iter(cur.users))
        cons = modules.get(str(nxt.target)) if nxt.op == "call_module" else None
        if not _plain(cons) or calls[str(nxt.target)] != 1 or nxt.args[0] is not cur or type(cons) is not type(prod):
            continue
        pairs.append((str(node.target), middle, str(nxt.target)))
    return pairs


def _plain(m: nn.Module | None) -> bool:
    if isinstance(m, nn.Linear):
        return type(m) is nn.Linear  # not MultiheadAttention's out_proj, whose shape is fixed by the attention
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups == 1


def _elementwise(node: object, mod: nn.Module | None) -> bool:
    op, target = node.op, node.target  # type: ignore[attr-defined]
    if op == "call_module":
        return isinstance(mod, _ELEMENTWISE_MODULES)
    if op == "call_function":
        return target in _ELEMENTWISE_FUNCTIONS and target is not operator.getitem
    return op == "call_method" and target in _ELEMENTWISE_METHODS


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _slice_out(m: Any, keep: torch.Tensor) -> nn.Module:
    new: Any = _like(m, out=len(keep))
    with torch.no_grad():
        new.weight.copy_(m.weight[keep])
        if m.bias is not None:
            new.bias.copy_(m.bias[keep])
    return new


def _slice_in(m: Any, keep: torch.Tensor) -> nn.Module:
    new: Any = _like(m, inp=len(keep))
    with torch.no_grad():
        new.weight.copy_(m.weight[:, keep])
        if m.bias is not None:
            new.bias.copy_(m.bias)
    return new


def _slice_bn(bn: nn.Module, keep: torch.Tensor) -> nn.Module:
    new = type(bn)(len(keep), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats).eval()
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(bn, name)
            if t is not None:
                getattr(new, name).copy_(t[keep])
    return new


def _like(m: Any, *, out: int | None = None, inp: int | None = None) -> nn.Module:
    bias = m.bias is not None
    if isinstance(m, nn.Linear):
        new: nn.Module = nn.Linear(inp or m.in_features, out or m.out_features, bias=bias)
    else:
        new = type(m)(inp or m.in_channels, out or m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                      dilation=m.dilation, groups=1, bias=bias, padding_mode=m.padding_mode)
    return new.to(m.weight.device, m.weight.dtype).eval()
