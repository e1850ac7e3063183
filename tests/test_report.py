"""The HTML report, rendered by a real browser (Debian's headless Chromium, installed by `make test`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import kiln


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: `make test` installs Debian's chromium package")
    return exe


def render(path: Path, tmp: Path, screenshot: Path | None = None) -> str:
    """The DOM after the page's own script has run."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}", "--window-size=1300,1600"]
    what = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    p = subprocess.run([chromium(), *flags, *what, path.as_uri()], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_build_report_renders(built: Callable[[str], kiln.BuildResult], tmp_path: Path) -> None:
    r = built("Branchy")  # accepted, failed and selected variants
    page = r.path / "report.html"  # type: ignore[operator]
    text = page.read_text()
    # self-contained: nothing to fetch (the SVG namespace URI is an identifier, not a request)
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", text) and "url(" not in text
    dom = render(page, tmp_path)
    assert 'data-rendered="true"' in dom, "the report's script did not finish"
    accepted = [c.variant for c in r.candidates if c.status == "accepted"]
    for chart in ("latency", "throughput", "tradeoff"):
        svg = re.search(rf'<svg[^>]*data-chart="{chart}".*?</svg>', dom, re.S)
        assert svg, f"chart {chart} was not drawn"
        drawn = set(re.findall(r'data-variant="([^"]+)"[^>]*class="point[ "]', svg[0]))
        assert drawn == set(accepted), chart
    assert len(re.findall(r'class="series( sel)?"', dom)) == 2 * len(accepted)  # latency and throughput lines
    # every series has its own colour and marker, and the selected one is drawn out
    latency = re.search(r'<svg[^>]*data-chart="latency".*?</svg>', dom, re.S)[0]  # type: ignore[index]
    looks = {m[2]: (m[0], m[1]) for m in re.findall(r'<(circle|rect|path) [^>]*?fill="([^"]+)" data-variant="([^"]+)" class="point',
                                                      latency)}
    assert set(looks) == set(accepted) and len(set(looks.values())) == len(accepted), looks
    assert f'data-variant="{r.selected}" class="point sel' in latency and f"{r.selected} (selected)" in dom
    # round ticks: one or two significant digits (50k, 0.2, 1.5), never 9778
    ticks = re.findall(r'<text x="[\d.]+" y="[\d.]+" text-anchor="end">([^<]+)</text>', dom)
    assert ticks and all(len(t.rstrip("k").replace(".", "").replace("-", "").lstrip("0").rstrip("0")) <= 2 for t in ticks
                         if "e" not in t), ticks
    for c in r.candidates:
        assert f'data-variant="{c.variant}" data-status="{c.status}"' in dom
    assert "data-dependent control flow" in dom  # reasons of the failed variants
    assert f'<b id="selected">{r.selected}</b>' in dom and "lib torch" in dom


def test_report_screenshot_is_not_blank(built: Callable[[str], kiln.BuildResult], tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    render(built("MLP").path / "report.html", tmp_path, screenshot=shot)  # type: ignore[operator]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a blank page compresses to a few kB
