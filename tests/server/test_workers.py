"""`kiln serve --workers N`: several processes on one port that answer as one server, restart after a crash and
drain together on SIGTERM."""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from kiln.server.peers import merge_metrics, merge_statistics
from v2client import check_two, wait_ready

from .conftest import free_port

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _digits_body(rng: np.random.Generator) -> dict[str, object]:
    x = rng.standard_normal(64).astype(np.float32)
    return {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": x.tolist()}]}


def _send(url: str, connections: int, per_connection: int) -> int:
    """Requests over separate connections (the supervisor deals them to the workers); returns how many."""
    rng = np.random.default_rng(0)
    for _ in range(connections):
        with httpx.Client(headers=AUTH, timeout=30) as c:
            for _ in range(per_connection):
                r = c.post(f"{url}/v2/models/digits/infer", json=_digits_body(rng))
                assert r.status_code == 200, r.text
    return connections * per_connection


def _local_counts(url: str) -> dict[str, int]:
    """Each worker's own inference count, asked over fresh connections until both workers have answered."""
    seen: dict[str, int] = {}
    for _ in range(200):
        r = httpx.get(f"{url}/v2/models/digits/stats", headers={**AUTH, "kiln-worker-local": "1"}, timeout=10)
        seen[r.headers["kiln-worker"]] = r.json()["model_stats"][0]["inference_count"]
        if len(seen) == 2:
            break
    return seen


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and 'model="digits"' in line)


def _grpc_calls(port: int, channels: int) -> int:
    """One inference per gRPC channel (each channel is one connection, so one worker); returns how many."""
    import tritonclient.grpc as grpcclient

    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)
    for _ in range(channels):
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        inp = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(x)
        assert c.infer("digits", [inp], headers={"authorization": f"Bearer {KEY}"}).as_numpy("output").shape == (1, 10)
        c.close()
    return channels


def _grpc_statistics(port: int) -> dict[str, object]:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    doc: dict[str, object] = c.get_inference_statistics("digits", headers={"authorization": f"Bearer {KEY}"},
                                                         as_json=True)["model_stats"][0]
    c.close()
    return doc


