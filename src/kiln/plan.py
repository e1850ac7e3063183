"""Which variants the build search tries: backend x recipe, bounded by --precision, --prune and --variants,
shaped by the model (BatchNorm to fold, convolutions for channels_last, Linear layers for int8) and the device.

On a CPU, fp16/bf16 variants are tried only where an eager run measures faster than fp32 (many CPUs
emulate them); on a GPU they are always tried. The search measures; it never assumes low precision wins.
"""

from __future__ import annotations

import fnmatch
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kiln import backends
from kiln.backends.common import Target
from kiln.errors import KilnError
from kiln.recipe import Recipe
from kiln.transforms import apply, layer_kinds

PRECISION_CHOICES = ("fp32", "fp16", "bf16", "int8", "auto")


@dataclass(frozen=True)
class Variant:
    backend: str
    recipe: Recipe

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.recipe.tag}"


def plan(backend_names: Sequence[str], *, precision: str = "auto", device: str = "cpu", module: nn.Module | None = None,
         prune: float | None = None, low_precision: Sequence[str] = ("fp16", "bf16"),
         patterns: Sequence[str] | None = None, transformable: bool = True, source_kind: str = "python",
         trim: bool = False) -> list[Variant]:
    """Every variant to try, in table order: each backend declares what it can build for this target
    (`variants(target)`), then --precision and --variants narrow the list. `low_precision` lists the float
    precisions worth trying here. Sources that are not Python code are exported as they are. With `trim` (the
    model has a mask input and pooled outputs, see kiln.transforms.trim), every variant of a backend that runs
    any sequence length (`TRIM = True`) is also tried with `+trim`.

    >>> [v.name for v in plan(["eager", "onnxruntime"], module=DigitsNet())][:2]
    ['eager/fp32', 'eager/fp32+bnfold']
    """
    if precision not in PRECISION_CHOICES:
        raise KilnError(f"unknown --precision {precision!r}", hint=f"use one of {', '.join(PRECISION_CHOICES)}")
    if prune is not None and not 0.01 <= prune <= 0.99:
        raise KilnError(f"--prune {prune} is not a fraction between 0.01 and 0.99",
                        hint="give the share of weights to remove, e.g. --prune 0.3")
    target = make_target(module, device=device, precision=precision, prune=prune, low_precision=low_precision,
                         transformable=transformable, source_kind=source_kind)
    out = [Variant(b, r) for b in backend_names for r in backends.get(b).variants(target)]
    if trim:
        out = [w for v in out for w in (v, Variant(v.backend, Recipe(v.recipe.precision, (*v.recipe.passes, "trim"))))
               if w is v or (getattr(backends.get(v.backend), "TRIM", False) and not v.recipe.has("cudagraphs")
                             and v.recipe.prune() is None)]
    out = [v for v in out if _wanted(v.recipe.precision, precision)]
    if patterns:
        out = [v for v in out if any(fnmatch.fnmatchcase(v.name, p) for p in patterns)]
    if not out:
        raise KilnError(f"no variant of {', '.join(backend_names)} matches --precision {precision}"
                        + (f" and --variants {','.join(patterns)}" if patterns else ""),
                        hint="int8 variants come from onnxruntime, aoti (static) and eager/compile (torchao, Linear layers); "
                             "fp16/bf16 from the torch backends; use --precision auto to try everything")
    return out


# Relative build cost per variant (export + load back + verify + time) on a CPU, from builds of the examples here:
# AOTInductor compiles C++ and torch.compile runs Inductor at load, both an order of magnitude above the rest.
# A backend module may declare its own COST (a plug-in that tunes, like TVM, is slow).
_COST = {"eager": 1.0, "torchscript": 1.5, "onnxruntime": 2.0, "compile": 15.0, "aoti": 25.0, "tensorrt": 30.0}
QUICK_MAX_COST = 3.0  # --quick keeps the variants at most this expensive


def cost(v: Variant) -> float:
    """A variant's expected build time, relative to eager/fp32 = 1 (static int8 calibrates, pruning re-exports)."""
    base = getattr(backends.get(v.backend), "COST", None) or _COST.get(v.backend, 5.0)
    return float(base) * (1.5 if v.recipe.precision == "int8-static" or v.recipe.prune() is not None else 1.0)


