"""Triton's perf_analyzer, unchanged, against `kiln serve --workers 2` over HTTP and gRPC: it reads the model
configuration, drives inference, then checks the server-side statistics (it aborts when compute_input, compute_infer
and compute_output counts differ, or when the statistics extension is missing) and reports them.

`make test` installs it (`make perf-analyzer`: the binary from the tritonclient 2.41 wheel, Debian's libb64 and the
CUDA runtime library from PyPI); without it these tests skip, saying so."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from support import DIGITS
from v2client import wait_ready

from .conftest import free_port


def _perf_analyzer() -> str | None:
    return shutil.which("perf_analyzer", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.fixture(scope="module")
def ports(serve_repo: Path) -> Iterator[tuple[int, int]]:
    if _perf_analyzer() is None:
        pytest.skip("perf_analyzer is not installed: `make perf-analyzer` puts Triton's in .venv/bin")
    port, gport = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kiln", "serve", str(serve_repo), "--port", str(port), "--workers", "2",
                             "--models", "digits", "--grpc-port", str(gport), "--grace-s", "5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        yield port, gport
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_measures_kiln(ports: tuple[int, int], protocol: str, tmp_path: Path) -> None:
    port = ports[0] if protocol == "http" else ports[1]
    report, data = tmp_path / "report.csv", tmp_path / "data.json"
    # real digits: perf_analyzer's default random bytes can hold NaNs, which kiln refuses with a 400
    images = np.load(DIGITS / "test.npz")["image"][:8]
    data.write_text(json.dumps({"data": [{"image": {"content": x.ravel().tolist(), "shape": [1, 8, 8]}} for x in images]}))
    p = subprocess.run([str(_perf_analyzer()), "-m", "digits", "-u", f"127.0.0.1:{port}", "-i", protocol,
                        "--concurrency-range", "4", "--input-data", str(data), "-p", "500", "-s", "50", "-r", "20",
                        "-f", str(report)], capture_output=True, text=True, timeout=180)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "Server:" in out, out[-3000:]
    assert "compute counts must be the same" not in out and "not implemented" not in out.lower(), out[-3000:]
    row = next(csv.DictReader(report.open()))
    assert float(row["Inferences/Second"]) > 100, row
    # the server's own figures came back, from the statistics extension merged over the workers: every compute phase
    assert all(int(row[f"Server Compute {phase}"]) > 0 for phase in ("Input", "Infer", "Output")), row
