"""Recipe: the precision and passes that name a variant after its backend, e.g. `fp16+bnfold+channels_last`.

A variant is `backend/recipe`, e.g. `aoti/int8-static`, `eager/fp16+channels_last+cudagraphs`,
`onnxruntime/fp32+prune30`. The recipe's precision is one of PRECISIONS; its passes run in order:

- `bnfold`          BatchNorm folded into the Conv/Linear before it (exact up to rounding)
- `prune<P>`        magnitude pruning: the P% smallest weights of every Conv/Linear set to zero
- `chprune<P>`      structured pruning: P% of the channels between two Conv/Linear layers removed
- `channels_last`   NHWC memory format for 4-D inputs and weights
- `epilogue`        a transformer FFN's Linear + GELU as one cuBLASLt GEMM with a GELU epilogue (CUDA, fp16/bf16;
                    see kiln.transforms.epilogue)
- `qkv`             a transformer self-attention's Q, K and V projections as one GEMM (see kiln.transforms.qkv)
- `convfuse`        a convolution + bias [+ residual add] + ReLU as one cuDNN call (CUDA; see kiln.transforms.convfuse)
- `cudagraphs`      CUDA graphs per batch bucket (runtime option, CUDA only)
- `max-autotune`    torch.compile mode max-autotune (runtime option, compile backend)
- `trim`            a batch's trailing padding cut before the call (runtime option; models with a mask input
                    whose outputs have no sequence dim; see kiln.transforms.trim)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kiln.errors import KilnError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "fp16", "bf16", "int8-dynamic", "int8-static")
RUNTIME_PASSES = ("cudagraphs", "max-autotune", "trim")
_PASS = re.compile(r"^(bnfold|channels_last|epilogue|qkv|convfuse|cudagraphs|max-autotune|trim|(ch)?prune([1-9][0-9]?))$")


@dataclass(frozen=True)
class Recipe:
    precision: str = "fp32"
    passes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise KilnError(f"unknown precision {self.precision!r}", hint=f"use one of {', '.join(PRECISIONS)}")
        bad = [p for p in self.passes if not _PASS.match(p)]
        if bad:
            raise KilnError(f"unknown transform {bad[0]!r}", hint="see `kiln build --help` for the passes")

    @property
    def tag(self) -> str:
        return "+".join((self.precision, *self.passes))

    @classmethod
    def parse(cls, tag: str) -> Recipe:
        precision, *passes = tag.split("+")
        return cls(precision, tuple(passes))

    def has(self, name: str) -> bool:
        return name in self.passes

    def without(self, name: str) -> Recipe:
        """This recipe less one pass (what a backend exports when kiln applies that pass itself, e.g. `trim`)."""
        return Recipe(self.precision, tuple(p for p in self.passes if p != name))

    @property
    def dtype(self) -> torch.dtype | None:
        """The torch dtype the model runs in, for fp16/bf16 (None otherwise)."""
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)

    def prune(self) -> tuple[str, float] | None:
        for p in self.passes:
            m = _PASS.match(p)
            if m and m.group(3):
                return ("structured" if m.group(2) else "magnitude", int(m.group(3)) / 100)
        return None
