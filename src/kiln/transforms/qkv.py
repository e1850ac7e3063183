"""`qkv`: a transformer self-attention layer's Q, K and V projections as one GEMM (their weights concatenated), then
scaled-dot-product attention, instead of three GEMMs over the same input.

It applies to the self-attention layers of Hugging Face encoders (BERT, RoBERTa, MiniLM, ...): a module named
`*SelfAttention` with `query`, `key` and `value` Linear layers (with biases) over the same input, absolute position
embeddings and no decoder role. The replacement takes the mask the encoder passes in (additive or boolean, as
SDPA takes it) and returns `(output, None)` where the layer returned `(output, attention weights or None)`.
It is exact up to rounding (the same products, one call); each variant is verified against the fp32 model.
Measured on an H100 (`python3 bench/gpu_levers.py --lever qkv`): BERT-base bf16 with the `epilogue` pass, batch
64 x 128, CUDA graphs: 3,050 -> 3,000 us of kernels per batch (one 2,304-column GEMM where there were three of 768).

Where every self-attention layer of an encoder was replaced, `key_only_masks` also hands those layers the padding
mask as [batch, 1, 1, seq] instead of the [batch, 1, seq, seq] the encoder expands it to: the expanded rows are
all the same (a padded key is masked for every query), so this is exact, and SDPA reads one row instead of seq.
Measured on an H100 at BERT's shape (`python3 bench/gpu_attention.py`): 47.7 -> 28.7 us per attention call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class FusedQKVAttention(nn.Module):
    """Stands in for a Hugging Face self-attention layer: one `qkv` Linear, then SDPA over the heads."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        q, k, v = attn.query, attn.key, attn.value
        assert isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(v, nn.Linear)
        self.qkv = nn.Linear(q.in_features, 3 * q.out_features, dtype=q.weight.dtype, device=q.weight.device)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            self.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        self.heads = int(attn.num_attention_heads)  # type: ignore[arg-type]
        self.size = int(attn.attention_head_size)  # type: ignore[arg-type]
        self.scale = float(getattr(attn, "scaling", self.size ** -0.5))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                head_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if head_mask is not None:  # transformers 4.x passes the head mask third; 5.x passes everything by keyword
            raise ValueError("the qkv pass does not apply head masks; build without +qkv")
        b, s, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(b, s, 3, self.heads, self.size).permute(2, 0, 3, 1, 4).unbind(0)
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(q.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.scale)
        return out.transpose(1, 2).reshape(b, s, self.heads * self.size), None


def is_fusable_attention(m: nn.Module) -> bool:
    """A Hugging Face encoder self-attention layer this pass can replace."""
    linears = [getattr(m, n, None) for n in ("query", "key", "value")]
    if not type(m).__name__.endswith("SelfAttention") or not all(isinstance(x, nn.Linear) and x.bias is not None
                                                                 for x in linears):
        return False
    q, k, v = linears
    heads, size = getattr(m, "num_attention_heads", None), getattr(m, "attention_head_size", None)
    config = getattr(m, "config", None)
    return (isinstance(heads, int) and isinstance(size, int) and q.out_features == heads * size  # type: ignore[union-attr]
            and k.out_features == v.out_features == q.out_features  # type: ignore[union-attr]
            and k.in_features == v.in_features == q.in_features  # type: ignore[union-attr]
            and getattr(m, "position_embedding_type", "absolute") == "absolute"
            and not getattr(m, "is_decoder", False) and not getattr(m, "is_causal", False)
            and not getattr(config, "output_attentions", False))


def key_only_masks(model: nn.Module) -> int:
    """Make each Hugging Face encoder in `model` whose self-attention layers are all `FusedQKVAttention` pass a 2-D
    `attention_mask` to them as `[batch, 1, 1, seq]` (boolean, True = attend); returns how many encoders. A mask
    the caller gives already expanded (4-D) passes through as the encoder makes it."""
    count = 0
    for m in model.modules():
        make = getattr(m, "_create_attention_masks", None)
        config = getattr(m, "config", None)
        if (not callable(make) or getattr(config, "is_decoder", True) or getattr(config, "add_cross_attention", False)
                or not any(isinstance(x, FusedQKVAttention) for x in m.modules())
                or any(type(x).__name__.endswith("SelfAttention") for x in m.modules())):
            continue
        m._create_attention_masks = functools.partial(_key_only, make)  # type: ignore[assignment]
        count += 1
    return count


def _key_only(make: Callable[..., tuple[Any, Any]], *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    mask, cross = make(*args, **kwargs)
    given = kwargs.get("attention_mask", args[0] if args else None)
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and isinstance(given, torch.Tensor) and given.dim() == 2:
        mask = given[:, None, None, :].bool()
    return mask, cross