def test_workers_answer_as_one_server_and_survive_a_crash(serve_repo: Path) -> None:
    port, gport = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "kiln", "serve", str(serve_repo), "--port", str(port), "--workers", "2",
                             "--models", "digits", "--api-key", KEY, "--grace-s", "5", "--grpc-port", str(gport),
                             "--device", "cpu", "--device", "cpu", "--worker-devices", "split"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url, proc)
        r = httpx.get(f"{url}/v2/health/ready", timeout=10)
        assert r.json() == {"ready": True} and r.headers["kiln-workers"] == "2/2"
        workers = _children(proc.pid)
        assert len(workers) == 2
        if "OMP_WAIT_POLICY" not in os.environ:  # the workers' default; a value the user set wins
            assert b"\0OMP_WAIT_POLICY=PASSIVE\0" in b"\0" + Path(f"/proc/{workers[0]}/environ").read_bytes()

        sent = _send(url, connections=24, per_connection=5)
        local = _local_counts(url)  # the supervisor deals connections in turn: 12 each (a kernel hash gave uneven shares)
        assert sorted(local.values()) == [60, 60], local
        sent += _grpc_calls(gport, channels=6)  # gRPC shares the port too (each worker binds it)
        local = _local_counts(url)
        assert len(local) == 2 and sum(local.values()) == sent and min(local.values()) > 0, local  # both served
        stats = httpx.get(f"{url}/v2/models/digits/stats", headers=AUTH, timeout=10)
        s = stats.json()["model_stats"][0]
        assert stats.headers["kiln-workers"] == "2/2" and s["inference_count"] == sent
        assert s["inference_stats"]["success"]["count"] == sent
        assert sum(b["compute_infer"]["count"] for b in s["batch_stats"]) == s["execution_count"]
        assert _grpc_statistics(gport)["inference_count"] == str(sent)  # gRPC's statistics are the whole server's too
        text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
        assert _metric(text, "kiln_request_success_total") == sent
        assert _metric(text, "kiln_in_flight") == 0
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401  # the key guards the merged answers too

        # Repository changes reach every worker, whichever one the request lands on.
        assert httpx.post(f"{url}/v2/repository/models/digits/unload", headers=AUTH, timeout=30).status_code == 200
        for _ in range(6):  # fresh connections: both workers answer in turn
            assert httpx.get(f"{url}/v2/models/digits/ready", headers=AUTH, timeout=10).status_code == 404
        r = httpx.post(f"{url}/v2/repository/models/digits/load", headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.headers["kiln-workers"] == "2/2"
        assert httpx.get(f"{url}/v2/models/digits/ready", headers=AUTH, timeout=10).status_code == 200

        os.kill(workers[0], signal.SIGKILL)  # a crash: the supervisor starts another, the other keeps serving
        deadline = time.monotonic() + 90
        while True:
            try:
                ready = httpx.get(f"{url}/v2/health/ready", timeout=10)
            except httpx.TransportError:  # dealt to the worker as it died (its queued connections go with it): again
                ready = None
            if ready is not None and ready.status_code == 200 and set(_children(proc.pid)) - set(workers):
                break
            assert proc.poll() is None and time.monotonic() < deadline, ready and ready.text
            time.sleep(0.2)
        assert _send(url, connections=8, per_connection=2) == 16
        replacement = set(_children(proc.pid)) - set(workers)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in [*workers[1:], *replacement])
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    assert ", 2 workers" in err and f"worker 0 (pid {workers[0]}) died (killed by signal 9); restarting it" in err
    # --worker-devices split: each worker runs digits on one of the two devices given, not on both
    assert "1 instance(s)) ready" in err and "2 instance(s)" not in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_a_supervisor_killed_outright_takes_its_workers_and_engines_with_it(serve_repo: Path) -> None:
    """SIGKILL gives the supervisor no chance to stop anything: the kernel sends each worker and engine SIGTERM
    (PR_SET_PDEATHSIG), so none is left behind holding the gRPC port, its shared memory or a GPU."""
    port, gport = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "kiln", "serve", str(serve_repo), "--port", str(port), "--workers", "2",
                             "--models", "digits", "--grace-s", "2", "--grpc-port", str(gport), "--device", "cpu",
                             "--worker-devices", "engine"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[int] = []
    try:
        wait_ready(url, proc)
        children = _children(proc.pid)
        assert len(children) == 3  # an engine, two workers
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in children):
            assert time.monotonic() < deadline, [(pid, _state(pid)) for pid in children]
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in children:  # what a failure above left behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie waits only to be reaped)."""
    return _state(pid) not in ("gone", "Z (zombie)")


