"""Tables that survive a terminal and a pipe: `kiln build`, `bench` and `inspect` print through `show`.

On a terminal a table is drawn with rich when it fits the width with its first column whole; when it does not,
each row becomes a short record (the variant, then `label value` pairs wrapped to the width), so the variant name
is never squeezed away. When the output is not a terminal (a pipe, a file, CI logs) the table is plain aligned text
with the long free-text column last, so nothing pads to a 160-column box.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kiln.verify import headline

_STYLE = {"accepted": "green", "rejected": "yellow", "skipped": "dim", "failed": "red"}
_PAD = 3  # rich's column separator and padding


@dataclass
class Grid:
    """Plain cells; `free` names the one column of free text (reasons) that may wrap; `styles` colour rows."""

    title: str | None
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    styles: list[str] = field(default_factory=list)
    free: int | None = None
    free_width: int = 40
    marked: int | None = None  # the selected row, drawn bold

    def add(self, cells: list[str], style: str = "") -> None:
        self.rows.append(cells)
        self.styles.append(style)

    def natural_width(self) -> int:
        widths = [max([len(h), *(len(r[i]) for r in self.rows)]) for i, h in enumerate(self.headers)]
        if self.free is not None:
            widths[self.free] = min(widths[self.free], self.free_width)
        return sum(widths) + _PAD * len(widths) + 1


def show(console: Console, grid: Grid) -> None:
    """Draw `grid` as a table, as records when it is too wide for the terminal, or as plain text when piped."""
    if not console.is_terminal:
        console.print(plain(grid), highlight=False, markup=False, soft_wrap=True)
    elif grid.natural_width() <= console.width:
        console.print(_rich(grid))
    else:
        _records(console, grid)


def plain(grid: Grid) -> str:
    """Aligned columns separated by two spaces, the free-text column last and unpadded."""
    order = [i for i in range(len(grid.headers)) if i != grid.free] + ([grid.free] if grid.free is not None else [])
    table = [[grid.headers[i] for i in order], *([r[i] for i in order] for r in grid.rows)]
    widths = [max(len(row[j]) for row in table) for j in range(len(order))]
    right = [j > 0 and order[j] != grid.free for j in range(len(order))]
    lines = [grid.title] if grid.title else []
    for row in table:
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _rich(grid: Grid) -> Table:
    t = Table(title=grid.title, title_justify="left")
    for i, h in enumerate(grid.headers):
        if i == 0:
            t.add_column(h, no_wrap=True, min_width=max(len(h), *(len(r[0]) for r in grid.rows)) if grid.rows else None)
        elif i == grid.free:
            t.add_column(h, overflow="fold", max_width=grid.free_width)
        else:
            t.add_column(h, justify="right", no_wrap=True)
    for n, (row, style) in enumerate(zip(grid.rows, grid.styles)):
        cells = [escape(c) for c in row]
        if n == grid.marked:
            cells[0] = f"[bold]{cells[0]}[/bold]"
        if style and grid.free is not None:
            cells[grid.free] = f"[{style}]{cells[grid.free]}[/]"
        t.add_row(*cells)
    return t


def _records(console: Console, grid: Grid) -> None:
    """One record per row: the first cell on its own line, then `label value` pairs wrapped to the width."""
    if grid.title:
        console.print(grid.title, highlight=False)
    for n, (row, style) in enumerate(zip(grid.rows, grid.styles)):
        name = escape(row[0])
        console.print(f"[bold]{name}[/bold]" if n == grid.marked else name, highlight=False)
        pairs = [f"{h} {c}" for i, (h, c) in enumerate(zip(grid.headers, row)) if i and c and i != grid.free]
        line = " "
        for p in pairs:
            if len(line) + len(p) + 3 > console.width and line.strip():
                console.print(escape(line), highlight=False)
                line = " "
            line += f"  {p}" if line.strip() else f" {p}"
        if line.strip():
            console.print(escape(line), highlight=False)
        if grid.free is not None and row[grid.free]:
            console.print(f"   [{style}]{escape(row[grid.free])}[/]" if style else f"   {escape(row[grid.free])}",
                          highlight=False, soft_wrap=False)


def variants_table(candidates: list[dict[str, Any]], batch_sizes: list[int], selected: str | None) -> Grid:
    """One row per variant: status or reason, agreement with the reference, accuracy, load time, p50 and items/s."""
    small, large = batch_sizes[0], batch_sizes[-1]
    eager = next((c for c in candidates if c["variant"] == "eager/fp32" and c.get("status") == "accepted"), None)
    eager_p50 = _timing(eager, small, "p50_ms") if eager else None
    headers = ["variant", "status / reason", "agreement", "max rel err", "accuracy", "load s", f"p50 ms @{small}", "vs eager"]
    if large != small:
        headers.append(f"items/s @{large}")
    g = Grid("variants", headers, free=1, free_width=60)
    for c in candidates:
        status = c.get("status", "?")
        acc = [a for a in c.get("accuracy") or [] if not a.get("shape_mismatch")]
        first = acc[0] if acc else {}
        agreement = " ".join(headline(a) for a in acc)
        rel = f"{max(a['max_rel_err'] for a in acc):.1e}" if acc else ""
        accuracy = f"{first['accuracy']:.2%}" if first.get("accuracy") is not None else ""
        p50 = _timing(c, small, "p50_ms")
        speed = f"{eager_p50 / p50:.1f}x" if p50 and eager_p50 else ""
        label = status if status == "accepted" else f"{status}: {c.get('reason', '')}"
        name = f"{c['variant']} *" if c["variant"] == selected else c["variant"]
        load = c.get("load_s")
        row = [name, label, agreement, rel, accuracy, f"{load:.1f}" if load and status != "skipped" else "",
               f"{p50:.3f}" if p50 else "", speed]
        if large != small:
            ips = _timing(c, large, "items_per_s")
            row.append(f"{ips:,.0f}" if ips else "")
        if c["variant"] == selected:
            g.marked = len(g.rows)
        g.add(row, _STYLE.get(status, ""))
    return g


def _timing(c: dict[str, Any] | None, batch: int, key: str) -> float | None:
    for t in (c or {}).get("timings", []):
        if t["batch"] == batch:
            return float(t[key])
    return None
