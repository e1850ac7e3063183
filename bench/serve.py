"""Serving benchmark: kiln serve against Triton and a hand-written FastAPI + TorchScript server, in one run.

    .venv/bin/python bench/serve.py                                    # kiln and the hand-written baseline
    .venv/bin/python bench/serve.py --triton-python .venv-triton/bin/python   # + Triton as a peer
    .venv/bin/python bench/serve.py --quick                            # fewer requests

Triton: `tritonserver` and its python backend ship inside the `nvidia-pytriton` wheel, which pins numpy<2 and so
lives in its own environment: `python3 -m venv .venv-triton && .venv-triton/bin/pip install nvidia-pytriton
torch==2.13.0`. Triton serves the same TorchScript file through a python-backend model (bench/triton_model.py)
with dynamic batching (max 8, 5 ms window) and one CPU instance, on HTTP and gRPC.

Models: (b) tiny, a small conv net on 3x32x32 (the issue's figure); optionally (a) digits and (c) mid, a mid-size conv
net on 3x128x128, and (d) pool224, 3x224x224 images into a pooling head: 602 KB bodies and almost no compute, what
the front end costs per megabyte, binary and gRPC only (--models a,b,c,d). Each server runs in its own process; this process is the load generator:
`concurrency` keep-alive connections send requests as fast as answers come back (raw HTTP/1.1 over asyncio, and
grpc.aio with tritonclient's protos). CPU seconds per 1,000 requests are the server's process tree's (utime+stime
from /proc), so Triton's python-backend stub counts. kiln serves the variant its build selected; `kiln+shadow` is
the same with drift watch at --shadow-rate 0.01. Prints one table: req/s, p50, p99, max, CPU s per 1,000 requests,
and the cores the load generator itself used (near 1.0 it, not the server, is the limit). Where Triton's
perf_analyzer is installed (`make perf-analyzer`), kiln and Triton are also driven by it at c=64 over HTTP (binary
tensors) and gRPC: rows pa-http and pa-grpc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
import kiln  # noqa: E402


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                               nn.Linear(32, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.f(image)


class MidConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for out in (32, 64, 128, 256):
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
        self.f = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.f(image)


class PoolHead(nn.Module):
    """An image-sized input (3x224x224, 602 KB of fp32 per row) with almost no compute: what the front end costs
    per megabyte of request body, the load a GPU model's server carries."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(image.mean(dim=(2, 3)))


@dataclass
class Result:
    model: str
    body: str
    concurrency: int
    server: str
    requests: int
    errors: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_s_per_1k: float | None
    avg_batch: float | None
    client_cpu_s_per_1k: float | None = None  # the load generator's own CPU (this process): near 1 core, it is the limit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request_bytes(path: str, x: np.ndarray, binary: bool) -> bytes:
    if binary:
        head = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                                       "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        body = head + x.astype("<f4").tobytes()
        extra = f"Inference-Header-Content-Length: {len(head)}\r\nContent-Type: application/octet-stream\r\n"
    else:
        body = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                                       "data": x.ravel().tolist()}]}).encode()
        extra = "Content-Type: application/json\r\n"
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _client(port: int, reqs: list[bytes], counter: list[int], total: int, lat: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while counter[0] < total:
            counter[0] += 1
            req = reqs[i % len(reqs)]
            i += 1
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if status != 200:
                errors[0] += 1
    finally:
        writer.close()


async def _drive(port: int, reqs: list[bytes], total: int, concurrency: int) -> tuple[float, list[float], int]:
    counter, lat, errors = [0], [], [0]
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(port, reqs, counter, total, lat, errors) for _ in range(concurrency)))
    return time.perf_counter() - t0, lat, errors[0]


def drive(port: int, reqs: list[bytes], total: int, concurrency: int) -> tuple[float, list[float], int]:
    try:
        import uvloop

        return uvloop.run(_drive(port, reqs, total, concurrency))
    except ImportError:
        return asyncio.run(_drive(port, reqs, total, concurrency))


def wait_ready(url: str, proc: subprocess.Popen[bytes], path: str) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.args}")
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def kiln_stats(url: str, model: str) -> tuple[int, int]:
    s = httpx.get(f"{url}/v2/models/{model}/stats").json()["model_stats"][0]
    return s["inference_count"], s["execution_count"]


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, utime + stime seconds) of every process, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(d.name)] = (int(f[1]), (int(f[11]) + int(f[12])) / tick)
    return stats


