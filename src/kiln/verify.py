"""Verification: every variant against the fp32 reference, per output, judged by what the output is.

Each output has a kind, declared (`--output NAME:KIND`, `[[outputs]]` in kiln.toml) or inferred:

- `logits`: a classifier's scores: top-1 (and top-5) agreement, accuracy against labels, error and cosine.
- `embedding`: vectors compared by direction: cosine per row (mean and worst) and retrieval agreement (each
  row's nearest neighbour among the others is unchanged). Its argmax means nothing, so top-1 is never used.
- `regression`: values: relative error and cosine.
- `mask`: per-pixel scores [batch, classes, ...] or [batch, ...]: pixel agreement of the argmax (or sign).
- `boxes`: [..., 4] corner boxes: mean IoU against the reference's boxes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kiln.spec import TensorSpec

_NAME_HINTS = (  # substrings of an output's name that say what it is, most specific first
    ("embedding", ("embed", "pooler", "pooled", "sentence", "vector", "feature")),
    ("boxes", ("box",)),
    ("mask", ("mask", "segment")),
    ("logits", ("logit", "score", "prob", "class")),
)


@dataclass(frozen=True)
class Budget:
    """How far a variant may stray from the reference. `tolerance` bounds max|a-b| / max|ref|.

    `min_agreement` bounds top-1 agreement (logits), pixel agreement (mask) and mean IoU (boxes);
    `min_retrieval` bounds nearest-neighbour agreement (embedding).
    """

    tolerance: float = 1e-3
    min_cosine: float = 0.999
    min_top1_agreement: float = 0.99
    min_retrieval: float = 0.99
    # fp16/bf16 keep 3 significant digits (bf16 fewer): a looser error bound, the same cosine.
    half_tolerance: float = 0.05
    half_min_cosine: float = 0.999
    half_min_top1_agreement: float = 0.99
    half_min_retrieval: float = 0.95
    # int8 and pruned variants are judged by how much of the signal survives, not by a rounding-error bound.
    int8_tolerance: float = 0.5
    int8_min_cosine: float = 0.99
    int8_min_top1_agreement: float = 0.97
    int8_min_retrieval: float = 0.9

    def for_recipe(self, precision: str, lossy: bool = False) -> Budget:
        """The budget a variant is judged by: lossy (int8, pruned), half (fp16/bf16) or this one."""
        if precision.startswith("int8") or lossy:
            return Budget(self.int8_tolerance, self.int8_min_cosine, self.int8_min_top1_agreement, self.int8_min_retrieval)
        if precision in ("fp16", "bf16"):
            return Budget(self.half_tolerance, self.half_min_cosine, self.half_min_top1_agreement, self.half_min_retrieval)
        return self


def infer_kind(spec: TensorSpec, reference: list[np.ndarray] | None = None) -> tuple[str, str]:
    """(kind, why) for an output nobody declared. Conservative: when nothing says otherwise a 2-D score
    matrix is judged as logits, the strictest reading (top-1 on top of error and cosine)."""
    if spec.kind:
        return spec.kind, "declared"
    floating = spec.dtype in ("float32", "float16", "bfloat16", "float64")
    if not floating:
        return "regression", f"{spec.dtype} values are compared exactly"
    name = spec.name.lower()
    for kind, words in _NAME_HINTS:
        word = next((w for w in words if w in name), None)
        if word and _fits(kind, spec):
            return kind, f"its name contains {word!r}"
    if reference and len(spec.shape) >= 2 and isinstance(spec.shape[-1], int):
        rows = np.concatenate([r.reshape(-1, r.shape[-1]) for r in reference]).astype(np.float64)
        norms = np.linalg.norm(rows, axis=1)
        if rows.shape[1] > 1 and len(norms) and np.all(np.abs(norms - 1) < 1e-3):
            return "embedding", "its rows have unit length"
    if _fits("logits", spec):
        return "logits", f"a 2-D score matrix {list(spec.shape)}"
    return "regression", "not a 2-D score matrix"


def _fits(kind: str, spec: TensorSpec) -> bool:
    last = spec.shape[-1] if spec.shape else None
    if kind == "logits":
        return len(spec.shape) == 2 and isinstance(last, int) and last > 1
    if kind == "embedding":
        return len(spec.shape) >= 2 and isinstance(last, int)
    if kind == "boxes":
        return len(spec.shape) >= 2 and last == 4
    if kind == "mask":
        return len(spec.shape) >= 3
    return True


@dataclass
class OutputCheck:
    name: str
    max_abs_err: float
    max_rel_err: float
    cosine: float
    kind: str = "regression"
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    accuracy: float | None = None
    reference_accuracy: float | None = None
    row_cosine_mean: float | None = None
    row_cosine_min: float | None = None
    retrieval_agreement: float | None = None
    pixel_agreement: float | None = None
    box_iou: float | None = None
    nonfinite: int = 0
    shape_mismatch: str | None = None
    """Set when the variant's output has another shape than the reference's: then no number is meaningful."""


def compare(outputs: list[TensorSpec], reference: list[list[np.ndarray]], got: list[list[np.ndarray]],
            labels: np.ndarray | None = None) -> list[OutputCheck]:
    """`reference[b][k]` is output k of batch b; batches are concatenated before measuring."""
    checks = []
    for k, spec in enumerate(outputs):
        kind = spec.kind or infer_kind(spec, [b[k] for b in reference])[0]
        # Batches may differ in non-batch dims (seq): measure over all elements, rows where the kind has rows.
        wrong = next(((rb[k].shape, gb[k].shape) for rb, gb in zip(reference, got) if rb[k].shape != gb[k].shape), None)
        if wrong is not None:
            checks.append(OutputCheck(spec.name, float("nan"), float("nan"), float("nan"), kind,
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
        check = OutputCheck(spec.name, max_abs, max_abs / scale if scale > 0 else max_abs, _cosine(rf, gf, max_abs),
                            kind, nonfinite=bad)
        ref_k = [b[k] for b in reference]
        got_k = [np.nan_to_num(b[k].astype(np.float64)) for b in got]
        if kind == "logits":
            _logits(check, ref_k, got_k, labels if k == 0 else None)
        elif kind == "embedding":
            _embedding(check, ref_k, got_k)
        elif kind == "mask":
            _mask(check, ref_k, got_k)
        elif kind == "boxes":
            _boxes(check, ref_k, got_k)
        checks.append(check)
    return checks


def _cosine(a: np.ndarray, b: np.ndarray, max_abs: float) -> float:
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom > 0 else (1.0 if max_abs == 0 else 0.0)


def _logits(check: OutputCheck, ref: list[np.ndarray], got: list[np.ndarray], labels: np.ndarray | None) -> None:
    r, g = np.concatenate(ref), np.concatenate(got)
    top_r, top_g = r.argmax(1), g.argmax(1)
    check.top1_agreement = float((top_r == top_g).mean())
    if r.shape[1] > 5:  # the reference's top-1 among the variant's top 5
        top5 = np.argpartition(-g, 5, axis=1)[:, :5]
        check.top5_agreement = float((top5 == top_r[:, None]).any(1).mean())
    if labels is not None and len(labels) == len(top_g):
        check.accuracy = float((top_g == labels).mean())
        check.reference_accuracy = float((top_r == labels).mean())


def _embedding(check: OutputCheck, ref: list[np.ndarray], got: list[np.ndarray]) -> None:
    r = np.concatenate([x.reshape(-1, x.shape[-1]) for x in ref]).astype(np.float64)
    g = np.concatenate([x.reshape(-1, x.shape[-1]) for x in got])
    rn, gn = np.linalg.norm(r, axis=1), np.linalg.norm(g, axis=1)
    live = rn > 0  # all-zero rows (padding) have no direction
    cos = np.einsum("ij,ij->i", r[live], g[live]) / np.maximum(rn[live] * gn[live], 1e-30)
    check.row_cosine_mean = float(cos.mean()) if cos.size else 1.0
    check.row_cosine_min = float(cos.min()) if cos.size else 1.0
    r, g = r[live] / rn[live, None], g[live] / np.maximum(gn[live, None], 1e-30)
    if len(r) >= 3:  # each of up to 256 queries' nearest neighbour among all other rows
        q = min(len(r), 256)
        sim_r, sim_g = r[:q] @ r.T, g[:q] @ g.T
        np.fill_diagonal(sim_r, -np.inf)
        np.fill_diagonal(sim_g, -np.inf)
        check.retrieval_agreement = float((sim_r.argmax(1) == sim_g.argmax(1)).mean())


def _mask(check: OutputCheck, ref: list[np.ndarray], got: list[np.ndarray]) -> None:
    if ref[0].ndim >= 4 and ref[0].shape[1] > 1:  # [batch, classes, h, w]: the class per pixel
        same = [(a.argmax(1) == b.argmax(1)).ravel() for a, b in zip(ref, got)]
    else:  # one score per pixel: its sign
        same = [((a > 0) == (b > 0)).ravel() for a, b in zip(ref, got)]
    check.pixel_agreement = float(np.concatenate(same).mean())


def _boxes(check: OutputCheck, ref: list[np.ndarray], got: list[np.ndarray]) -> None:
    a = np.concatenate([x.reshape(-1, 4) for x in ref]).astype(np.float64)
    b = np.concatenate([x.reshape(-1, 4) for x in got])
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = w * h
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(a) + area(b) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1e-30), (np.abs(a - b).max(1) == 0).astype(np.float64))
    check.box_iou = float(iou.mean()) if iou.size else 1.0


def headline(c: OutputCheck | dict[str, Any]) -> str:
    """What a table row shows for an output: the metric its kind is judged by first ("100.00% top-1",
    "row cos 0.992051"); empty for a shape mismatch."""
    d = c if isinstance(c, dict) else asdict(c)
    if d.get("shape_mismatch"):
        return ""
    for key, label in (("top1_agreement", "top-1"), ("pixel_agreement", "pixels")):
        if d.get(key) is not None:
            return f"{d[key]:.2%} {label}"
    for key, label, digits in (("row_cosine_mean", "row cos", 6), ("box_iou", "IoU", 4), ("cosine", "cos", 6)):
        if d.get(key) is not None:
            return f"{label} {d[key]:.{digits}f}"
    return ""


def judge(checks: list[OutputCheck], budget: Budget) -> list[str]:
    """Every way the variant breaks the budget, each naming the metric; empty when accepted."""
    problems = []
    for c in checks:
        if c.shape_mismatch:
            problems.append(f"{c.name}: {c.shape_mismatch}")
            continue
        if c.nonfinite:
            problems.append(f"{c.name}: {c.nonfinite} NaN/inf values where the reference is finite")
        if not c.max_rel_err <= budget.tolerance:
            problems.append(f"{c.name}: relative error {c.max_rel_err:.2e} > tolerance {budget.tolerance:.3g}")
        if c.kind == "embedding":
            if c.row_cosine_mean is not None and not c.row_cosine_mean >= budget.min_cosine:
                problems.append(f"{c.name}: row cosine {c.row_cosine_mean:.5f} < {budget.min_cosine} ({c.kind})")
            if c.retrieval_agreement is not None and c.retrieval_agreement < budget.min_retrieval:
                problems.append(f"{c.name}: retrieval agreement {c.retrieval_agreement:.3f} < {budget.min_retrieval} ({c.kind})")
        elif not c.cosine >= budget.min_cosine:
            problems.append(f"{c.name}: cosine {c.cosine:.5f} < {budget.min_cosine}")
        for value, what in ((c.top1_agreement, "top-1 agreement"), (c.pixel_agreement, "pixel agreement"),
                            (c.box_iou, "mean IoU")):
            if value is not None and value < budget.min_top1_agreement:
                problems.append(f"{c.name}: {what} {value:.3f} < {budget.min_top1_agreement} ({c.kind})")
    return problems


def to_dict(checks: list[OutputCheck]) -> list[dict[str, Any]]:
    """JSON-ready checks: a shape mismatch keeps its text and drops the meaningless numbers."""
    out = []
    for c in checks:
        d = {k: v for k, v in asdict(c).items() if v is not None}
        if c.shape_mismatch:
            d = {"name": c.name, "kind": c.kind, "shape_mismatch": c.shape_mismatch}
        out.append(d)
    return out
