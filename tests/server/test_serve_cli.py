"""`kiln serve` as a subprocess: readiness, JSON access log, SIGTERM drains in-flight requests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from v2client import gauge, wait_ready

from .conftest import free_port


def test_sigterm_drains_in_flight_requests(serve_repo: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "kiln", "serve", str(serve_repo), "--port", str(port),
                             "--models", "slow,digits", "--grace-s", "20", "--log-json", "--max-queue-size", "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url, proc)
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}

        def call(_: int) -> httpx.Response:
            return httpx.post(f"{url}/v2/models/slow/infer", json=body, timeout=30)

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(call, i) for i in range(4)]  # 4 x 300 ms, one at a time
            deadline = time.monotonic() + 10
            while gauge(url, "kiln_in_flight", "slow") < 4:
                assert time.monotonic() < deadline, "the requests never arrived"
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)  # all four are in: each finishes within the 20 s grace period
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 4
        assert all(r.json()["outputs"][0]["data"] == [2, 3, 4, 5] for r in responses)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    assert "slow version 1 (eager/fp32, 1 instance(s)) ready" in err
    lines = [json.loads(ln) for ln in err.splitlines() if ln.startswith("{")]
    infer = [ln for ln in lines if ln["path"] == "/v2/models/slow/infer"]
    assert len(infer) == 4 and all(ln["status"] == 200 and ln["ms"] > 0 for ln in infer)
    assert np.isfinite([ln["ms"] for ln in lines]).all()


def test_serve_refuses_unknown_models_and_missing_repos(serve_repo: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.cli import main

    p = subprocess.run([sys.executable, "-m", "kiln", "serve", str(serve_repo), "--models", "digits,nope"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "no model nope" in p.stderr and "the repository has" in p.stderr
    assert "Traceback" not in p.stderr
    assert main(["serve", str(tmp_path / "missing")]) == 2  # the same CLI in this process: no second torch start
    assert "model repository not found" in capsys.readouterr().err


def test_serving_a_model_folder_names_the_repository(serve_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.cli import main

    assert main(["serve", str(serve_repo / "digits")]) == 2
    err = capsys.readouterr().err
    assert "is a model folder" in err and f"kiln serve {serve_repo} --models digits" in err
    assert main(["serve", str(serve_repo / "digits" / "1")]) == 2
    assert f"kiln serve {serve_repo} --models digits" in capsys.readouterr().err
