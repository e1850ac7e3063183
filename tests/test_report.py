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
        drawn = set(re.findall(r'class="point"[^>]*data-variant="([^"]+)"|data-variant="([^"]+)"[^>]*class="point"', svg[0]))
        assert {a or b for a, b in drawn} == set(accepted), chart
    assert len(re.findall(r'class="series"', dom)) == 2 * len(accepted)  # latency and throughput lines
    for c in r.candidates:
        assert f'data-variant="{c.variant}" data-status="{c.status}"' in dom
    assert "data-dependent control flow" in dom  # reasons of the failed variants
    assert f'<b id="selected">{r.selected}</b>' in dom and "lib torch" in dom


def test_report_screenshot_is_not_blank(built: Callable[[str], kiln.BuildResult], tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    render(built("MLP").path / "report.html", tmp_path, screenshot=shot)  # type: ignore[operator]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a blank page compresses to a few kB
