"""Selection: a lossy variant wins only by more than the measured noise; preferences and load-time limits hold."""

from __future__ import annotations

import torch

from kiln.bench.timing import Timing
from kiln.builder import Candidate, distrust_orphans
from kiln.runner import Runner
from kiln.selection import MIN_MARGIN, select


def cand(variant: str, precision: str, p50_ms: float, *, load_s: float = 0.1, passes: tuple[str, ...] = ()) -> Candidate:
    c = Candidate(variant, variant.split("/")[0], precision, list(passes), "accepted", load_s=load_s)
    c.timings = [Timing(1, p50_ms, p50_ms, 1e3 / p50_ms, 10)]
    return c


def test_a_lossy_variant_within_the_margin_loses_to_the_lossless_one() -> None:
    fp32, int8 = cand("onnxruntime/fp32", "fp32", 1.0), cand("onnxruntime/int8-dynamic", "int8-dynamic", 0.97)
    sel = select([fp32, int8], "latency", [1])
    assert sel.selected == "onnxruntime/fp32" and sel.required_margin == MIN_MARGIN
    assert any("within the required margin" in n for n in sel.notes)
    clear = cand("onnxruntime/int8-dynamic", "int8-dynamic", 0.5)
    sel = select([fp32, clear], "latency", [1])
    assert sel.selected == "onnxruntime/int8-dynamic" and sel.margin == 1.0


def test_prefer_lossless_and_max_load_s() -> None:
    fast_lossy = cand("onnxruntime/int8-dynamic", "int8-dynamic", 0.2)
    pruned = cand("eager/fp32+prune0.5", "fp32", 0.3, passes=("prune0.5",))
    slow_load = cand("compile/fp32", "fp32", 0.4, load_s=90)
    eager = cand("eager/fp32", "fp32", 1.0)
    pool = [fast_lossy, pruned, slow_load, eager]
    assert select(pool, "latency", [1], prefer="lossless").selected == "compile/fp32"
    sel = select(pool, "latency", [1], prefer="lossless", max_load_s=10)
    assert sel.selected == "eager/fp32" and any("--max-load-s" in n for n in sel.notes)


def sleeper(variant: str, ms: float) -> Runner:
    """A real runner whose cost is known: it sleeps."""
    import time

    def fn(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        time.sleep(ms / 1e3)
        return []

    return Runner(variant, [], [], fn)


def test_alternating_rounds_measure_noise_and_decide() -> None:
    fp32, int8 = cand("a/fp32", "fp32", 1.0), cand("a/int8-dynamic", "int8-dynamic", 1.0)
    runners = {"a/fp32": sleeper("a/fp32", 4.0), "a/int8-dynamic": sleeper("a/int8-dynamic", 1.0)}
    sel = select([fp32, int8], "latency", [1], runners=runners, inputs=lambda b: [], rounds=3)
    assert sel.rounds >= 3 and set(sel.contenders) == {"a/fp32", "a/int8-dynamic"}
    assert sel.selected == "a/int8-dynamic" and sel.margin is not None and sel.margin > 1.0


def test_int8_is_not_trusted_when_its_fp32_export_was_rejected() -> None:
    fp32 = Candidate("onnxruntime/fp32", "onnxruntime", "fp32", [], "rejected", "output: relative error 1.7e-02 > 0.001")
    int8 = Candidate("onnxruntime/int8-dynamic", "onnxruntime", "int8-dynamic", [], "accepted")
    other = Candidate("eager/int8-dynamic", "eager", "int8-dynamic", [], "accepted")
    distrust_orphans([fp32, int8, other])
    assert int8.status == "rejected" and "derives from onnxruntime/fp32, which was rejected" in int8.reason
    assert other.status == "accepted"
