"""A real uvicorn server on loopback, real HTTP clients (httpx, tritonclient)."""

from __future__ import annotations

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

import kiln
from kiln.server.app import create_app
from kiln.server.dataplane import DataPlane
from kiln.server.run import HeaderTimeoutProtocol, _fill
from support import DIGITS
from v2client import check_two, gauge

from .conftest import ServerThread


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    z = np.load(DIGITS / "test.npz")
    return z["image"], z["labels"]


def v2(name: str, x: np.ndarray, datatype: str = "FP32") -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.ravel().tolist()}]}


def test_health_and_metadata(server: ServerThread) -> None:
    c = httpx.Client(base_url=server.url)
    assert c.get("/v2/health/live").status_code == 200
    assert c.get("/v2/health/ready").status_code == 200
    meta = c.get("/v2").json()
    assert meta["name"] == "kiln" and {"binary_tensor_data", "statistics", "model_repository"} <= set(meta["extensions"])
    m = c.get("/v2/models/digits").json()
    assert m["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert m["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
    assert c.get("/v2/models/digits/versions/1").status_code == 200
    assert c.get("/v2/models/digits/versions/7").status_code == 404
    assert c.get("/v2/models/digits/ready").status_code == 200
    cfg = c.get("/v2/models/digits/config").json()
    assert cfg["max_batch_size"] == 32 and cfg["input"][0] == {"name": "image", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}
    assert c.get("/v2/models/nope").status_code == 404
    assert "swagger" in c.get("/docs").text.lower()
    assert "/v2/models/{model}/infer" in c.get("/openapi.json").json()["paths"]


def test_json_inference_matches_the_artifact(server: ServerThread, serve_repo: Path, digits: tuple) -> None:
    x, y = digits
    r = httpx.post(f"{server.url}/v2/models/digits/infer", json={**v2("image", x[:30]), "id": "req-7"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-7" and body["model_name"] == "digits" and body["model_version"] == "1"
    out = np.asarray(body["outputs"][0]["data"], np.float32).reshape(body["outputs"][0]["shape"])
    np.testing.assert_allclose(out, kiln.load(str(serve_repo / "digits"))(x[:30]), rtol=1e-5, atol=1e-5)
    assert (out.argmax(1) == y[:30]).mean() > 0.95


def test_binary_extension_by_hand(server: ServerThread, digits: tuple) -> None:
    x = digits[0][:3]
    head = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [3, 1, 8, 8],
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
    r = httpx.post(f"{server.url}/v2/models/digits/infer", content=head + x.tobytes(),
                   headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    meta = json.loads(r.content[:n])["outputs"][0]
    assert meta["parameters"]["binary_data_size"] == 3 * 10 * 4
    assert np.frombuffer(r.content[n:], np.float32).reshape(3, 10).argmax(1).shape == (3,)


def test_tritonclient(server: ServerThread) -> None:
    client, a, b, score = check_two(server.url)
    # no outputs named: tritonclient asks for every output in binary
    ins = [triton.InferInput("a", [5, 4], "FP32"), triton.InferInput("b", [5, 6], "FP32")]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b)
    np.testing.assert_allclose(client.infer("two", ins).as_numpy("score"), score, rtol=1e-6)
    stats = client.get_inference_statistics("two")["model_stats"][0]
    assert stats["inference_count"] >= 15 and stats["inference_stats"]["success"]["count"] >= 3
    index = {m["name"]: m["state"] for m in client.get_model_repository_index()}
    assert index["two"] == "READY" and index["digits"] == "READY"
    wide = triton.InferInput("a", [5, 4], "FP64")  # numpy's default dtype: converted, as kiln.load's runner does
    wide.set_data_from_numpy(a.astype(np.float64))
    np.testing.assert_allclose(client.infer("two", [wide, ins[1]]).as_numpy("score"), score, rtol=1e-6)
    with pytest.raises(triton.InferenceServerException, match="it takes any of FP16/FP32/FP64, got 'INT32'"):
        bad = triton.InferInput("a", [5, 4], "INT32")
        bad.set_data_from_numpy(a.astype(np.int32))
        client.infer("two", [bad, ins[1]])


def test_every_client_gets_its_own_rows(server: ServerThread, serve_repo: Path, digits: tuple) -> None:
    """64 concurrent clients, 1-3 rows each, batched together: each must get exactly its rows back."""
    x = digits[0]
    want = kiln.load(str(serve_repo / "digits"))(x[:200])
    jobs = [(i, 1 + i % 3) for i in range(0, 190, 3)]

    def call(job: tuple[int, int]) -> tuple[int, int, np.ndarray]:
        lo, n = job
        with httpx.Client(base_url=server.url) as c:
            r = c.post("/v2/models/digits/infer", json=v2("image", x[lo:lo + n]))
            assert r.status_code == 200, r.text
            o = r.json()["outputs"][0]
            return lo, n, np.asarray(o["data"], np.float32).reshape(o["shape"])

    with ThreadPoolExecutor(64) as pool:
        for lo, n, got in pool.map(call, jobs * 2):
            np.testing.assert_allclose(got, want[lo:lo + n], rtol=1e-4, atol=1e-5)
    stats = httpx.get(f"{server.url}/v2/models/digits/stats").json()["model_stats"][0]
    assert stats["execution_count"] < stats["inference_stats"]["success"]["count"]  # requests were batched


def test_failing_request_fails_alone(server: ServerThread) -> None:
    good = np.ones((2, 4), np.float32)
    bad = np.full((1, 4), 13, np.float32)

    def call(x: np.ndarray) -> httpx.Response:
        return httpx.post(f"{server.url}/v2/models/poison/infer", json=v2("x", x), timeout=30)

    with ThreadPoolExecutor(8) as pool:  # the poison model waits 100 ms for company: these share a batch
        rs = list(pool.map(call, [good, bad, good, good]))
    assert [r.status_code for r in rs] == [200, 500, 200, 200]
    err = rs[1].json()  # a model fault: 500 with a request id; the exception text stays in the server log
    assert err["request_id"] in err["error"] and "poisoned" not in err["error"]
    assert rs[0].json()["outputs"][0]["data"] == [2.0] * 8


def test_overload_and_timeouts(server: ServerThread) -> None:
    x = np.zeros((1, 4), np.float32)

    def call(timeout_ms: int | None = None) -> httpx.Response:
        h = {"kiln-timeout-ms": str(timeout_ms)} if timeout_ms else {}
        return httpx.post(f"{server.url}/v2/models/slow/infer", json=v2("x", x), headers=h, timeout=30)

    before = httpx.get(f"{server.url}/v2/models/slow/stats").json()["model_stats"][0]["inference_count"]
    with ThreadPoolExecutor(8) as pool:  # one running, two queued, the rest refused
        rs = list(pool.map(lambda _: call(), range(8)))
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) >= 3 and 429 in codes, codes
    refused = next(r for r in rs if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1" and "queue full" in refused.json()["error"]
    ran = httpx.get(f"{server.url}/v2/models/slow/stats").json()["model_stats"][0]["inference_count"] - before
    assert ran == codes.count(200)

    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(call)
        deadline = time.monotonic() + 10
        while not (gauge(server.url, "kiln_in_flight", "slow") == 1 and gauge(server.url, "kiln_queue_depth", "slow") == 0):
            assert time.monotonic() < deadline, "the busy request never started"
            time.sleep(0.005)
        late = call(timeout_ms=50)  # "busy" is running: this one waits in the queue and expires there
        assert busy.result().status_code == 200
    assert late.status_code == 504 and "timed out" in late.json()["error"]
    assert call().status_code == 200  # one at a time, in order: had "late" run, it would have run before this
    stats = httpx.get(f"{server.url}/v2/models/slow/stats").json()["model_stats"][0]
    assert stats["inference_count"] - before == ran + 2  # busy and the last one; the expired request never ran



HOSTILE = [
    (b"{", "malformed JSON"),
    (b"\xff\xfe\x00", "malformed JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "malformed JSON"),
    (b'{"inputs": "image"}', "non-empty list"),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [1]}]}', "64 elements"),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1e9, 1, 8, 8], "data": [1]}]}', "non-negative integers"),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [99, 1, 8, 8], "data": []}]}', "6336 elements"),
    (json.dumps(v2("image", np.zeros((99, 1, 8, 8), np.float32))).encode(), "99 rows, more than max_batch_size 32"),
    (json.dumps(v2("image", np.full((1, 1, 8, 8), np.inf, np.float32))).replace("Infinity", "1e999").encode(), "malformed JSON"),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [[["x"]]]}]}', "list of FP32 numbers"),
]


