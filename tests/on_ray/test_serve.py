"""Ray Serve: the KServe v2 client tests against `kiln serve --ray` and against kiln.ray.deployment()."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server.conftest import free_port
from v2client import check_two, wait_ready

ray = pytest.importorskip("ray", reason="make test installs kiln[ray]")


def check_v2(url: str) -> None:
    """The plain server's tritonclient checks, then one of its validation errors."""
    check_two(url)
    # the same validation as kiln serve
    r = httpx.post(f"{url}/v2/models/two/infer", json={"inputs": [{"name": "a", "datatype": "FP64", "shape": [1, 4], "data": [0] * 4}]})
    assert r.status_code == 400 and "missing ['b']" in r.json()["error"]


def test_kiln_serve_ray_cli(serve_repo: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "kiln", "serve", str(serve_repo), "--ray", "--port", str(port),
                             "--models", "two,digits", "--cpus-per-replica", "0.5"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url, proc)
        check_v2(url)
        digits = np.load(Path(__file__).parents[2] / "examples" / "digits" / "test.npz")
        x = digits["image"][:4]
        r = httpx.post(f"{url}/v2/models/digits/infer", json={"inputs": [{"name": "image", "datatype": "FP32",
                                                                          "shape": list(x.shape), "data": x.ravel().tolist()}]})
        assert r.status_code == 200 and np.asarray(r.json()["outputs"][0]["data"]).reshape(4, 10).argmax(1).tolist() == digits["labels"][:4].tolist()
        # statistics come from the replicas' reports: the rows they ran, their executions and compute phases
        s = httpx.get(f"{url}/v2/models/digits/stats").json()["model_stats"][0]
        assert s["inference_count"] >= 4 and s["execution_count"] >= 1 and s["batch_stats"]
        phases = [s["inference_stats"][k]["count"] for k in ("compute_input", "compute_infer", "compute_output")]
        assert phases[0] == phases[1] == phases[2] == s["execution_count"]
        assert 'kiln_in_flight{model="digits",version="1"}' in httpx.get(f"{url}/metrics").text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
