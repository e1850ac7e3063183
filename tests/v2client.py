"""What every KServe v2 server kiln runs must pass, shared by the plain and the Ray Serve tests."""

from __future__ import annotations

import subprocess
import time

import httpx
import numpy as np
import tritonclient.http as triton


def wait_ready(url: str, proc: subprocess.Popen[str] | None = None, *, timeout_s: float = 150,
               path: str = "/v2/health/ready") -> None:
    """Poll /v2/health/ready (or `path`) until 200; fail early if the server process died."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {proc.communicate()[1][-3000:]}")
        try:
            if httpx.get(f"{url}{path}", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become ready within {timeout_s:.0f} s")
        time.sleep(0.1)


def gauge(url: str, metric: str, model: str) -> float:
    """One model's value of a Prometheus gauge from /metrics (0 when absent): tests wait on these, not on sleeps."""
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(metric + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def check_two(url: str) -> tuple[triton.InferenceServerClient, np.ndarray, np.ndarray, np.ndarray]:
    """tritonclient against the two-input, two-output model: readiness, metadata, config, JSON and binary
    inference agreeing. Returns the client, the inputs and the score output for further checks."""
    c = triton.InferenceServerClient(url=url.removeprefix("http://"))
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("two") and c.is_model_ready("two", "1")
    meta = c.get_model_metadata("two")
    assert [i["name"] for i in meta["inputs"]] == ["a", "b"] and [o["name"] for o in meta["outputs"]] == ["embedding", "score"]
    assert c.get_model_config("two")["max_batch_size"] == 32
    a = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    results = []
    for binary in (False, True):
        ins = [triton.InferInput("a", [5, 4], "FP32"), triton.InferInput("b", [5, 6], "FP32")]
        ins[0].set_data_from_numpy(a, binary_data=binary)
        ins[1].set_data_from_numpy(b, binary_data=binary)
        outs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("embedding", "score")]
        res = c.infer("two", ins, outputs=outs, request_id="t1")
        results.append((res.as_numpy("embedding"), res.as_numpy("score")))
        assert res.get_response()["id"] == "t1"
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    assert results[0][0].shape == (5, 8) and results[1][1].shape == (5, 1)
    return c, a, b, results[0][1]