def _state(pid: int) -> str:
    """The process's state as /proc says it ("R (running)", "Z (zombie)", ...), or "gone"."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("State:"))
    except (FileNotFoundError, StopIteration):
        return "gone"


def test_engines_run_the_models_and_the_workers_hand_them_batches(serve_repo: Path) -> None:
    """--worker-devices engine: one engine process per device holds the model, the workers hold none; answers are
    the model's own, through shared memory, and an engine that dies is restarted without the workers noticing
    beyond a retry."""
    import kiln

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "kiln", "serve", str(serve_repo), "--port", str(port), "--workers", "2",
                             "--models", "digits,two", "--grace-s", "5", "--device", "cpu", "--device", "cpu",
                             "--worker-devices", "engine"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, for the Ctrl-C below
    runner = kiln.load(serve_repo / "digits")
    x = np.random.default_rng(2).standard_normal((7, 1, 8, 8)).astype(np.float32)
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    try:
        wait_ready(url, proc)
        children = _children(proc.pid)
        assert len(children) == 4  # two engines, two workers
        for _ in range(6):  # fresh connections: both workers, and through them both engines
            r = httpx.post(f"{url}/v2/models/digits/infer", json=body, timeout=30)
            assert r.status_code == 200, r.text
            got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(7, 10)
            np.testing.assert_allclose(got, runner(x), rtol=1e-5, atol=1e-5)
        _, a, b, score = check_two(url)  # two inputs, two outputs, JSON and binary, through tritonclient
        np.testing.assert_allclose(score, kiln.load(serve_repo / "two")(a, b)["score"], rtol=1e-5, atol=1e-5)
        bad = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 7], "data": [0.0] * 56}]}
        r = httpx.post(f"{url}/v2/models/digits/infer", json=bad, timeout=30)
        assert r.status_code == 400 and "fix the shape" in r.text  # validated by the worker, never sent on
        engines = [pid for pid in children if "kiln.server.engine" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(engines) == 2
        maps = Path(f"/proc/{engines[0]}/maps").read_text() + Path(f"/proc/{engines[1]}/maps").read_text()
        # the workers' slot files (tmpfs, or the run folder without one), mapped by the engines
        slots = {Path(m[1]) for m in re.finditer(r"(/\S*slots)/w\d+-\d+", maps)}
        assert slots, "the engines read the workers' batches from shared memory"

        os.kill(engines[0], signal.SIGKILL)  # the supervisor restarts it; requests on it fail with 503 meanwhile
        deadline, answered = time.monotonic() + 90, 0
        while answered < 6:
            r = httpx.post(f"{url}/v2/models/digits/infer", json=body, timeout=30)
            assert r.status_code in (200, 503) and proc.poll() is None and time.monotonic() < deadline, r.text
            answered += r.status_code == 200
        assert len(set(_children(proc.pid)) - set(children)) == 1  # the new engine

        worker = next(pid for pid in children if pid not in engines)  # a worker's crash frees its slots
        mine = [f for d in slots for f in d.glob(f"w{worker}-*")]
        assert mine, "both workers sent batches (requests over fresh connections)"
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while any(f.exists() for f in mine) or len(_children(proc.pid)) < 4:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        wait_ready(url, proc)

        codes: list[int] = []

        def clients() -> None:
            with httpx.Client(timeout=30) as c:
                while len(codes) < 2000:
                    try:
                        codes.append(c.post(f"{url}/v2/models/digits/infer", json=body).status_code)
                    except httpx.HTTPError:
                        return

        load = [threading.Thread(target=clients) for _ in range(4)]
        for t in load:
            t.start()
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches every process: the engines must outlive the drain
        assert proc.wait(timeout=30) == 0
        for t in load:
            t.join()
        assert codes and set(codes) <= {200, 503}, collections.Counter(codes)  # 503: arrived during the drain
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    assert "engine processes on cpu, cpu) ready" in err and err.count("engine on cpu: digits version") >= 3, err[-3000:]
    assert err.count("engine on cpu: two version") >= 2
    assert f"engine on cpu (pid {engines[0]}) died (killed by signal 9); restarting it" in err
    assert "rows per batch" in err and "Traceback" not in err, err[-3000:]
    assert not any(d.exists() for d in slots)  # the supervisor removed the shared memory


def test_workers_refuse_a_taken_port_and_a_bad_count(serve_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before any process starts. The first refusal goes through a real `kiln serve` process; the others
    call the same CLI in this process (each Python start with torch costs seconds)."""
    from kiln.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "kiln", "serve", str(serve_repo), "--port", str(port), "--workers", "2",
                            "--models", "digits"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in p.stderr and "--port" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    for argv, message in ((["--workers", "0"], "--workers 0: give at least 1"),
                          (["--workers", "3", "--device", "cpu", "--device", "cpu", "--worker-devices", "split"],
                           "--workers a multiple of their count (got 2 device(s), 3 worker(s))"),
                          (["--worker-devices", "engine"], "--worker-devices engine needs the devices")):
        assert main(["serve", str(serve_repo), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "hint:" in err, err


def test_merged_metrics_sum_counters_and_keep_figures_per_worker() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from kiln.server.metrics import Metrics

    texts = {}
    for worker, (ok, in_flight, cosine) in enumerate([(3, 2, 0.999), (4, 1, 0.98)]):
        m = Metrics()  # what each worker's /metrics renders
        m.request_success.labels("m", "1").inc(ok)
        m.in_flight.labels("m", "1").set(in_flight)
        m.fidelity.labels("m", "y", "cosine").set(cosine)
        for rows in range(ok):
            m.batch_size.labels("m", "1").observe(rows + 1)
        texts[worker] = m.render().decode()
    merged = merge_metrics(texts).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(merged) for s in f.samples}
    m1 = (("model", "m"), ("version", "1"))
    assert samples[("kiln_request_success_total", m1)] == 7
    created = [v for (name, labels), v in samples.items() if name == "kiln_request_success_created"]
    assert len(created) == 1  # the earliest worker's start, one series
    assert samples[("kiln_in_flight", m1)] == 3
    assert samples[("kiln_batch_size_count", m1)] == 7 and samples[("kiln_batch_size_sum", m1)] == 6 + 10
    assert samples[("kiln_batch_size_bucket", (("le", "1.0"), *m1))] == 2
    fid = {dict(k[1])["worker"]: v for k, v in samples.items() if k[0] == "kiln_fidelity"}
    assert fid == {"0": 0.999, "1": 0.98}  # not additive: one series per worker
    assert "# TYPE kiln_request_success_total counter" in merged or "# TYPE kiln_request_success counter" in merged


def test_merged_statistics_sum_per_model_and_batch_size() -> None:
    def doc(n: int, sizes: dict[int, int]) -> dict[str, object]:
        d = {"count": n, "ns": 10 * n}
        return {"model_stats": [{"name": "m", "version": "1", "last_inference": n, "inference_count": n, "execution_count": n,
                                 "inference_stats": {k: dict(d) for k in ("success", "fail", "queue", "compute_input",
                                                                          "compute_infer", "compute_output")},
                                 "batch_stats": [{"batch_size": b, **{k: {"count": c, "ns": c} for k in
                                                                      ("compute_input", "compute_infer", "compute_output")}}
                                                 for b, c in sizes.items()]}]}

    s = merge_statistics([doc(3, {1: 2, 4: 1}), doc(5, {2: 5, 4: 3})])["model_stats"][0]
    assert s["inference_count"] == 8 and s["last_inference"] == 5
    assert s["inference_stats"]["compute_infer"] == {"count": 8, "ns": 80}
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in s["batch_stats"]] == [(1, 2), (2, 5), (4, 4)]


