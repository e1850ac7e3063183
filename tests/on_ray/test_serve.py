"""Ray Serve: the KServe v2 client tests against `kiln serve --ray` and against kiln.ray.deployment()."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tests.server.conftest import free_port

ray = pytest.importorskip("ray", reason="make test installs kiln[ray]")


def check_v2(url: str) -> None:
    """What the plain server's tritonclient test checks: readiness, metadata, JSON and binary, 2 in / 2 out."""
    c = triton.InferenceServerClient(url=url.removeprefix("http://"))
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("two")
    assert [i["name"] for i in c.get_model_metadata("two")["inputs"]] == ["a", "b"]
    assert c.get_model_config("two")["max_batch_size"] == 32
    a = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    results = []
    for binary in (False, True):
        ins = [triton.InferInput("a", [5, 4], "FP32"), triton.InferInput("b", [5, 6], "FP32")]
        ins[0].set_data_from_numpy(a, binary_data=binary)
        ins[1].set_data_from_numpy(b, binary_data=binary)
        res = c.infer("two", ins, outputs=[triton.InferRequestedOutput(n, binary_data=binary) for n in ("embedding", "score")])
        results.append((res.as_numpy("embedding"), res.as_numpy("score")))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    assert results[0][0].shape == (5, 8) and results[0][1].shape == (5, 1)
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
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "Ray Serve never became ready"
            time.sleep(0.5)
        check_v2(url)
        digits = np.load(Path(__file__).parents[2] / "examples" / "digits" / "test.npz")
        x = digits["image"][:4]
        r = httpx.post(f"{url}/v2/models/digits/infer", json={"inputs": [{"name": "image", "datatype": "FP32",
                                                                          "shape": list(x.shape), "data": x.ravel().tolist()}]})
        assert r.status_code == 200 and np.asarray(r.json()["outputs"][0]["data"]).reshape(4, 10).argmax(1).tolist() == digits["labels"][:4].tolist()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
