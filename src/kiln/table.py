"""The variants table that `kiln build` and `kiln inspect` print."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from kiln.verify import headline

_STYLE = {"accepted": "green", "rejected": "yellow", "skipped": "dim", "failed": "red"}


def variants_table(candidates: list[dict[str, Any]], batch_sizes: list[int], selected: str | None) -> Table:
    """One row per variant: status or reason, agreement with the reference, accuracy, p50 and items/s."""
    small, large = batch_sizes[0], batch_sizes[-1]
    eager = next((c for c in candidates if c["variant"] == "eager/fp32" and c.get("status") == "accepted"), None)
    eager_p50 = _timing(eager, small, "p50_ms") if eager else None
    t = Table(title="variants", title_justify="left", show_lines=False)
    t.add_column("variant", no_wrap=True)
    t.add_column("status / reason", overflow="fold", max_width=60)
    t.add_column("agreement", justify="right")  # the metric each output's kind is judged by
    t.add_column("max rel err", justify="right")
    t.add_column("accuracy", justify="right")
    t.add_column("load s", justify="right")
    t.add_column(f"p50 ms @{small}", justify="right")
    t.add_column("vs eager", justify="right")
    if large != small:
        t.add_column(f"items/s @{large}", justify="right")
    for c in candidates:
        status = c.get("status", "?")
        acc = [a for a in c.get("accuracy") or [] if not a.get("shape_mismatch")]
        first = acc[0] if acc else {}
        agreement = " ".join(headline(a) for a in acc)
        rel = f"{max(a['max_rel_err'] for a in acc):.1e}" if acc else ""
        accuracy = f"{first['accuracy']:.2%}" if first.get("accuracy") is not None else ""
        p50 = _timing(c, small, "p50_ms")
        speed = f"{eager_p50 / p50:.1f}x" if p50 and eager_p50 else ""
        label = status if status == "accepted" else escape(f"{status}: {c.get('reason', '')}")
        name = f"[bold]{c['variant']}[/bold] *" if c["variant"] == selected else c["variant"]
        load = c.get("load_s")
        row = [name, f"[{_STYLE.get(status, '')}]{label}[/]", agreement, rel, accuracy,
               f"{load:.1f}" if load and status != "skipped" else "", f"{p50:.3f}" if p50 else "", speed]
        if large != small:
            ips = _timing(c, large, "items_per_s")
            row.append(f"{ips:,.0f}" if ips else "")
        t.add_row(*row)
    return t


def _timing(c: dict[str, Any] | None, batch: int, key: str) -> float | None:
    for t in (c or {}).get("timings", []):
        if t["batch"] == batch:
            return float(t[key])
    return None