def test_the_dealer_hands_connections_in_turn_and_passes_over_a_gone_worker() -> None:
    """The supervisor's Dealer, in this process: three workers' pairs, six connections make two each, in the order
    they came; a worker whose end is closed (dead, restarting) is passed over. listen(count=2) is KILN_REUSEPORT's
    two sockets on one port."""
    from kiln.server.workers import Dealer, listen

    (sock,) = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    dealer = Dealer(sock, 3)
    workers = [dealer.channel(i) for i in range(3)]
    for w in workers:
        w.settimeout(10)
    dealer.start()
    got: list[list[int]] = [[], [], []]

    def take(i: int, n: int) -> None:
        for _ in range(n):
            _, fds, _, _ = socket.recv_fds(workers[i], 1, 4)
            with socket.socket(fileno=fds[0]) as conn:
                got[i].append(int(conn.recv(8)))  # the client's own number: each socket is the client's connection

    def connect(n: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(str(n).encode())

    try:
        for n in range(6):
            connect(n)
            take(n % 3, 1)
        assert got == [[0, 3], [1, 4], [2, 5]]
        workers[1].close()  # worker 1 is gone: the turn passes over it
        for n, i in ((6, 0), (7, 2), (8, 0)):
            connect(n)
            take(i, 1)
        assert got == [[0, 3, 6, 8], [1, 4], [2, 5, 7]]
    finally:
        dealer.stop()
        for w in workers:
            w.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)  # stopped: the port is closed, not silently open
    shared = listen("127.0.0.1", 0, 2)
    assert shared[0].getsockname() == shared[1].getsockname()
    assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in shared)
    for s in shared:
        s.close()
