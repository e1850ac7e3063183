"""What `kiln serve` promises under hostile input, overload, tampering and shutdown (README: Guarantees).

Every test here failed before the fix it covers. Loopback only, bounded in requests and time."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import kiln
from kiln.server.app import create_app
from kiln.server.dataplane import DataPlane, _timeout
from support import ZOO
from v2client import gauge, wait_ready

from .conftest import ServerThread, free_port

ENCODER_SPECS = ["ids:int64[batch,seq<=64]@0..99", "mask:int64[batch,seq<=64]@0..1"]


@pytest.fixture(scope="module")
def hard_repo(serve_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The serving repository plus an encoder whose ids range (0..99) and longest sequence (64) were recorded."""
    repo = tmp_path_factory.mktemp("hard")
    for name in ("digits", "poison", "slow"):
        shutil.copytree(serve_repo / name, repo / name)
    kiln.build(f"{ZOO}:Encoder", inputs=ENCODER_SPECS, name="encoder", repo=repo, backends=("eager",),
               batch=(1,), report=False)
    return repo


@pytest.fixture(scope="module")
def hard(hard_repo: Path) -> Iterator[ServerThread]:
    plane = DataPlane(hard_repo)
    with ServerThread(create_app(plane, max_body_bytes=1 << 20)) as s:
        yield s


def _v2(name: str, a: np.ndarray, dt: str = "FP32") -> dict:  # type: ignore[type-arg]
    return {"name": name, "datatype": dt, "shape": list(a.shape), "data": a.ravel().tolist()}


def _enc(ids: np.ndarray) -> dict:  # type: ignore[type-arg]
    return {"inputs": [_v2("ids", ids, "INT64"), _v2("mask", np.ones_like(ids), "INT64")]}


HOSTILE: list[tuple[str, str, object, str]] = [
    # (method, path, JSON body or raw bytes, what the 4xx message must say)
    ("POST", "/v2/models/digits/infer",
     {"inputs": [{"name": "image", "datatype": "FP32", "shape": [2**32, 2**32, 1, 1], "data": []}]}, "elements"),
    ("POST", "/v2/models/digits/infer",
     {"inputs": [{"name": "image", "datatype": "FP32", "shape": [2**62, 4, 1, 1], "data": [1.0]}]}, "elements"),
    ("POST", "/v2/models/digits/infer",
     {"inputs": [_v2("image", np.zeros((1, 1, 8, 8), np.float32))], "outputs": [{"name": "output", "parameters": [1]}]},
     '"parameters" must be an object'),
    ("POST", "/v2/models/digits/infer",
     {"inputs": [_v2("image", np.zeros((1, 1, 8, 8), np.float32))], "outputs": [{"name": "output", "parameters": "x"}]},
     '"parameters" must be an object'),
    ("POST", "/v2/models/encoder/infer", _enc(np.full((1, 8), 100, np.int64)), "the model takes 0..99"),
    ("POST", "/v2/models/encoder/infer", _enc(np.full((1, 8), -5, np.int64)), "the model takes 0..99"),
    ("POST", "/v2/models/encoder/infer", _enc(np.ones((1, 65), np.int64)), "at most 64"),
    ("POST", "/v2/repository/models/" + "a" * 300 + "/load", b"", "invalid model name"),
    ("POST", "/v2/repository/models/%2e%2e/load", b"", "invalid model name"),
    ("POST", "/v2/repository/models/..%2fslow/load", b"", "no endpoint"),
    ("POST", "/v2/repository/models/.hidden/unload", b"", "invalid model name"),
    ("POST", "/v2/models/digits/infer", b"{", "malformed JSON"),
    ("POST", "/v2/models/digits/infer", {"inputs": [_v2("image", np.zeros((1, 1, 8, 8), np.float32))],
                                          "parameters": {"timeout_ms": "soon"}}, "timeout must be a number"),
]


