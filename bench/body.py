"""The front end's cost per request body: one `kiln serve` worker receiving 1- and 16-image tensors.

    .venv/bin/python bench/body.py                 # pool224 on CPU: 602 KB and 9.6 MB binary bodies

Builds pool224 (serve.py's PoolHead: 3x224x224 images into a pooling head, almost no compute) and starts
`kiln serve --workers 1 --worker-devices engine` on it twice: with kiln's malloc settings
(kiln.server.run.keep_freed_memory) and with KILN_KEEP_FREED_MEMORY=0 (glibc's defaults). Each load is
`concurrency` keep-alive connections sending binary requests of `rows` images for about --seconds, --repeats
times. The figures are the worker process's CPU per request (user and system, from /proc) and its minor page
faults per request: at 16 images per request the workers' event loops are what limits a two-GPU server
(bench/multigpu.py). This process is the load generator; on a 2-core machine it shares the cores with the server,
so req/s is a lower bound and CPU per request is the figure to compare. Prints medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from serve import drive, free_port, process_tree, request_bytes, stop, wait_ready  # noqa: E402

import kiln  # noqa: E402

LOADS = ((1, 8), (16, 4))  # (images per request, concurrency)


def build(work: Path) -> Path:
    import torch
    from safetensors.torch import save_model
    from serve import PoolHead

    torch.manual_seed(0)
    save_model(PoolHead().eval(), str(work / "m.safetensors"))
    r = kiln.build(f"{ROOT}/bench/serve.py:PoolHead", weights=work / "m.safetensors", name="pool224",
                   inputs=["image:float32[batch,3,224,224]"], repo=work / "models", variants=["eager/fp32"],
                   batch=(1, 64), report=False)
    assert r.path is not None
    return work / "models"


def _stat(pid: int) -> tuple[float, float, int]:
    """(user s, system s, minor faults) of one process."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(f[11]) / tick, int(f[12]) / tick, int(f[7])


def worker_pid(server: int) -> int:
    for pid in process_tree(server):
        if b"kiln.server.workers" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise RuntimeError("no worker process under the server")


def measure(port: int, worker: int, rows: int, concurrency: int, seconds: float) -> dict[str, float]:
    x = np.random.default_rng(rows).standard_normal((rows, 3, 224, 224), dtype=np.float32)
    req = request_bytes("/v2/models/pool224/infer", x, True)
    elapsed, lat, errors = drive(port, [req], 4 * concurrency, concurrency)  # warm-up, and the rate to size the run
    total = max(8 * concurrency, int(len(lat) / elapsed * seconds))
    u0, s0, f0 = _stat(worker)
    elapsed, lat, errors = drive(port, [req], total, concurrency)
    u1, s1, f1 = _stat(worker)
    n = len(lat)
    assert errors == 0, f"{errors} requests failed"
    return {"req_per_s": n / elapsed, "cpu_ms": (u1 - u0 + s1 - s0) / n * 1e3, "user_ms": (u1 - u0) / n * 1e3,
            "sys_ms": (s1 - s0) / n * 1e3, "faults": (f1 - f0) / n, "mb_per_s": n * len(req) / elapsed / 1e6}


def run_config(repo: Path, keep: bool, seconds: float, repeats: int) -> dict[str, list[dict[str, float]]]:
    port = free_port()
    env = {**os.environ, "KILN_KEEP_FREED_MEMORY": "1" if keep else "0",  # this checkout's kiln, not an installed one
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "kiln", "serve", str(repo), "--port", str(port), "--workers", "1",
           "--worker-devices", "engine", "--device", "cpu", "--max-batch-size", "64", "--max-body-mb", "256"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict[str, list[dict[str, float]]] = {}
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, "/v2/models/pool224/ready")
        worker = worker_pid(proc.pid)
        for _ in range(repeats):
            for rows, conc in LOADS:
                out.setdefault(f"{rows}:{conc}", []).append(measure(port, worker, rows, conc, seconds))
    finally:
        stop(proc)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=6.0, help="about this long per load and repeat (default 6)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write every result as JSON here")
    args = p.parse_args()
    results: dict[str, Any] = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                         capture_output=True, text=True).stdout.strip()}
    with tempfile.TemporaryDirectory(prefix="kiln-body-") as tmp:
        repo = build(Path(tmp))
        for name, keep in (("glibc defaults", False), ("keep_freed_memory", True)):
            results[name] = run_config(repo, keep, args.seconds, args.repeats)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\none worker, pool224 binary bodies, medians of {args.repeats} (commit {results['commit']})")
    print(f"{'malloc':<18} {'images':>6} {'conc':>4} {'req/s':>8} {'MB/s':>7} {'worker CPU ms/req':>18} "
          f"{'user':>6} {'sys':>6} {'faults/req':>10}")
    for name in ("glibc defaults", "keep_freed_memory"):
        for load, runs in results[name].items():
            rows, conc = load.split(":")
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"{name:<18} {rows:>6} {conc:>4} {med['req_per_s']:>8.1f} {med['mb_per_s']:>7.0f} "
                  f"{med['cpu_ms']:>18.2f} {med['user_ms']:>6.2f} {med['sys_ms']:>6.2f} {med['faults']:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
