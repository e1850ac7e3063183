"""The GPU benchmark's models, as kiln sources: `bench/gpu_models.py:resnet50` and `bench/gpu_models.py:BertEncoder`.
Random weights (the benchmark saves them with a fixed seed); torchvision and transformers are imported lazily."""

from __future__ import annotations

import torch
from torch import nn


def resnet50() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None)


class BertEncoder(nn.Module):
    """BERT-base (12 layers, hidden 768) through transformers, SDPA attention; returns the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.bert = BertModel(BertConfig(attn_implementation="sdpa"), add_pooling_layer=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
