"""Several GPUs: ResNet-50 on one GPU against two, for the model alone, `kiln predict` and `kiln serve`.

    python3 bench/multigpu.py --out results.json      # a machine with two GPUs (nvidia-h200-x2 here)

One build (`kiln.build(device="cuda:0")`, variant eager/fp16+bnfold+channels_last+cudagraphs, buckets up to 256:
it builds in seconds, where the compile variant recompiles per device at load), then three measurements, each
with one GPU and with two, in the same run:

1. the model alone: the runner on each GPU in its own thread, batch 256 from device-resident inputs, img/s (the
   ceiling: what the GPUs give when nothing else is in the way);
2. `kiln predict` over .npy files of images (--device cuda:0, then cuda:0,cuda:1), batch 256, DataLoader workers,
   img/s including reading, pinned copies, writing;
3. `kiln serve --device cuda:0 [--device cuda:1]`, binary KServe v2 requests of one image and of 16 images from
   several load-generator processes on the same machine, req/s and img/s, with the server's CPU and the load
   generator's own (both on the same cores: where the server is not short of CPU, the client may be), the busiest
   thread of the server (one near 1.0 core is an event loop at its limit) and each GPU's utilization (nvidia-smi);
   with one server process and with `--workers N` (--serve-workers 1,8), each worker with a runner on every device
   (--worker-devices share), worker i on GPU i mod 2 (split), and/or one engine process per GPU running the model
   for every worker (engine), as --worker-devices lists.

Target (issue): two GPUs >= 1.8x one GPU for binary requests at high concurrency. Where the front end is the
bottleneck, the model-alone row shows what the GPUs could do and the server's CPU use shows where the time went.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
import kiln  # noqa: E402
from kiln.predict import predict  # noqa: E402

VARIANT = "eager/fp16+bnfold+channels_last+cudagraphs"
SPINCOUNT = ""  # --gomp-spincount


def build(work: Path) -> Path:
    from gpu_models import resnet50
    from safetensors.torch import save_model

    torch.manual_seed(0)
    save_model(resnet50().eval(), str(work / "r50.safetensors"))
    r = kiln.build(f"{ROOT}/bench/gpu_models.py:resnet50", weights=work / "r50.safetensors", name="resnet50",
                   inputs=["image:float32[batch,3,224,224]"], repo=work / "models", device="cuda:0", batch=(1, 256),
                   variants=["eager/fp32", VARIANT], report=False)
    assert r.path is not None and r.candidate(VARIANT).status == "accepted", r.candidate(VARIANT).reason
    return r.path


def model_alone(path: Path, devices: list[str], seconds: float = 5.0) -> float:
    """img/s with one runner per device, each fed batch 256 from its own device in its own thread."""
    runners = [kiln.load(path, device=d, variant=VARIANT) for d in devices]
    xs = [torch.randn(256, 3, 224, 224, device=d) for d in devices]
    for r, x in zip(runners, xs):
        for _ in range(3):
            r.run([x])
        torch.cuda.synchronize(x.device)
    counts = [0] * len(devices)
    stop = time.perf_counter() + seconds

    def loop(k: int) -> None:
        while time.perf_counter() < stop:
            runners[k].run([xs[k]])
            torch.cuda.synchronize(xs[k].device)
            counts[k] += 256

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(len(devices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def predict_rate(path: Path, files: list[Path], out: Path, device: str, workers: int) -> float:
    s = predict(path, files, out, batch=256, workers=workers, device=device, shard_size=8192, progress=False)
    assert s.written == s.items, s
    return s.items / s.elapsed_s


def _load(args: tuple[int, bytes, int, int, int]) -> tuple[float, int, int, float]:
    """One load-generator process: (seconds, requests answered, errors, its own CPU seconds)."""
    port, req, total, conc, images = args
    from serve import drive

    cpu0 = time.process_time()
    elapsed, lat, errors = drive(port, [req], total, conc)
    return elapsed, len(lat), errors, time.process_time() - cpu0


def thread_cpu(pid: int) -> dict[tuple[int, int, str], float]:
    """CPU seconds of every thread of a process and its children, keyed by (pid, tid, name): kiln names its event
    loops worker-<i> and engine-<device>, and its runner threads run-<model>."""
    from serve import process_tree

    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for proc in sorted(process_tree(pid)):
        for t in Path(f"/proc/{proc}/task").glob("*"):
            try:
                text = (t / "stat").read_text()
            except OSError:
                continue
            name, _, rest = text.split("(", 1)[1].rpartition(")")
            f = rest.split()
            out[(proc, int(t.name), name)] = (int(f[11]) + int(f[12])) / tick
    return out


class GpuSampler:
    """Each GPU's utilization (percent of time a kernel ran), sampled by nvidia-smi every 100 ms while running."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
                                      "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) \
            if shutil.which("nvidia-smi") else None

    def stop(self) -> dict[str, float]:
        if self.proc is None:
            return {}
        self.proc.terminate()
        text, _ = self.proc.communicate(timeout=10)
        seen: dict[str, list[float]] = {}
        for line in text.splitlines():
            index, _, util = line.partition(",")
            if util.strip().isdigit():
                seen.setdefault(index.strip(), []).append(float(util))
        return {k: sum(v) / len(v) for k, v in seen.items()}