def quick(todo: list[Variant]) -> dict[str, str]:
    """--quick: why each variant that is not among the likeliest to win for its cost is left out (kept: eager,
    TorchScript, ONNX Runtime in fp32 and int8; the half precisions only where the probe measured them faster)."""
    return {v.name: f"left out by --quick (a {cost(v):.0f}x slower build than eager; run without --quick to try it)"
            for v in todo if cost(v) > QUICK_MAX_COST or v.recipe.prune() is not None}


class Estimate:
    """Time left, honestly: each variant's prior cost, scaled by how long the finished ones actually took."""

    def __init__(self, costs: list[float], *, fixed_s: float = 0.0) -> None:
        self.costs, self.fixed_s = costs, fixed_s
        self.spent_cost = 0.0
        self.spent_s = 0.0
        self.n = 0

    def finished(self, seconds: float) -> None:
        self.spent_cost += self.costs[self.n]
        self.spent_s += seconds
        self.n += 1

    def skip(self) -> None:
        """The next variant is not run (left out by the time budget): it costs nothing."""
        self.n += 1

    def left_s(self) -> float | None:
        """Seconds left for the variants not yet run, and the fixed tail; None before anything was measured."""
        return self.spent_s / self.spent_cost * sum(self.costs[self.n:]) + self.fixed_s if self.spent_cost else None

    def next_s(self) -> float | None:
        """The next variant's expected seconds."""
        return self.spent_s / self.spent_cost * self.costs[self.n] if self.spent_cost and self.n < len(self.costs) else None


def make_target(module: nn.Module | None, *, device: str = "cpu", precision: str = "auto", prune: float | None = None,
                low_precision: Sequence[str] = ("fp16", "bf16"), transformable: bool = True,
                source_kind: str = "python") -> Target:
    """What the backends are told about the model and the machine."""
    transformable = transformable and module is not None
    kinds = layer_kinds(module) if transformable and module is not None else {}  # Target's counts default to 0
    if device.startswith("cuda") and kinds.get("conv") and module is not None:
        from kiln.transforms import convfuse

        kinds["conv_relu"] = convfuse.count(apply(module, Recipe("fp32", ("bnfold",) if kinds.get("batchnorm") else ())))
    halves = tuple(p for p in ("fp16", "bf16") if (p in low_precision or precision == p) and transformable)
    return Target(device=device, source_kind=source_kind, halves=halves, prune=prune, transformable=transformable,
                  **kinds)


def _wanted(prec: str, precision: str) -> bool:
    return precision == "auto" or prec == precision or prec.split("-")[0] == precision


def probe_low_precision(module: nn.Module, examples: list[torch.Tensor], *, budget_s: float = 1.0,
                        timings: dict[str, float] | None = None) -> dict[str, str]:
    """For a CPU build: time the eager model in fp32, fp16 and bf16 on the same inputs. Returns, per half precision
    that is not faster, why its variants are left out (empty when both are worth trying). `timings`, when given,
    receives the median seconds measured per precision."""
    timings = {} if timings is None else timings
    reasons: dict[str, str] = {}
    for prec in ("fp32", "fp16", "bf16"):
        try:
            m = apply(module, Recipe(prec))
            timings[prec] = _median_s(m, examples, budget_s / 3)
        except Exception as e:  # an op without a half kernel on this CPU
            reasons[prec] = f"{prec} eager does not run on this CPU ({type(e).__name__})"
    base = timings.get("fp32")
    for prec in ("fp16", "bf16"):
        if prec in reasons or base is None:
            continue
        if timings[prec] >= 0.9 * base:
            reasons[prec] = (f"{prec} eager measured {timings[prec] * 1e3:.3g} ms vs fp32 {base * 1e3:.3g} ms on this CPU: "
                             f"not faster (--precision {prec} forces it)")
    return {p: r for p, r in reasons.items() if p != "fp32"}


def _median_s(m: nn.Module, xs: list[torch.Tensor], budget_s: float) -> float:
    samples: list[float] = []
    with torch.inference_mode():
        m(*xs)
        start = time.perf_counter()
        while len(samples) < 3 or (time.perf_counter() - start < budget_s and len(samples) < 50):
            t0 = time.perf_counter()
            m(*xs)
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)
