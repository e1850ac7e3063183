"""Stage 5 of a build: pick the variant to serve from timings a user can trust.

The first timing pass measures each variant right after its verification, minutes apart on a shared machine.
Selection re-times the contenders (the best lossless, the best lossy, and any within reach of the fastest) in
rounds that alternate them, so drift hits all alike; the spread of the rounds is the measured noise. A lossy
variant (int8, pruned, fp16/bf16) is chosen only when it beats the best lossless one by more than that noise.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from kiln.bench.timing import time_runner
from kiln.runner import Runner

ROUNDS = 5
NOISY_CV = 0.10  # a contender whose rounds spread more than this gets another set of rounds
MIN_MARGIN = 0.05  # a lossy variant must win by at least this much, however quiet the machine
REACH = 1.5  # contenders: within this factor of the fastest in the first pass


class Timed(Protocol):
    variant: str
    precision: str
    passes: list[str]
    load_s: float

    def timing(self, batch: int) -> Any: ...


def lossy(precision: str, passes: Sequence[str]) -> bool:
    """int8, half precision and pruned variants change the numbers by design; fp32 variants do not."""
    return precision != "fp32" or any(p.startswith(("prune", "chprune")) for p in passes)


def is_lossy(c: Timed) -> bool:
    return lossy(c.precision, c.passes)


@dataclass
class Selection:
    selected: str | None
    metric: str
    batch: int
    rounds: int = 0
    contenders: dict[str, dict[str, Any]] = field(default_factory=dict)
    noise: float = 0.0
    required_margin: float = 0.0
    margin: float | None = None
    """How much faster the selected variant measured than the runner-up (0.12 = 12%)."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, [], {})}


def select(accepted: Sequence[Timed], objective: str, sizes: list[int], *,
           runners: dict[str, Runner] | None = None, inputs: Callable[[int], list[torch.Tensor]] | None = None,
           prefer: str = "fastest", max_load_s: float | None = None, rounds: int = ROUNDS) -> Selection:
    """The variant to serve. `runners` and `inputs(batch)` enable the alternating rounds; without them the
    first-pass timings decide (noise unknown, so the minimum margin applies)."""
    batch = sizes[0] if objective == "latency" else sizes[-1]
    sel = Selection(None, "p50_ms" if objective == "latency" else "items_per_s", batch)
    pool = [c for c in accepted if c.timing(batch) is not None]
    if max_load_s is not None:
        slow = [c for c in pool if c.load_s > max_load_s]
        pool = [c for c in pool if c.load_s <= max_load_s]
        sel.notes += [f"{c.variant} not selectable: it takes {c.load_s:.1f} s to load (--max-load-s {max_load_s:g})"
                      for c in slow]
    if prefer == "lossless":
        exact = [c for c in pool if not is_lossy(c)]
        if exact:
            pool = exact
        elif pool:
            sel.notes.append("--prefer lossless, but no fp32 variant passed: choosing among the lossy ones")
    if not pool:
        return sel

    def cost(c: Timed) -> float:  # lower is better, in ms per item at the objective's batch
        t = c.timing(batch)
        return float(t.p50_ms) if objective == "latency" else 1e3 / float(t.items_per_s)

    first = sorted(pool, key=cost)
    best_exact = next((c for c in first if not is_lossy(c)), None)
    best_lossy = next((c for c in first if is_lossy(c)), None)
    near = [c for c in first if cost(c) <= cost(first[0]) * REACH]
    picked = near[:4] + [c for c in (best_exact, best_lossy) if c is not None and c in near]
    if best_exact is not None and best_exact not in picked:  # the lossless yardstick a lossy winner must beat
        picked.append(best_exact)
    contenders = list({c.variant: c for c in picked}.values())
    scores = {c.variant: cost(c) for c in contenders}
    if runners and inputs and len(contenders) > 1 and all(c.variant in runners for c in contenders):
        scores = _rounds(sel, contenders, runners, inputs(batch), batch, rounds, cost_is_latency=objective == "latency")
    sel.required_margin = max(MIN_MARGIN, 2 * sel.noise)
    ranked = sorted(contenders, key=lambda c: scores[c.variant])
    best = ranked[0]
    exact_pool = [c for c in ranked if not is_lossy(c)]
    if is_lossy(best) and exact_pool:
        ex = exact_pool[0]
        gain = scores[ex.variant] / scores[best.variant] - 1
        if gain <= sel.required_margin:
            sel.notes.append(f"{best.variant} measured {gain:.0%} faster than {ex.variant}, within the required margin "
                             f"{sel.required_margin:.0%} (measured noise {sel.noise:.0%}): kept the lossless variant")
            best = ex
    others = [c for c in ranked if c is not best]
    sel.selected = best.variant
    if others:
        sel.margin = round(min(scores[c.variant] for c in others) / scores[best.variant] - 1, 4)
    return sel


def _rounds(sel: Selection, contenders: list[Timed], runners: dict[str, Runner], xs: list[torch.Tensor], batch: int,
            rounds: int, *, cost_is_latency: bool) -> dict[str, float]:
    """Median per-item cost of each contender over alternating rounds; re-measure once when noisy."""
    per: dict[str, list[float]] = {c.variant: [] for c in contenders}
    for attempt in range(2):
        for r in range(rounds):
            order = contenders if r % 2 == 0 else contenders[::-1]
            for c in order:
                runner = runners[c.variant]
                x = [t.to(runner.device) for t in xs] if runner.device != "cpu" else xs
                t = time_runner(runner, x, batch=batch, warmup=2, min_time_s=0.1, min_repeats=5)
                per[c.variant].append(t.p50_ms if cost_is_latency else 1e3 * batch / t.items_per_s)
        cv = {v: statistics.pstdev(s) / statistics.mean(s) for v, s in per.items()}
        sel.noise = round(max(cv.values()), 4)
        sel.rounds = len(next(iter(per.values())))
        if sel.noise <= NOISY_CV or attempt == 1:
            break
    if sel.noise > NOISY_CV:
        sel.notes.append(f"timings were noisy (rounds spread up to {sel.noise:.0%} after {sel.rounds} rounds): the "
                         "selection may differ between runs; build on a quieter machine for a firmer choice")
    medians = {v: statistics.median(s) for v, s in per.items()}
    for c in contenders:
        sel.contenders[c.variant] = {"median_ms" if cost_is_latency else "median_ms_per_item": round(medians[c.variant], 5),
                                     "cv": round(cv[c.variant], 4), "lossy": is_lossy(c)}
    return medians