@pytest.mark.parametrize(("method", "path", "body", "message"), HOSTILE, ids=[f"{i}" for i in range(len(HOSTILE))])
def test_client_mistakes_are_4xx_with_a_fix(hard: ServerThread, method: str, path: str, body: object, message: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.request(method, f"{hard.url}{path}", content=content, timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert message in r.json()["error"], r.json()
    assert httpx.get(f"{hard.url}/v2/health/live", timeout=5).status_code == 200
    index = httpx.post(f"{hard.url}/v2/repository/index", timeout=5).json()
    assert all(m["name"] in ("digits", "encoder", "poison", "slow") for m in index)  # nothing served as '..'



def test_a_model_fault_is_a_500_with_a_request_id_and_no_internals(hard: ServerThread,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="kiln.server"):
        r = httpx.post(f"{hard.url}/v2/models/poison/infer", json={"inputs": [_v2("x", np.full((1, 4), 13, np.float32))]},
                       timeout=30)
    assert r.status_code == 500
    doc = r.json()
    assert "poisoned" not in doc["error"] and "ValueError" not in doc["error"]
    assert doc["request_id"] in doc["error"]
    assert any(doc["request_id"] in rec.getMessage() and "poisoned input: 13" in rec.getMessage() for rec in caplog.records)


def test_a_client_may_only_ask_for_a_shorter_timeout() -> None:
    assert _timeout("50", {}, 30_000) == 0.05
    assert _timeout("99999999", {}, 30_000) == 30.0
    assert _timeout(None, {"timeout_ms": 1e12}, 1_000) == 1.0


def test_overload_answers_only_200_or_429_with_retry_after_and_refuses_before_decoding(hard: ServerThread) -> None:
    """slow: max_batch_size 1, max_queue_size 2, 300 ms per request."""
    x = {"inputs": [_v2("x", np.zeros((1, 4), np.float32))]}

    def call(body: object) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{hard.url}/v2/models/slow/infer", content=content, timeout=30)

    with ThreadPoolExecutor(12) as pool:
        rs = list(pool.map(call, [x] * 12))
        codes = sorted(r.status_code for r in rs)
        assert set(codes) <= {200, 429} and 429 in codes, codes
        assert all(r.headers.get("Retry-After") == "1" for r in rs if r.status_code == 429)
        # Fill the queue (one running, two waiting), then a malformed body: refused as 429, never parsed as JSON.
        # On a loaded machine the first request may finish (300 ms) before the malformed one arrives: the queue has
        # room again and the body is parsed (400). That attempt proves nothing either way, so fill it again.
        for _ in range(4):
            running = [pool.submit(call, x) for _ in range(3)]
            deadline = time.monotonic() + 10
            while gauge(hard.url, "kiln_queue_depth", "slow") < 2:
                assert time.monotonic() < deadline, "the queue never filled"
                time.sleep(0.01)
            r = call(b"{not json")
            assert [f.result().status_code for f in running] == [200, 200, 200]
            if r.status_code != 400:
                break
        assert r.status_code == 429 and r.headers["Retry-After"] == "1", r.text


def test_openapi_page_works_offline(hard: ServerThread) -> None:
    page = httpx.get(f"{hard.url}/docs", timeout=10)
    assert page.status_code == 200 and "cdn" not in page.text.lower()
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
        r = httpx.get(f"{hard.url}{asset}", timeout=10)
        assert r.status_code == 200 and len(r.content) > 10_000, asset


def test_bearer_scheme_is_case_insensitive(hard_repo: Path) -> None:
    with ServerThread(create_app(DataPlane(hard_repo, only=["digits"]), api_key="s3cret")) as s:
        url = f"{s.url}/v2/models/digits"
        assert httpx.get(url, headers={"Authorization": "bearer s3cret"}, timeout=5).status_code == 200
        assert httpx.get(url, headers={"Authorization": "BEARER s3cret"}, timeout=5).status_code == 200
        assert httpx.get(url, headers={"Authorization": "Basic s3cret"}, timeout=5).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer s3cre"}, timeout=5).status_code == 401


def test_readiness_tells_the_truth_when_a_model_failed_to_load(hard_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(hard_repo / "digits", repo / "digits")
    shutil.copytree(hard_repo / "slow", repo / "slow")
    weights = next((repo / "slow").glob("*/variants/eager-fp32/weights.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")  # tampered
    with ServerThread(create_app(DataPlane(repo)), ready=False) as s:
        deadline = time.monotonic() + 60
        while "slow" not in httpx.post(f"{s.url}/v2/repository/index", timeout=5).text or \
                "UNAVAILABLE" not in httpx.post(f"{s.url}/v2/repository/index", timeout=5).text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.get(f"{s.url}/v2/health/ready", timeout=5)
        assert r.status_code == 503 and "sha256" in r.json()["reasons"]["slow"]


def _serve(repo: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kiln", "serve", str(repo), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_exits_non_zero_when_no_model_can_load(hard_repo: Path, tmp_path: Path, workers: str) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(hard_repo / "slow", repo / "slow")
    extra = next((repo / "slow").glob("*/variants/eager-fp32")) / "extra.py"
    extra.write_text("print('not from the build')\n")
    proc, _ = _serve(repo, "--workers", workers)
    assert proc.wait(timeout=120) == 1
    err = proc.stderr.read() if proc.stderr else ""
    assert "no model could be loaded" in err and "unexpected files" in err and "Traceback" not in err
    if workers == "2":
        assert "could load no model; stopping" in err and not _children_alive(proc.pid)


def _children_alive(pid: int) -> bool:
    return any(Path(f"/proc/{p}/stat").is_file() and f" {pid} " in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:16]
               for p in os.listdir("/proc") if p.isdigit())


@pytest.mark.parametrize(("device", "message"), [("gpu", "unknown device 'gpu'"), ("cuda:0", "no CUDA GPU")])
def test_serve_checks_the_device_before_loading(hard_repo: Path, device: str, message: str) -> None:
    if device.startswith("cuda") and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    p = subprocess.run([sys.executable, "-m", "kiln", "serve", str(hard_repo), "--device", device],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_a_head_that_never_completes_is_closed(hard_repo: Path) -> None:
    proc, url = _serve(hard_repo, "--models", "digits", "--header-timeout-s", "1")
    try:
        wait_ready(url, proc)
        port = int(url.rsplit(":", 1)[1])
        for partial in (b"", b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                t0 = time.monotonic()
                sock.sendall(partial)
                assert sock.recv(1024) == b""  # closed by the server, not by our 10 s timeout
                assert time.monotonic() - t0 < 5
        assert httpx.get(f"{url}/v2/health/live", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_sigterm_under_load_loses_nothing_and_exits_in_time(hard_repo: Path) -> None:
    """12 requests of 300 ms queue 3.6 s of work; with --grace-s 2 the first ones run and the rest are answered
    503 with Retry-After. No request is lost (no 500, no dropped connection), and the process exits 0 in time."""
    grace_s = 2.0
    proc, url = _serve(hard_repo, "--models", "slow,digits", "--grace-s", str(grace_s), "--max-queue-size", "64")
    try:
        wait_ready(url, proc)
        body = {"inputs": [_v2("x", np.zeros((1, 4), np.float32))]}

        def call(_: int) -> int | str:
            try:
                r = httpx.post(f"{url}/v2/models/slow/infer", json=body, timeout=30)
            except httpx.TransportError as e:
                return f"lost: {type(e).__name__}"
            if r.status_code == 503 and r.headers.get("Retry-After") != "1":
                return "503 without Retry-After"
            return r.status_code

        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(call, i) for i in range(12)]
            deadline = time.monotonic() + 30  # 10 s ran out once in a full cold `make test` (twelve Python threads)
            while gauge(url, "kiln_in_flight", "slow") < 12:  # every request in (a later one would be refused)
                assert time.monotonic() < deadline, "the queue never filled"
                time.sleep(0.01)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        code = proc.wait(timeout=30)
        exit_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    assert set(results) <= {200, 503}, results
    assert results.count(200) >= 4  # what fits in the grace period ran
    assert exit_s < grace_s + 3.0, exit_s

    idle, url2 = _serve(hard_repo, "--models", "digits", "--grace-s", "30")
    wait_ready(url2, idle)
    t0 = time.monotonic()
    idle.send_signal(signal.SIGTERM)
    assert idle.wait(timeout=30) == 0
    assert time.monotonic() - t0 < 2.0  # an idle server does not wait out its grace period