def test_hostile_bodies_get_400_and_the_server_stays_up(server: ServerThread, digits: tuple) -> None:
    url = f"{server.url}/v2/models/digits/infer"
    for body, needle in HOSTILE:
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and needle in r.json()["error"], (body[:80], r.status_code, r.text[:300])
    r = httpx.post(url, content=b"0" * (2 << 20))
    assert r.status_code == 413 and "limit" in r.json()["error"]
    r = httpx.post(url, content=b'{"inputs": []}', headers={"Inference-Header-Content-Length": "999"})
    assert r.status_code == 400
    nan = np.full((1, 1, 8, 8), np.nan, np.float32)
    head = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                   "parameters": {"binary_data_size": nan.nbytes}}]}).encode()
    r = httpx.post(url, content=head + nan.tobytes(), headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 400 and "NaN or infinity" in r.json()["error"]
    r = httpx.post(f"{server.url}/v2/models/nope/infer", json=v2("image", digits[0][:1]))
    assert r.status_code == 404 and "not loaded" in r.json()["error"]
    r = httpx.post(url, json={**v2("image", digits[0][:1]), "outputs": [{"name": "probs"}]})
    assert r.status_code == 400 and "unknown output 'probs'" in r.json()["error"]
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    assert httpx.post(url, json=v2("image", digits[0][:1])).status_code == 200


def _read_response(sock: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    n = int(headers["content-length"])
    while len(rest) < n:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        rest += chunk
    buf[:] = rest[n:]
    return int(lines[0].split()[1]), headers, rest[:n]


@pytest.mark.parametrize("read_into", [False, True], ids=["chunks", "read-into"])
def test_a_body_in_pieces_then_pipelined_requests_are_each_answered_exactly(server: ServerThread, serve_repo: Path,
                                                                           digits: tuple, read_into: bool,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a body has begun, the rest of it bypasses the HTTP parser (kiln.server.run.HeaderTimeoutProtocol):
    a body cut at odd places, the next requests in the same packet as its last bytes, and a connection closed
    mid-body must all come out as if parsed byte by byte. `read-into`: the rest of each body is read straight into
    its bytes (_BodyInto), as bodies of 256 KiB and more are."""
    if read_into and _fill is None:
        pytest.skip("this interpreter's bytes are not laid out as CPython's: bodies are read in chunks")
    monkeypatch.setattr(HeaderTimeoutProtocol, "read_into_min", 1 if read_into else 1 << 40)
    x = digits[0][:25]
    want = kiln.load(str(serve_repo / "digits"))(x)
    head = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [20, 1, 8, 8],
                                   "parameters": {"binary_data_size": x[:20].nbytes}}]}).encode()
    body = head + x[:20].tobytes()
    first = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: {len(head)}\r\n"
             f"Content-Length: {len(body)}\r\n\r\n").encode()
    json_body = json.dumps(v2("image", x[20:])).encode()
    second = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(json_body)}\r\n\r\n").encode() + json_body
    third = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(first + body[:7])  # the head and a few bytes go through the parser
        time.sleep(0.2)
        cuts = [7, 8, 100, 1001, 1002, 3333, len(body) - 1]
        for a, b in zip(cuts, cuts[1:]):  # the rest in odd pieces, each its own read
            sock.sendall(body[a:b])
            time.sleep(0.02)
        sock.sendall(body[-1:] + second + third)  # the body's last byte shares a read with two more requests
        buf = bytearray()
        status, headers, out = _read_response(sock, buf)
        assert status == 200, out
        meta = json.loads(out)["outputs"][0]
        np.testing.assert_allclose(np.asarray(meta["data"], np.float32).reshape(meta["shape"]), want[:20], rtol=1e-5,
                                   atol=1e-5)
        status, headers, out = _read_response(sock, buf)
        assert status == 200, out
        meta = json.loads(out)["outputs"][0]
        np.testing.assert_allclose(np.asarray(meta["data"], np.float32).reshape(meta["shape"]), want[20:], rtol=1e-5,
                                   atol=1e-5)
        assert _read_response(sock, buf)[0] == 200 and not buf
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:  # a body that never finishes
        sock.sendall(first + body[:1000])
        time.sleep(0.1)
        sock.sendall(body[1000:2000])
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:  # a body of a chunked request
        sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.1)
        for a in range(0, len(json_body), 100):
            part = json_body[a:a + 100]
            sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        status, headers, out = _read_response(sock, bytearray())
        assert status == 200, out
    assert httpx.post(f"{server.url}/v2/models/digits/infer", json=v2("image", x[:1])).status_code == 200


def _metric(text: str, name: str, model: str) -> float:
    total = 0.0
    for m in re.finditer(rf'^{name}\{{([^}}]*)\}} (\S+)$', text, re.M):
        if f'model="{model}"' in m[1]:
            total += float(m[2])
    return total


def test_metrics_move(server: ServerThread, digits: tuple) -> None:
    url = f"{server.url}/v2/models/digits/infer"
    before = httpx.get(f"{server.url}/metrics").text
    for n in (1, 2, 3):
        assert httpx.post(url, json=v2("image", digits[0][:n])).status_code == 200
    httpx.post(url, content=b"{")
    after = httpx.get(f"{server.url}/metrics").text
    d = {name: _metric(after, name, "digits") - _metric(before, name, "digits") for name in (
        "kiln_request_success_total", "kiln_request_failure_total", "kiln_inference_count_total",
        "kiln_execution_count_total", "kiln_request_duration_seconds_count", "kiln_queue_duration_seconds_count",
        "kiln_compute_duration_seconds_count")}
    assert d["kiln_request_success_total"] == 3 and d["kiln_request_failure_total"] == 1
    assert d["kiln_inference_count_total"] == 6 and 1 <= d["kiln_execution_count_total"] <= 3
    assert d["kiln_request_duration_seconds_count"] == 4 and d["kiln_queue_duration_seconds_count"] == 3
    assert 'kiln_queue_depth{model="digits",version="1"}' in after
    lag = re.search(r"^kiln_event_loop_lag_seconds_count (\S+)$", after, re.M)
    assert lag is not None and float(lag[1]) > 0, "the event loop's lag is measured while the server runs"


def test_statistics_report_compute_phases_as_perf_analyzer_expects(server: ServerThread, digits: tuple) -> None:
    """perf_analyzer aborts unless compute_input, compute_infer and compute_output have the same counts."""
    assert httpx.post(f"{server.url}/v2/models/digits/infer", json=v2("image", digits[0][:4])).status_code == 200
    s = httpx.get(f"{server.url}/v2/models/digits/stats").json()["model_stats"][0]
    phases = [s["inference_stats"][k] for k in ("compute_input", "compute_infer", "compute_output")]
    assert phases[0]["count"] == phases[1]["count"] == phases[2]["count"] == s["execution_count"] > 0
    assert all(p["ns"] > 0 for p in phases)
    for b in s["batch_stats"]:
        assert b["compute_input"]["count"] == b["compute_infer"]["count"] == b["compute_output"]["count"] > 0


def test_the_start_up_heap_is_frozen(server: ServerThread) -> None:
    import gc

    assert gc.get_freeze_count() > 10_000  # torch, the models and the app, out of the collector's reach


def test_v1_predict(server: ServerThread, digits: tuple) -> None:
    x, y = digits
    r = httpx.post(f"{server.url}/v1/models/digits:predict", json={"instances": x[:4].tolist()})
    assert r.status_code == 200, r.text
    assert (np.asarray(r.json()["predictions"]).argmax(1) == y[:4]).mean() >= 0.75
    r = httpx.post(f"{server.url}/v1/models/two:predict", json={"instances": [{"a": [0] * 4, "b": [1] * 6}]})
    assert r.status_code == 200 and set(r.json()["predictions"][0]) == {"embedding", "score"}
    assert httpx.post(f"{server.url}/v1/models/digits:predict", json={"rows": []}).status_code == 400


def test_repository_unload_and_load(server: ServerThread, digits: tuple) -> None:
    c = httpx.Client(base_url=server.url)
    assert c.post("/v2/repository/models/two/unload").status_code == 200
    assert c.get("/v2/models/two").status_code == 404
    assert {m["name"]: m["state"] for m in c.post("/v2/repository/index").json()}["two"] == "UNAVAILABLE"
    assert c.post("/v2/repository/models/two/load").status_code == 200
    assert c.get("/v2/models/two/ready").status_code == 200
    assert c.post("/v2/repository/models/nope/load").status_code == 404


def test_api_key(serve_repo: Path, digits: tuple) -> None:
    plane = DataPlane(serve_repo, only=["digits"])
    with ServerThread(create_app(plane, api_key="s3cret")) as s:
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 200
        r = httpx.post(f"{s.url}/v2/models/digits/infer", json=v2("image", digits[0][:1]))
        assert r.status_code == 401 and "Bearer" in r.json()["error"]
        assert httpx.get(f"{s.url}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = httpx.post(f"{s.url}/v2/models/digits/infer", json=v2("image", digits[0][:1]),
                       headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200


def test_instances_run_batches_in_parallel(serve_repo: Path) -> None:
    """Two instances of a 300 ms model answer two concurrent requests in about 300 ms, not 600."""
    plane = DataPlane(serve_repo, only=["slow"], overrides={"instances": 2, "max_batch_size": 1})
    with ServerThread(create_app(plane)) as s:
        assert httpx.get(f"{s.url}/v2/models/slow/config").json()["instance_group"][0]["count"] == 2
        x = np.zeros((1, 4), np.float32)
        t0 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            codes = list(pool.map(lambda _: httpx.post(f"{s.url}/v2/models/slow/infer", json=v2("x", x), timeout=30).status_code, range(2)))
        assert codes == [200, 200] and time.monotonic() - t0 < 0.55


def test_model_that_cannot_load_is_reported(serve_repo: Path) -> None:
    """A model whose device is missing: the rest of the repository serves; the index says why."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    plane = DataPlane(serve_repo, only=["digits", "two"], overrides={"devices": None})
    (serve_repo / "two" / "config.toml").write_text('devices = ["cuda:0"]\n')
    try:
        with ServerThread(create_app(plane), ready=False) as s:
            deadline = time.monotonic() + 60
            while any(m["state"] == "LOADING" for m in httpx.post(f"{s.url}/v2/repository/index").json()):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            index = {m["name"]: m for m in httpx.post(f"{s.url}/v2/repository/index").json()}
            assert index["digits"]["state"] == "READY"
            assert httpx.get(f"{s.url}/v2/health/ready").status_code == 503  # not every model is there
            assert index["two"]["state"] == "UNAVAILABLE" and "no CUDA GPU" in index["two"]["reason"]
            assert httpx.get(f"{s.url}/v2/models/two").status_code == 404
    finally:
        (serve_repo / "two" / "config.toml").unlink()


def test_served_runtimes_do_not_spin_unless_asked(serve_repo: Path) -> None:
    """A served ONNX Runtime session's idle threads sleep (its spinning pool took the event loop's CPU); kiln.load
    keeps onnxruntime's default, and spin = true in config.toml restores it for the server."""
    import asyncio

    assert kiln.load(serve_repo / "digits", variant="onnxruntime/fp32").info["spin"] is True

    async def served(spin: bool | None) -> bool:
        plane = DataPlane(serve_repo, only=["digits"], overrides={"variant": "onnxruntime/fp32", "spin": spin})
        m = await plane.load("digits")
        try:
            return bool(m.runners[0].info["spin"])
        finally:
            await plane.stop()

    assert asyncio.run(served(None)) is False
    assert asyncio.run(served(True)) is True


def _exchange(port: int, head: bytes, pieces: list[bytes], *, wait_continue: bool = False) -> tuple[int, bytes]:
    """One request over a raw socket, its body in `pieces` sent one by one with pauses; (status, response body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        if wait_continue:
            assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue"), "no 100 Continue"
        try:
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):  # answered (a 413) and closed before the body ended
            pass
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += sock.recv(1 << 16)
        top, rest = raw.split(b"\r\n\r\n", 1)
        length = int(next(v for k, v in (h.split(b":", 1) for h in top.split(b"\r\n")[1:]) if k.lower() == b"content-length"))
        while len(rest) < length:
            rest += sock.recv(1 << 16)
        return int(top.split(b" ")[1]), rest


def test_a_body_arrives_whole_however_it_is_framed(server: ServerThread) -> None:
    """kiln's HTTP protocol gathers a body with a Content-Length in one piece: the same answer whether the body
    came in one write, in slow pieces, after 100 Continue or chunked; a chunked body past the limit is a 413; a
    client gone mid-body costs nothing."""
    x = np.random.default_rng(3).standard_normal((32, 1, 8, 8)).astype(np.float32)
    # Trailing whitespace (valid JSON) takes the body past 3 x uvicorn's 64 KiB flow-control mark.
    body = json.dumps(v2("image", x)).encode() + b" " * 200_000
    path = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sized = path + b"Content-Length: %d\r\n" % len(body)
    want = httpx.post(f"{server.url}/v2/models/digits/infer", content=body, timeout=30)
    assert want.status_code == 200
    expected = np.asarray(want.json()["outputs"][0]["data"])
    thirds = [body[: len(body) // 3], body[len(body) // 3: 2 * len(body) // 3], body[2 * len(body) // 3:]]

    def chunked(data: bytes, size: int) -> list[bytes]:
        return [b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size]) for i in range(0, len(data), size)] + [b"0\r\n\r\n"]

    cases = {
        "one write": (sized + b"\r\n", [body], False),
        "slow pieces": (sized + b"\r\n", thirds, False),
        "100 Continue": (sized + b"Expect: 100-continue\r\n\r\n", thirds, True),
        "chunked": (path + b"Transfer-Encoding: chunked\r\n\r\n", chunked(body, 50_000), False),
    }
    for name, (head, pieces, wait) in cases.items():
        status, got = _exchange(server.port, head, pieces, wait_continue=wait)
        assert status == 200, (name, got[:300])
        np.testing.assert_array_equal(np.asarray(json.loads(got)["outputs"][0]["data"]), expected, err_msg=name)
    big = json.dumps(v2("image", np.zeros((4096, 1, 8, 8), np.float32))).encode()  # over 1 MiB
    status, got = _exchange(server.port, path + b"Transfer-Encoding: chunked\r\n\r\n", chunked(big, 1 << 18))
    assert status == 413 and b"--max-body-mb" in got, got[:300]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:  # gone halfway through the body
        sock.sendall(sized + b"\r\n" + thirds[0])
    assert httpx.post(f"{server.url}/v2/models/digits/infer", content=body, timeout=30).status_code == 200
