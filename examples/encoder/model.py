"""A 6-layer transformer encoder (hidden 384, 6 heads, MiniLM-sized) for the CPU benchmark and int8 tests.

Random weights are enough to measure speed and how much signal each variant keeps; `bench/cpu.py`
saves them with a fixed seed.
"""

from __future__ import annotations

import torch
from torch import nn


class TextEncoder(nn.Module):
    def __init__(self, vocab: int = 8192, dim: int = 384, heads: int = 6, layers: int = 6, max_len: int = 512,
                 classes: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = self.norm(self.tokens(ids) + self.positions(pos))
        x = self.encoder(x, src_key_padding_mask=mask == 0)
        pooled = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return {"hidden": x, "logits": self.head(pooled)}
