"""Tiny deterministic models the tests build. Each is a source: tests/zoo.py:<Name>."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The --input specs for each model, in forward() order.
SPECS: dict[str, list[str]] = {
    "MLP": ["x:float32[batch,16]"],
    "ConvBN": ["image:float32[batch,3,16,16]"],
    "Branchy": ["x:float32[batch,8]"],
    "Encoder": ["ids:int64[batch,seq]@0..99", "mask:int64[batch,seq]@0..1"],
    "TwoInTwoOut": ["a:float32[batch,4]", "b:float32[batch,6]"],
}
# Eager-only models for serving tests (their Python-level behaviour cannot be exported).
SERVE_SPECS: dict[str, list[str]] = {"Poison": ["x:float32[batch,4]"], "Slow": ["x:float32[batch,4]"]}


def seeded(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    m = cls()
    for mod in m.modules():  # non-trivial BatchNorm statistics, so folding or dropping them would show
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(image))), 1).flatten(1))


class Branchy(nn.Module):
    """Data-dependent control flow: a trace bakes in whichever branch the example took."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x) * 2.0
        return self.fc(x) - 1.0


class Encoder(nn.Module):
    """Transformer-style encoder: int64 token ids and an attention mask, dynamic batch and sequence."""

    def __init__(self, vocab: int = 100, dim: int = 32, heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.cls = nn.Linear(dim, 2)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = ids.shape
        h = self.tok(ids) + self.pos(torch.arange(s, device=ids.device))[None]
        q, k, v = self.qkv(h).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        # Additive mask: padded keys get a large negative score (not -inf, so a fully padded row stays finite).
        bias = (1.0 - mask[:, None, None, :].to(h.dtype)) * -1e4
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        h = self.norm1(h + self.out(att.transpose(1, 2).reshape(b, s, -1)))
        h = self.norm2(h + self.ff(h))
        m = mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return h, self.cls(pooled)


class PooledEncoder(Encoder):
    """The encoder's pooled head only (a sentence classifier): no output carries the sequence dim, so `+trim`
    variants apply."""

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(ids, mask)[1]


class MaskBlind(PooledEncoder):
    """Pools over every position, padding included: cutting the padding changes its output, and `+trim` must be
    rejected by verification."""

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))[None]
        return self.cls(self.norm2(h + self.ff(h)).mean(1)) + 0 * mask[:, :1].to(h.dtype)


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.a(a) + self.b(b))
        return {"embedding": h, "score": self.head(h).sum(-1, keepdim=True)}


def raising_factory() -> nn.Module:
    raise ValueError("this factory needs a config file")


def not_a_module() -> int:
    return 42


class Poison(nn.Module):
    """Fails on any row holding 13: lets the server tests prove one bad request fails alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == 13).any()):
            raise ValueError("poisoned input: 13")
        return x * 2.0


class Slow(nn.Module):
    """Takes 300 ms per execution: for queueing, timeouts, overload and graceful drain."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(0.3)
        return x + 1.0
