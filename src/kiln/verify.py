"""Verification: every variant against the fp32 eager reference, per output, inside a budget."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kiln.signature import is_classifier
from kiln.spec import TensorSpec


@dataclass(frozen=True)
class Budget:
    """How far a variant may stray from the reference. `tolerance` bounds max|a-b| / max|ref|."""

    tolerance: float = 1e-3
    min_cosine: float = 0.999
    min_top1_agreement: float = 0.99
    # fp16/bf16 keep 3 significant digits (bf16 fewer): a looser error bound, the same cosine.
    half_tolerance: float = 0.05
    half_min_cosine: float = 0.999
    half_min_top1_agreement: float = 0.99
    # int8 and pruned variants are judged by how much of the signal survives, not by a rounding-error bound.
    int8_tolerance: float = 0.5
    int8_min_cosine: float = 0.99
    int8_min_top1_agreement: float = 0.97

    def for_recipe(self, precision: str, lossy: bool = False) -> Budget:
        """The budget a variant is judged by: lossy (int8, pruned), half (fp16/bf16) or this one."""
        if precision.startswith("int8") or lossy:
            return Budget(self.int8_tolerance, self.int8_min_cosine, self.int8_min_top1_agreement)
        if precision in ("fp16", "bf16"):
            return Budget(self.half_tolerance, self.half_min_cosine, self.half_min_top1_agreement)
        return self


@dataclass
class OutputCheck:
    name: str
    max_abs_err: float
    max_rel_err: float
    cosine: float
    top1_agreement: float | None = None
    accuracy: float | None = None
    reference_accuracy: float | None = None
    nonfinite: int = 0
    shape_mismatch: str | None = None
    """Set when the variant's output has another shape than the reference's: then no number is meaningful."""


def compare(outputs: list[TensorSpec], reference: list[list[np.ndarray]], got: list[list[np.ndarray]],
            labels: np.ndarray | None = None) -> list[OutputCheck]:
    """`reference[b][k]` is output k of batch b; batches are concatenated before measuring."""
    checks = []
    for k, spec in enumerate(outputs):
        # Batches may differ in non-batch dims (seq): measure over all elements, rows only for classifiers.
        wrong = next(((rb[k].shape, gb[k].shape) for rb, gb in zip(reference, got) if rb[k].shape != gb[k].shape), None)
        if wrong is not None:
            checks.append(OutputCheck(spec.name, float("nan"), float("nan"), float("nan"),
                                      shape_mismatch=f"shape {list(wrong[1])} where the reference has {list(wrong[0])}"))
            continue
        r = np.concatenate([b[k].astype(np.float64).ravel() for b in reference])
        g = np.concatenate([b[k].astype(np.float64).ravel() for b in got])
        bad = int(np.count_nonzero(~np.isfinite(g) & np.isfinite(r)))
        both = np.isfinite(g) & np.isfinite(r)
        diff = np.abs(r - g)[both]
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(r[both]).max()) if diff.size else 0.0
        rf, gf = np.where(both, r, 0), np.where(both, g, 0)
        denom = float(np.linalg.norm(rf) * np.linalg.norm(gf))
        cosine = float(rf @ gf / denom) if denom > 0 else (1.0 if max_abs == 0 else 0.0)
        check = OutputCheck(spec.name, max_abs, max_abs / scale if scale > 0 else max_abs, cosine, nonfinite=bad)
        if is_classifier(spec):
            top_r = np.concatenate([b[k].argmax(1) for b in reference])
            top_g = np.concatenate([b[k].argmax(1) for b in got])
            check.top1_agreement = float((top_r == top_g).mean())
            if labels is not None and k == 0 and len(labels) == len(top_g):
                check.accuracy = float((top_g == labels).mean())
                check.reference_accuracy = float((top_r == labels).mean())
        checks.append(check)
    return checks


def judge(checks: list[OutputCheck], budget: Budget) -> list[str]:
    """Every way the variant breaks the budget; empty when accepted."""
    problems = []
    for c in checks:
        if c.shape_mismatch:
            problems.append(f"{c.name}: {c.shape_mismatch}")
            continue
        if c.nonfinite:
            problems.append(f"{c.name}: {c.nonfinite} NaN/inf values where the reference is finite")
        if not c.max_rel_err <= budget.tolerance:
            problems.append(f"{c.name}: relative error {c.max_rel_err:.2e} > tolerance {budget.tolerance:.3g}")
        if not c.cosine >= budget.min_cosine:
            problems.append(f"{c.name}: cosine {c.cosine:.5f} < {budget.min_cosine}")
        if c.top1_agreement is not None and c.top1_agreement < budget.min_top1_agreement:
            problems.append(f"{c.name}: top-1 agreement {c.top1_agreement:.3f} < {budget.min_top1_agreement}")
    return problems


def to_dict(checks: list[OutputCheck]) -> list[dict[str, Any]]:
    """JSON-ready checks: a shape mismatch keeps its text and drops the meaningless numbers."""
    out = []
    for c in checks:
        d = {k: v for k, v in asdict(c).items() if v is not None}
        if c.shape_mismatch:
            d = {"name": c.name, "shape_mismatch": c.shape_mismatch}
        out.append(d)
    return out