def serve_rates(path: Path, devices: list[str], workers: int, loads: list[tuple[int, int, int, int]],
                mode: str = "share", instances: str = "", extra_env: str = "") -> list[dict[str, Any]]:
    """One server (`--workers`), every load (images per request, load processes, connections each, requests).
    `extra_env`: NAME=VALUE[+NAME=VALUE] set for the server (an A/B of an environment switch such as KILN_KEEP_FREED_MEMORY)."""
    from serve import cpu_seconds, free_port, request_bytes

    port = free_port()
    cmd = [sys.executable, "-m", "kiln", "serve", str(path.parent.parent), "--port", str(port), "--models", "resnet50",
           "--max-batch-size", "256", "--max-delay-ms", "2", "--max-body-mb", "256", "--workers", str(workers)]
    for d in devices:
        cmd += ["--device", d]
    if mode != "share":
        cmd += ["--worker-devices", mode]
    if instances:
        cmd += ["--instances", instances]
    log = path.parent.parent.parent / (f"serve-{len(devices)}-w{workers}-{mode}{'-i' + instances if instances else ''}"
                                       f"{'-' + extra_env.replace('=', '').replace('+', '-') if extra_env else ''}.log")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    env.update(kv.split("=", 1) for kv in filter(None, extra_env.split("+")))
    if SPINCOUNT:  # OpenMP's spin after a parallel region: 300000 is libgomp's own default (kiln's workers use 0)
        env["GOMP_SPINCOUNT"] = SPINCOUNT
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status == 200:
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"kiln serve did not start: {cmd}\n{log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        out = []
        for images, procs, conc, total in loads:
            x = np.random.default_rng(0).standard_normal((images, 3, 224, 224)).astype(np.float32)
            req = request_bytes("/v2/models/resnet50/infer", x, True)
            with mp.get_context("spawn").Pool(procs) as pool:
                # Warm every worker's bucket paths, and the batch sizes this load makes (CUDA graphs captured on use).
                pool.map(_load, [(port, req, max(20 * workers, 4 * conc), conc, images)] * procs)
                cpu0, threads0, gpus = cpu_seconds(proc.pid), thread_cpu(proc.pid), GpuSampler()
                t0 = time.perf_counter()
                res = pool.map(_load, [(port, req, total // procs, conc, images)] * procs)
                wall = time.perf_counter() - t0
                cpu, util = cpu_seconds(proc.pid) - cpu0, gpus.stop()
                busy = sorted((((v - threads0.get(k, 0.0)) / wall, k[2]) for k, v in thread_cpu(proc.pid).items()),
                              reverse=True)
            done = sum(r[1] for r in res)
            out.append({"devices": devices, "workers": workers, "mode": mode, "instances": instances or "1",
                        "env": extra_env, "images_per_request": images,
                        "clients": procs * conc,
                        # [thread name, cores]; results before 2026-11-23 have busiest_threads_cores (cores only)
                        "busiest_threads": [[name, round(b, 3)] for b, name in busy[:2 * (workers + len(devices))]],
                        "gpu_util_percent": util,
                        "requests": done, "errors": sum(r[2] for r in res), "req_per_s": done / wall,
                        "img_per_s": done * images / wall, "server_cpu_cores": cpu / wall,
                        "client_cpu_cores": sum(r[3] for r in res) / wall})
            print(f"serve: {out[-1]}", file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    if mode == "engine":  # what the engines batched (they print it when they stop)
        lines = [ln for ln in log.read_text().splitlines() if "rows per batch" in ln]
        for row in out:
            row["engines"] = lines
        print("\n".join(lines), file=sys.stderr, flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--items", type=int, default=16384, help="images for kiln predict (default: 16384)")
    p.add_argument("--workers", type=int, default=8, help="predict's DataLoader workers (default: 8)")
    p.add_argument("--serve-workers", default="1,8", help="kiln serve --workers counts, comma-separated (default: 1,8)")
    p.add_argument("--worker-devices", default="share", help="comma-separated: share (every worker on every GPU), split "
                   "(worker i on GPU i mod 2; two GPUs and N > 1 only), engine (one engine process per GPU runs the "
                   "model, the workers hand it batches) (default: share)")
    p.add_argument("--configs", default="", help="comma-separated MODE:WORKERS[:INSTANCES][+NAME=VALUE...], measured "
                   "in this order, instead of every --worker-devices mode with every --serve-workers count (e.g. "
                   "engine:16,share:8,engine:16:2,engine:16+KILN_KEEP_FREED_MEMORY=0)")
    p.add_argument("--loads", default="1x8x32x48000,16x8x8x4800", help="serve loads, comma-separated, each IMAGESxPROCSx"
                   "CONNECTIONSxREQUESTS: images per request, load-generator processes, connections per process, requests "
                   "(default: 1x8x32x48000,16x8x8x4800: c=256 of one image, c=64 of 16; before 2026-11-22 c=128 and c=32)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: alone, predict")
    p.add_argument("--gomp-spincount", default="", help="GOMP_SPINCOUNT for the servers: 300000 is libgomp's default "
                   "spin, which kiln's workers turn off (OMP_WAIT_POLICY=PASSIVE); for an A/B")
    p.add_argument("--instances", default="", help="kiln serve --instances: model instances per device (per worker, "
                   "or per engine with --worker-devices engine); default: the server's (1)")
    args = p.parse_args()
    global SPINCOUNT
    SPINCOUNT = args.gomp_spincount
    skip = set(filter(None, args.skip.split(",")))
    n = torch.cuda.device_count()
    if n < 2:
        print(f"this machine has {n} GPU(s); the benchmark needs two", file=sys.stderr)
        return 2
    one, two = ["cuda:0"], ["cuda:0", "cuda:1"]
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-multigpu-"))
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "gpus": n, "variant": VARIANT,
                               "gomp_spincount": SPINCOUNT or "0 (kiln's workers: OMP_WAIT_POLICY=PASSIVE)"}
    t0 = time.perf_counter()
    path = build(work)
    results["build_s"] = time.perf_counter() - t0

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))

    if "alone" not in skip:
        results["alone"] = {"1": model_alone(path, one), "2": model_alone(path, two)}
        save()
        print(f"model alone: {results['alone']}", file=sys.stderr, flush=True)
    if "predict" not in skip:
        run_predict(path, work, args.items, args.workers, results)
        save()
    results["serve"] = []
    loads = []
    for spec in args.loads.split(","):
        images, procs, conc, total = (int(v) for v in spec.split("x"))
        loads.append((images, procs, conc, total))
    configs = []
    for c in filter(None, args.configs.split(",")):  # MODE:WORKERS[:INSTANCES][+NAME=VALUE...]
        base, _, extra = c.partition("+")
        configs.append([*(base.split(":") + [args.instances])[:3], extra])
    if not configs:
        configs = [[m, w, args.instances, ""] for w in args.serve_workers.split(",") for m in args.worker_devices.split(",")]
    for mode, w, instances, extra in ((m, int(w), i, e) for m, w, i, e in configs):
        if mode == "split" and w == 1:
            continue
        for devices in ([two] if mode == "split" else [one, two]):  # split on one GPU is share
            try:
                results["serve"] += serve_rates(path, devices, w, loads, mode, instances, extra)
            except Exception as e:  # one server that fails to start: record why, measure the others
                results.setdefault("failed", []).append(f"{mode} w{w} {devices}: {e}"[:4000])
                print(f"serve failed: {e}", file=sys.stderr, flush=True)
            save()

    print(f"\nResNet-50, {VARIANT}, on {results['gpu']} (one GPU vs two)")
    print(f"{'measurement':52} {'1 GPU':>10} {'2 GPUs':>10} {'2 / 1':>7}")
    if "alone" in results:
        a = results["alone"]
        print(f"{'model alone, batch 256, img/s':52} {a['1']:>10,.0f} {a['2']:>10,.0f} {a['2'] / a['1']:>6.2f}x")
    if "predict" in results:
        q = results["predict"]
        print(f"{'kiln predict, .npy, batch 256, img/s':52} {q['1']:>10,.0f} {q['2']:>10,.0f} {q['2'] / q['1']:>6.2f}x")
    rows = {(r["workers"], r["images_per_request"], len(r["devices"]), r["mode"], r.get("instances", "1"),
             r.get("env", "")): r for r in results["serve"]}
    for (w, images, gpus, mode, inst, extra), s1 in rows.items():
        if gpus != 1:
            continue
        for mode2 in (mode, "split") if mode == "share" else (mode,):  # split's baseline: one GPU, share
            s2 = rows.get((w, images, 2, mode2, inst, extra))
            if s2 is None:
                continue
            label = (f"serve -w{w}{'' if inst == '1' else f' -i{inst}'} {mode2}{' ' + extra if extra else ''}, "
                     f"{images} img/request, c={s1['clients']}, img/s")
            print(f"{label:52} {s1['img_per_s']:>10,.0f} {s2['img_per_s']:>10,.0f} {s2['img_per_s'] / s1['img_per_s']:>6.2f}x"
                  f"   (server CPU cores {s1['server_cpu_cores']:.2f} / {s2['server_cpu_cores']:.2f}, CPU ms/request "
                  f"{1e3 * s1['server_cpu_cores'] / s1['req_per_s']:.2f} / {1e3 * s2['server_cpu_cores'] / s2['req_per_s']:.2f}, "
                  f"load generator cores {s1.get('client_cpu_cores', 0):.2f} / {s2.get('client_cpu_cores', 0):.2f}, "
                  f"busiest server threads {_top(s1)} / {_top(s2)}, GPU util % {_util(s1)} / {_util(s2)}, errors "
                  f"{s1['errors']}/{s2['errors']})")
    save()
    return 0


def _top(row: dict[str, Any]) -> str:
    if "busiest_threads" in row:
        return ",".join(f"{name} {b:.2f}" for name, b in row["busiest_threads"][:4])
    return ",".join(f"{b:.2f}" for b in row.get("busiest_threads_cores", [])[:4])


def _util(row: dict[str, Any]) -> str:
    return ",".join(f"{v:.0f}" for _, v in sorted(row.get("gpu_util_percent", {}).items())) or "-"


def run_predict(path: Path, work: Path, items: int, workers: int, results: dict[str, Any]) -> None:
    one, two = ["cuda:0"], ["cuda:0", "cuda:1"]
    per = 4096
    x = np.random.default_rng(1).standard_normal((per, 3, 224, 224)).astype(np.float32)
    files = []
    for k in range(max(1, items // per)):
        f = work / f"images{k}.npy"  # memory-mapped by kiln predict, as a large offline job's arrays would be
        np.save(f, x)
        files.append(f)
    del x
    results["predict"] = {str(len(d)): predict_rate(path, files, work / f"p{len(d)}.npz", ",".join(d), workers)
                          for d in (one, two)}
    print(f"predict: {results['predict']}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
