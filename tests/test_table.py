"""Tables that survive a terminal and a pipe: the first column is never squeezed away, piped output is plain text."""

import io

from rich.console import Console

from kiln.table import Grid, show, variants_table

NAMES = ["eager/fp32", "onnxruntime/int8-static", "compile/fp32+bnfold+channels_last", "aoti/fp32+bnfold"]
REASON = "rejected: cosine 0.9812 < 0.99 on output logits; max rel err 3.1e-02 (int8 budget)"


def _bench_grid() -> Grid:
    """The shape `kiln bench --batch 1,8,32` prints: the variant, then 13 numeric columns."""
    headers = ["variant", *(f"{m} @{b}" for m in ("p50 ms", "p99 ms", "items/s") for b in (1, 8, 32)),
               "memory MB", "load s", "size MB", "max rel err", "accuracy delta"]
    g = Grid(None, headers)
    for n in NAMES:
        g.add([n, *("12.345" for _ in range(6)), "12,345", "45,678", "98,765", "123.4", "0.52", "1.23", "3.1e-04", "+0.00%"])
    g.marked = 1
    return g


def _render(grid: Grid, *, width: int, terminal: bool) -> str:
    out = io.StringIO()
    show(Console(file=out, width=width, force_terminal=terminal, color_system=None, soft_wrap=False), grid)
    return out.getvalue()


def test_terminal_tables_keep_every_variant_name_whole_at_any_width() -> None:
    for width in (80, 120, 160, 200, 260):
        text = _render(_bench_grid(), width=width, terminal=True)
        for name in NAMES:
            assert name in text, (width, text)
        assert max(len(line) for line in text.splitlines()) <= width


def test_a_table_that_fits_is_drawn_as_a_table() -> None:
    text = _render(_bench_grid(), width=260, terminal=True)
    assert "┃ variant" in text or "│ variant" in text.replace("┃", "│")
    narrow = _render(_bench_grid(), width=120, terminal=True)
    assert "│" not in narrow and "p50 ms @1 12.345" in narrow  # records: label value pairs under each variant


def test_piped_tables_are_plain_aligned_text_with_the_reason_last() -> None:
    g = variants_table([{"variant": "eager/fp32", "status": "accepted", "timings": [{"batch": 1, "p50_ms": 2.0}]},
                        {"variant": "onnxruntime/int8-dynamic", "status": "rejected", "reason": REASON[10:]}],
                       [1], "eager/fp32")
    text = _render(g, width=80, terminal=False)
    lines = text.splitlines()
    assert lines[0] == "variants" and not any(ch in text for ch in "│┃━─")
    header, first, second = lines[1:4]
    assert header.startswith("variant ") and header.endswith("status / reason")
    assert first.startswith("eager/fp32 *") and first.endswith("accepted")
    assert second.startswith("onnxruntime/int8-dynamic") and second.endswith(REASON)  # one line, never wrapped
    assert header.index("p50 ms @1") + len("p50 ms @1") == first.index("2.000") + len("2.000")  # right-aligned numbers
