"""Batching advice: max_batch_size and max_delay_ms for a p99 latency target, from a measured curve."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError

# Leave a fifth of the budget for HTTP, decoding and scheduling noise.
HEADROOM = 0.8


@dataclass
class Advice:
    max_batch_size: int
    max_delay_ms: float
    expected_p99_ms: float
    reason: str


def advise(curve: list[tuple[int, float, float]], p99_target_ms: float) -> Advice:
    """Pick the largest measured batch whose worst case fits the target.

    A request can wait out the batching window, then the batch running ahead of it, then its own batch:
    worst case = max_delay + 2 x p99(batch). The largest batch with 2 x p99 within the budget wins
    (throughput grows with batch); what is left of the budget becomes the window, capped at one batch's
    p50 (waiting longer than a batch takes to run rarely fills it faster).
    """
    if p99_target_ms <= 0:
        raise KilnError(f"--p99-ms {p99_target_ms} must be positive", hint="e.g. --p99-ms 20")
    budget = p99_target_ms * HEADROOM
    fitting = [(b, p50, p99) for b, p50, p99 in curve if 2 * p99 <= budget]
    if not fitting:
        b, p50, p99 = min(curve)
        raise KilnError(f"even batch {b} takes {p99:.2f} ms at p99, so {p99_target_ms} ms cannot be met "
                        f"(a request may wait for the batch ahead of it: worst case about {2 * p99:.2f} ms)",
                        hint="raise --p99-ms, use a faster variant or device, or add instances")
    b, p50, p99 = max(fitting)
    delay = max(0.0, min(budget - 2 * p99, p50))
    return Advice(b, round(delay, 3), round(delay + 2 * p99, 3),
                  f"batch {b}: p99 {p99:.2f} ms, so queue + run worst case {2 * p99:.2f} ms; window {delay:.2f} ms "
                  f"fits the {p99_target_ms} ms target with {100 * (1 - HEADROOM):.0f}% headroom")


def write_config(model_dir: Path, advice: Advice) -> Path:
    """Merge max_batch_size and max_delay_ms into repo/<model>/config.toml, keeping other settings."""
    f = model_dir / "config.toml"
    current: dict[str, object] = {}
    if f.is_file():
        try:
            current = tomllib.loads(f.read_text())
        except tomllib.TOMLDecodeError as e:
            raise KilnError(f"cannot parse {f}: {e}", hint="fix or remove it, then run again") from None
    current.update(max_batch_size=advice.max_batch_size, max_delay_ms=advice.max_delay_ms)
    lines = [f"# max_batch_size and max_delay_ms written by kiln bench --serving: {advice.reason}"]
    for k, v in current.items():
        lines.append(f"{k} = {_toml(v)}")
    f.write_text("\n".join(lines) + "\n")
    return f


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    raise KilnError(f"cannot write {v!r} to config.toml", hint="keep config.toml to numbers, strings, booleans and lists")
