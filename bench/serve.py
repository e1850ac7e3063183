"""Serving benchmark: kiln serve against a hand-written FastAPI + TorchScript baseline, in one run.

    .venv/bin/python bench/serve.py                 # all three models (about 6 minutes on 2 cores)
    .venv/bin/python bench/serve.py --quick         # fewer requests

Models: (a) digits (1x8x8), (b) a tiny conv net on 3x32x32, (c) a mid-size conv net on 3x128x128.
Each server runs in its own process; this process is the load generator: `concurrency` keep-alive
connections send a fixed number of requests as fast as answers come back. Both servers run without
access logs. The baseline (bench/baseline_app.py) parses JSON with `await request.json()` and numpy,
which measured faster here than its pydantic `list[float]` endpoint (453 vs 321 req/s on (b) at c=8). Prints req/s, p50, p99 and kiln's average batch size; writes JSON with --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
    avg_batch: float | None


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


def measure(name: str, server: str, url: str, port: int, path: str, x_rows: list[np.ndarray], binary: bool,
            concurrency: int, total: int, model: str | None) -> Result:
    reqs = [request_bytes(path, x, binary) for x in x_rows]
    drive(port, reqs, min(200, total), concurrency)  # warm-up
    before = kiln_stats(url, model) if model else None
    wall, lat, errors = drive(port, reqs, total, concurrency)
    avg = None
    if model and before:
        after = kiln_stats(url, model)
        avg = (after[0] - before[0]) / max(1, after[1] - before[1])
    lat.sort()
    return Result(name, "binary" if binary else "json", concurrency, server, len(lat), errors, len(lat) / wall,
                  statistics.median(lat) * 1e3, lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3, avg)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a quarter of the requests")
    p.add_argument("--models", default="a,b,c", help="subset of a,b,c")
    p.add_argument("--out", help="write every result as JSON here")
    args = p.parse_args()
    scale = 0.25 if args.quick else 1.0
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-serve-"))
    repo = work / "models"
    torch.manual_seed(0)
    specs = {"a": ("digits", None, (1, 8, 8), {"max_batch_size": 32, "max_delay_ms": 1}, 2000),
             "b": ("tiny", TinyConv, (3, 32, 32), {"max_batch_size": 32, "max_delay_ms": 1}, 3000),
             "c": ("mid", MidConv, (3, 128, 128), {"max_batch_size": 64, "max_delay_ms": 5}, 400)}
    chosen = [k for k in "abc" if k in args.models.split(",")]
    print(f"building models in {repo} ...", file=sys.stderr, flush=True)
    for key in chosen:
        name, cls, shape, cfg, _ = specs[key]
        backends = ("eager", "torchscript", "onnxruntime", "aoti")
        if cls is None:
            d = ROOT / "examples" / "digits"
            r = kiln.build(f"{d}/model.py:DigitsNet", weights=d / "digits.safetensors", data=d / "test.npz",
                           repo=repo, backend_names=backends)
        else:
            from safetensors.torch import save_model

            m = cls().eval()
            save_model(m, str(work / f"{name}.safetensors"))
            r = kiln.build(f"{Path(__file__).resolve()}:{cls.__name__}", weights=work / f"{name}.safetensors",
                           inputs=[f"image:float32[batch,{','.join(map(str, shape))}]"], name=name, repo=repo,
                           backend_names=backends, objective="latency" if key != "c" else "throughput",
                           batch_sizes=(1, cfg["max_batch_size"]))
        print(f"  {name}: selected {r.selected}", file=sys.stderr, flush=True)
        (repo / name / "config.toml").write_text("".join(f"{k} = {v}\n" for k, v in cfg.items()))
    results: list[Result] = []
    rng = np.random.default_rng(0)
    for key in chosen:
        name, _, shape, _, total = specs[key]
        total = int(total * scale)
        xs = [rng.standard_normal((1, *shape)).astype(np.float32) for _ in range(8)]
        ts = next((repo / name / "1" / "variants" / "torchscript-fp32").glob("*.pt"))
        for server in ("baseline", "kiln"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            if server == "kiln":
                cmd = [sys.executable, "-m", "kiln", "serve", str(repo), "--port", str(port), "--models", name]
                proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
                wait_ready(url, proc, "/v2/health/ready")
            else:
                cmd = [sys.executable, "-m", "uvicorn", "bench.baseline_app:app", "--port", str(port), "--log-level",
                       "warning", "--no-access-log"]
                proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "KILN_BASELINE_MODEL": str(ts)})
                wait_ready(url, proc, "/docs")
            try:
                for binary in (False, True):
                    # The baseline's lean endpoint (request.json() + numpy) beat its pydantic one here.
                    suffix = ("_binary" if binary else "_lean") if server == "baseline" else ""
                    path = f"/v2/models/{name}/infer{suffix}"
                    for conc in (1, 8, 64):
                        n = total if conc > 1 else max(100, total // 4)
                        res = measure(name, server, url, port, path, xs, binary, conc, n, name if server == "kiln" else None)
                        results.append(res)
                        print(f"  {name} {res.body:6s} c={conc:<3d} {server:8s} {res.req_per_s:8.0f} req/s  "
                              f"p50 {res.p50_ms:6.2f} ms  p99 {res.p99_ms:7.2f} ms  errors {res.errors}",
                              file=sys.stderr, flush=True)
            finally:
                stop(proc)
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in results], indent=2))
    print_table(results)
    return 0


def print_table(results: list[Result]) -> None:
    print(f"\n{'model':7s} {'body':6s} {'conc':>4s} | {'baseline req/s':>14s} {'p50':>7s} {'p99':>7s} | "
          f"{'kiln req/s':>10s} {'p50':>7s} {'p99':>7s} {'batch':>5s} | {'ratio':>5s}")
    keyed = {(r.model, r.body, r.concurrency, r.server): r for r in results}
    for (model, body, conc, server), k in keyed.items():
        if server != "kiln":
            continue
        b = keyed.get((model, body, conc, "baseline"))
        if b is None:
            continue
        print(f"{model:7s} {body:6s} {conc:4d} | {b.req_per_s:14.0f} {b.p50_ms:7.2f} {b.p99_ms:7.2f} | "
              f"{k.req_per_s:10.0f} {k.p50_ms:7.2f} {k.p99_ms:7.2f} {k.avg_batch or 0:5.1f} | {k.req_per_s / b.req_per_s:5.2f}x"
              + ("  errors!" if k.errors or b.errors else ""))
    checks = []
    tj, tjb = keyed.get(("tiny", "json", 8, "kiln")), keyed.get(("tiny", "json", 8, "baseline"))
    if tj and tjb:
        checks.append(("(b) JSON c=8: >= 2x baseline req/s, p99 no worse",
                       tj.req_per_s >= 2 * tjb.req_per_s and tj.p99_ms <= tjb.p99_ms,
                       f"{tj.req_per_s / tjb.req_per_s:.2f}x, p99 {tj.p99_ms:.2f} vs {tjb.p99_ms:.2f} ms"))
    tb = [r for r in results if r.model == "tiny" and r.body == "binary" and r.server == "kiln"]
    if tb:
        best = max(tb, key=lambda r: r.req_per_s)
        checks.append(("(b) binary: >= 2,500 req/s", best.req_per_s >= 2500, f"{best.req_per_s:,.0f} req/s at c={best.concurrency}"))
    for body in ("json", "binary"):
        mk, mb = keyed.get(("mid", body, 64, "kiln")), keyed.get(("mid", body, 64, "baseline"))
        if mk and mb:
            checks.append((f"(c) {body} c=64: >= 3x baseline throughput", mk.req_per_s >= 3 * mb.req_per_s,
                           f"{mk.req_per_s / mb.req_per_s:.2f}x"))
    if checks:
        print("\ntargets")
        for what, ok, detail in checks:
            print(f"  {'PASS' if ok else 'MISS'}  {what}: {detail}")


if __name__ == "__main__":
    sys.exit(main())