def process_tree(pid: int, stats: dict[int, tuple[int, float]] | None = None) -> set[int]:
    """A process and all its descendants (the workers of `kiln serve --workers N`, Triton's python-backend stubs)."""
    stats = _proc_stats() if stats is None else stats
    tree, grew = {pid}, True
    while grew:
        more = {p for p, (pp, _) in stats.items() if pp in tree} - tree
        grew = bool(more)
        tree |= more
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its descendants, from /proc."""
    stats = _proc_stats()
    return sum(stats.get(p, (0, 0.0))[1] for p in process_tree(pid, stats))


def measure(name: str, server: str, url: str, port: int, path: str, x_rows: list[np.ndarray], binary: bool,
            concurrency: int, total: int, model: str | None, pid: int, grpc_port: int | None = None) -> Result:
    if grpc_port is not None:
        run = lambda n: drive_grpc(grpc_port, name, x_rows, n, concurrency)  # noqa: E731
    else:
        reqs = [request_bytes(path, x, binary) for x in x_rows]
        run = lambda n: drive(port, reqs, n, concurrency)  # noqa: E731
    run(min(200, total))  # warm-up
    before = kiln_stats(url, model) if model else None
    cpu0, client0 = cpu_seconds(pid), time.process_time()
    wall, lat, errors = run(total)
    cpu, client = cpu_seconds(pid) - cpu0, time.process_time() - client0
    avg = None
    if model and before:
        after = kiln_stats(url, model)
        avg = (after[0] - before[0]) / max(1, after[1] - before[1])
    lat.sort()
    body = "grpc" if grpc_port is not None else "binary" if binary else "json"
    return Result(name, body, concurrency, server, len(lat), errors, len(lat) / wall, statistics.median(lat) * 1e3,
                  lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3, lat[-1] * 1e3, cpu / len(lat) * 1e3, avg,
                  client / len(lat) * 1e3)


def perf_analyzer() -> str | None:
    """Triton's perf_analyzer (`make perf-analyzer` puts it in .venv/bin), or None."""
    return shutil.which("perf_analyzer", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def measure_pa(name: str, server: str, url: str, protocol: str, port: int, x_rows: list[np.ndarray], concurrency: int,
               pid: int) -> Result:
    """The same model and concurrency driven by Triton's own load generator (C++; HTTP sends binary tensors):
    req/s, p50 and p99 of its last stable window; CPU per request and batch size over the whole run, from the
    server's own counts (the statistics extension, which both servers speak); client cores are perf_analyzer's.
    perf_analyzer reports no maximum latency."""
    import csv
    import resource

    work = Path(tempfile.mkdtemp(prefix="kiln-pa-"))
    report, data = work / "report.csv", work / "data.json"
    # The same rows as the other loads: perf_analyzer's own random bytes make NaNs, which kiln refuses (400).
    data.write_text(json.dumps({"data": [{"image": {"content": x.ravel().tolist(), "shape": list(x.shape[1:])}}
                                         for x in x_rows]}))
    cmd = [str(perf_analyzer()), "-m", name, "-u", f"127.0.0.1:{port}", "-i", protocol, "--concurrency-range",
           str(concurrency), "--input-data", str(data), "-p", "3000", "-f", str(report)]
    before = kiln_stats(url, name)
    cpu0, client0 = cpu_seconds(pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    client1, cpu, after = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_seconds(pid) - cpu0, kiln_stats(url, name)
    n, batches = after[0] - before[0], after[1] - before[1]
    if p.returncode != 0 or not report.exists():
        print(f"  perf_analyzer failed against {server}: {(p.stdout + p.stderr)[-800:]}", file=sys.stderr)
        return Result(name, f"pa-{protocol}", concurrency, server, n, 1, 0.0, 0.0, 0.0, 0.0, None, None)
    row = next(csv.DictReader(report.open()))
    client = (client1.ru_utime + client1.ru_stime) - (client0.ru_utime + client0.ru_stime)
    return Result(name, f"pa-{protocol}", concurrency, server, n, 0, float(row["Inferences/Second"]),
                  int(row["p50 latency"]) / 1e3, int(row["p99 latency"]) / 1e3, float("nan"), cpu / max(1, n) * 1e3,
                  n / max(1, batches), client / max(1, n) * 1e3)


async def _drive_grpc(port: int, model: str, xs: list[np.ndarray], total: int, concurrency: int) -> tuple[float, list[float], int]:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    reqs = []
    for x in xs:
        r = service_pb2.ModelInferRequest(model_name=model)
        t = r.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
        del t
        r.raw_input_contents.append(x.astype("<f4").tobytes())
        reqs.append(r)
    counter, lat, errors = [0], [], [0]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def client() -> None:
            i = 0
            while counter[0] < total:
                counter[0] += 1
                t0 = time.perf_counter()
                try:
                    await stub.ModelInfer(reqs[i % len(reqs)])
                except grpc.aio.AioRpcError:
                    errors[0] += 1
                lat.append(time.perf_counter() - t0)
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - t0, lat, errors[0]


def drive_grpc(port: int, model: str, xs: list[np.ndarray], total: int, concurrency: int) -> tuple[float, list[float], int]:
    return asyncio.run(_drive_grpc(port, model, xs, total, concurrency))


_TRITON_CONFIG = """backend: "python"
max_batch_size: 8
input [{{ name: "image", data_type: TYPE_FP32, dims: [{dims}] }}]
output [{{ name: "output", data_type: TYPE_FP32, dims: [10] }}]
dynamic_batching {{ max_queue_delay_microseconds: 5000 }}
instance_group [{{ kind: KIND_CPU, count: 1 }}]
"""


def start_triton(python: str, work: Path, name: str, shape: tuple[int, ...], ts: Path, http: int, grpc: int) -> subprocess.Popen[bytes]:
    """Triton from the nvidia-pytriton wheel of another environment, serving `ts` through the python backend."""
    site = subprocess.run([python, "-c", "import pytriton, os; print(os.path.dirname(os.path.dirname(pytriton.__file__)))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    dist = work / "tritonserver"
    if not dist.exists():
        shutil.copytree(Path(site) / "pytriton" / "tritonserver", dist, ignore=shutil.ignore_patterns("python_backend_stubs"))
        v = f"{sys.version_info[0]}.{sys.version_info[1]}"
        shutil.copy(Path(site) / "pytriton" / "tritonserver" / "python_backend_stubs" / v / "triton_python_backend_stub",
                    dist / "backends" / "python")
    repo = work / f"triton-{name}"
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "bench" / "triton_model.py", repo / name / "1" / "model.py")
    (repo / name / "config.pbtxt").write_text(_TRITON_CONFIG.format(dims=", ".join(map(str, shape))))
    env = {**os.environ, "LD_LIBRARY_PATH": f"{site}/nvidia_pytriton.libs", "KILN_PEER_MODEL": str(ts),
           "PATH": f"{Path(python).parent}:{os.environ['PATH']}"}
    return subprocess.Popen([str(dist / "bin" / "tritonserver"), "--model-repository", str(repo), "--backend-directory",
                             str(dist / "backends"), "--http-port", str(http), "--grpc-port", str(grpc),
                             "--metrics-port", str(free_port()), "--log-info", "false"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


LOADS = (("json", 1), ("json", 8), ("json", 64), ("binary", 1), ("binary", 64), ("grpc", 64))
PA_LOADS = (("http", 64), ("grpc", 64))  # with perf_analyzer, kiln and Triton only (the baseline has no v2 gRPC)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a quarter of the requests")
    p.add_argument("--models", default="b", help="subset of a,b,c,d (default: b, the tiny conv net)")
    p.add_argument("--triton-python", help="python of an environment with nvidia-pytriton: adds Triton as a peer")
    p.add_argument("--requests", type=int, default=20_000, help="requests per load at c>1 (default: 20,000)")
    p.add_argument("--out", help="write every result as JSON here")
    p.add_argument("--workers", default="1,2", help="kiln serve --workers counts to measure, comma-separated: each is a "
                                                    "server row, kiln-wN (default: 1,2)")
    args = p.parse_args()
    scale = 0.25 if args.quick else 1.0
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-serve-"))
    repo = work / "models"
    torch.manual_seed(0)
    specs = {"a": ("digits", None, (1, 8, 8), {"max_batch_size": 32, "max_delay_ms": 1}),
             "b": ("tiny", TinyConv, (3, 32, 32), {"max_batch_size": 32, "max_delay_ms": 1}),
             "c": ("mid", MidConv, (3, 128, 128), {"max_batch_size": 64, "max_delay_ms": 5}),
             "d": ("pool224", PoolHead, (3, 224, 224), {"max_batch_size": 32, "max_delay_ms": 1})}
    chosen = [k for k in "abcd" if k in args.models.split(",")]
    print(f"building models in {repo} ...", file=sys.stderr, flush=True)
    for key in chosen:
        name, cls, shape, cfg = specs[key]
        backends = ("eager", "torchscript", "onnxruntime")
        if cls is None:
            d = ROOT / "examples" / "digits"
            r = kiln.build(f"{d}/model.py:DigitsNet", weights=d / "digits.safetensors", data=d / "test.npz",
                           repo=repo, backends=backends)
        else:
            from safetensors.torch import save_model

            m = cls().eval()
            save_model(m, str(work / f"{name}.safetensors"))
            r = kiln.build(f"{Path(__file__).resolve()}:{cls.__name__}", weights=work / f"{name}.safetensors",
                           inputs=[f"image:float32[batch,{','.join(map(str, shape))}]"], name=name, repo=repo,
                           backends=backends, objective="latency" if key != "c" else "throughput",
                           batch=(1, cfg["max_batch_size"]))
        print(f"  {name}: selected {r.selected}", file=sys.stderr, flush=True)
        (repo / name / "config.toml").write_text("".join(f"{k} = {v}\n" for k, v in cfg.items()))
    kilns = [("kiln" if w == "1" else f"kiln-w{w}") for w in args.workers.split(",")]
    servers = ["baseline", *kilns, "kiln+shadow"] + (["triton"] if args.triton_python else [])
    results: list[Result] = []
    rng = np.random.default_rng(0)
    for key in chosen:
        name, _, shape, _ = specs[key]
        total = int(args.requests * scale) if key in "ab" else int(args.requests * scale / 10)
        xs = [rng.standard_normal((1, *shape)).astype(np.float32) for _ in range(8)]
        ts = next((repo / name / "1" / "variants" / "torchscript-fp32").glob("*.pt"))
        for server in servers:
            if key == "d" and server == "kiln+shadow":  # its one load, JSON c=64, is not run for pool224
                continue
            port, gport = free_port(), free_port()
            url = f"http://127.0.0.1:{port}"
            if server.startswith("kiln"):
                cmd = [sys.executable, "-m", "kiln", "serve", str(repo), "--port", str(port), "--models", name,
                       "--grpc-port", str(gport)] + (["--shadow-rate", "0.01"] if server == "kiln+shadow" else [])
                if server.startswith("kiln-w"):
                    cmd += ["--workers", server.removeprefix("kiln-w")]
                proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
                wait_ready(url, proc, "/v2/health/ready")
            elif server == "triton":
                proc = start_triton(args.triton_python, work, name, shape, ts, port, gport)
                wait_ready(url, proc, "/v2/health/ready")
            else:
                cmd = [sys.executable, "-m", "uvicorn", "bench.baseline_app:app", "--port", str(port), "--log-level",
                       "warning", "--no-access-log"]
                proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "KILN_BASELINE_MODEL": str(ts)})
                wait_ready(url, proc, "/docs")
            try:
                for body, conc in LOADS:
                    if server == "baseline" and body == "grpc" or server == "kiln+shadow" and (body, conc) != ("json", 64):
                        continue
                    if key == "d" and body == "json":  # 3 MB of JSON per image: binary is how images are sent
                        continue
                    # The baseline's lean endpoint (request.json() + numpy) beat its pydantic one here.
                    suffix = ("_binary" if body == "binary" else "_lean") if server == "baseline" else ""
                    path = f"/v2/models/{name}/infer{suffix}"
                    n = total if conc > 1 else max(200, total // 10)
                    res = measure(name, server, url, port, path, xs, body == "binary", conc, n,
                                  name if server.startswith("kiln") else None, proc.pid,
                                  gport if body == "grpc" else None)
                    results.append(res)
                    print(f"  {name} {res.body:6s} c={conc:<3d} {server:11s} {res.req_per_s:8.0f} req/s  "
                          f"p50 {res.p50_ms:6.2f}  p99 {res.p99_ms:7.2f}  max {res.max_ms:7.1f} ms  "
                          f"cpu {res.cpu_s_per_1k or 0:5.2f} s/1k  client cpu {res.client_cpu_s_per_1k or 0:5.2f} s/1k  "
                          f"errors {res.errors}", file=sys.stderr, flush=True)
                if server != "baseline" and server != "kiln+shadow" and perf_analyzer() is not None:
                    for protocol, conc in PA_LOADS:
                        res = measure_pa(name, server, url, protocol, port if protocol == "http" else gport, xs,
                                         conc, proc.pid)
                        results.append(res)
                        print(f"  {name} {res.body:7s} c={conc:<3d} {server:11s} {res.req_per_s:8.0f} req/s  "
                              f"p50 {res.p50_ms:6.2f}  p99 {res.p99_ms:7.2f} ms  cpu {res.cpu_s_per_1k or 0:5.2f} s/1k",
                              file=sys.stderr, flush=True)
            finally:
                stop(proc)
    if perf_analyzer() is None:
        print("perf_analyzer not found (make perf-analyzer installs it): its rows are left out", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in results], indent=2))
    print_table(results)
    return 0


def print_table(results: list[Result]) -> None:
    print(f"\n{'model':6s} {'load':7s} {'conc':>4s} {'server':11s} | {'req/s':>7s} {'p50 ms':>7s} {'p99 ms':>7s} "
          f"{'max ms':>7s} {'CPU s/1k':>8s} {'batch':>5s} {'client cores':>12s}")
    for r in results:
        print(f"{r.model:6s} {r.body:7s} {r.concurrency:4d} {r.server:11s} | {r.req_per_s:7.0f} {r.p50_ms:7.2f} {r.p99_ms:7.2f} "
              f"{r.max_ms:7.1f} {r.cpu_s_per_1k or 0:8.2f} {r.avg_batch or 0:5.1f} "
              f"{(r.client_cpu_s_per_1k or 0) * r.req_per_s / 1e3:12.2f}" + ("  errors!" if r.errors else ""))
    keyed = {(r.model, r.body, r.concurrency, r.server): r for r in results}
    checks = []

    kilns = sorted({r.server for r in results if r.server == "kiln" or r.server.startswith("kiln-w")})

    def vs(body: str, conc: int, peer: str, ratio: float, tail: bool) -> None:
        t = keyed.get(("tiny", body, conc, peer))
        for server in kilns:
            k = keyed.get(("tiny", body, conc, server))
            if k and t:
                ok = k.req_per_s >= ratio * t.req_per_s and (not tail or k.p99_ms < t.p99_ms)
                checks.append((f"{server}: {body} c={conc}: >= {ratio:g}x {peer} req/s" + (", p99 below" if tail else ""),
                               ok, f"{k.req_per_s / t.req_per_s:.2f}x, p99 {k.p99_ms:.2f} vs {t.p99_ms:.2f} ms"))

    vs("json", 8, "triton", 2.0, False)
    vs("json", 64, "triton", 1.5, True)
    vs("binary", 64, "triton", 2.0, True)
    vs("grpc", 64, "triton", 1.0, False)
    vs("pa-http", 64, "triton", 1.0, False)
    vs("pa-grpc", 64, "triton", 1.0, False)
    vs("json", 1, "baseline", 1.0, False)
    for server in kilns:
        b64 = keyed.get(("tiny", "binary", 64, server))
        if b64:
            checks.append((f"{server}: no stalls: binary c=64 slowest of {b64.requests:,} within 3x p99",
                           b64.max_ms <= 3 * b64.p99_ms, f"max {b64.max_ms:.1f} ms, p99 {b64.p99_ms:.2f} ms"))
    plain, shadow = keyed.get(("tiny", "json", 64, "kiln")), keyed.get(("tiny", "json", 64, "kiln+shadow"))
    if plain and shadow:
        checks.append(("drift watch at 1%: cost on JSON c=64", True,
                       f"req/s {shadow.req_per_s / plain.req_per_s:.2f}x, p99 {shadow.p99_ms:.2f} vs {plain.p99_ms:.2f} ms"))
    for server in kilns:
        for key in ("json", "binary"):
            k, t = keyed.get(("tiny", key, 64, server)), keyed.get(("tiny", key, 64, "triton"))
            if k and t and k.cpu_s_per_1k and t.cpu_s_per_1k:
                checks.append((f"{server}: {key} c=64: CPU per request against Triton", True,
                               f"{k.cpu_s_per_1k:.2f} vs {t.cpu_s_per_1k:.2f} s per 1,000 "
                               f"({k.cpu_s_per_1k / t.cpu_s_per_1k:.2f}x)"))
    if checks:
        print("\ntargets (tiny)")
        for what, ok, detail in checks:
            print(f"  {'PASS' if ok else 'MISS'}  {what}: {detail}")


if __name__ == "__main__":
    sys.exit(main())
