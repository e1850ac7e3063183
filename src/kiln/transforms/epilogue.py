"""`epilogue`: a transformer's feed-forward `Linear -> GELU` as one cuBLASLt GEMM whose epilogue adds the bias and
applies GELU (CUDA, fp16/bf16), instead of a GEMM followed by a pointwise kernel that reads and writes the
[tokens, 4 x hidden] activation once more.

It applies to the feed-forward "intermediate" layers of Hugging Face encoders (BERT, RoBERTa, MiniLM, ...): a
module with a `dense` Linear and a GELU `intermediate_act_fn`. cuBLASLt's epilogue is the tanh approximation of
GELU; each variant is verified against the fp32 model like every other.
Measured on an H100 (`python3 bench/gpu_levers.py --lever gelu`): BERT-base bf16, batch 64 x 128, under
torch.compile with CUDA graphs, 17,844 -> 19,987 seq/s, cosine 0.99994 either way; the profile shows why: the
separate GELU kernel was 14% of the batch's kernel time (`--lever profile`).
"""

from __future__ import annotations

import torch
from torch import nn

_GELUS = ("GELU", "GELUActivation", "GELUTanh", "NewGELUActivation", "PytorchGELUTanh", "FastGELUActivation")


@torch.library.custom_op("kiln::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(x @ weight.T + bias) in one call. A custom op, so that torch.compile keeps it whole (inductor would
    otherwise split the GELU off into a kernel of its own)."""
    y = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return y.view(*x.shape[:-1], weight.shape[0])


@linear_gelu.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class LinearGELU(nn.Module):
    """Stands in for a Hugging Face intermediate layer: the same `dense` Linear, called through `linear_gelu`."""

    def __init__(self, dense: nn.Linear) -> None:
        super().__init__()
        self.dense = dense

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        assert self.dense.bias is not None
        return linear_gelu(hidden_states, self.dense.weight, self.dense.bias)


def is_gelu_ffn(m: nn.Module) -> bool:
    """A feed-forward intermediate layer this pass can fuse: `dense` Linear with a bias, then a GELU."""
    dense = getattr(m, "dense", None)
    act = getattr(m, "intermediate_act_fn", None)
    return (isinstance(dense, nn.Linear) and dense.bias is not None and act is not None
            and type(act).__name__ in _GELUS and type(m).__name__.endswith("Intermediate"))

