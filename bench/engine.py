"""What one batch costs on its way through an engine (`kiln serve --worker-devices engine`), without HTTP.

    .venv/bin/python bench/engine.py                                  # CPU, a tiny model
    python3 bench/engine.py --device cuda:0 --model resnet50          # a GPU machine

This process plays one worker: it builds the model, starts one engine process for --device as `kiln serve` does,
and drives the worker's real path (kiln.server.engine.EngineModel: its batcher, shared-memory slots and link) with
`concurrency` coroutines that each submit one row and wait for the answer, for --seconds per concurrency.
Each row of the table gives the rows and the worker's batches ("messages") per second. It also gives the CPU time
per message of the engine's event loop (engine-<device>), of its runner threads (run-<model>) and of this worker
process, read from /proc. The engine's loop is the one thread every worker's message goes through, so its CPU
per message bounds one engine's message rate. It is the figure to cut.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
import kiln  # noqa: E402
from kiln import repository  # noqa: E402
from kiln.server import engine  # noqa: E402
from kiln.server.config import ModelConfig  # noqa: E402


class Small(nn.Module):
    """A model whose run costs next to nothing, so the table shows the path's own cost."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.f(image)


def build(work: Path, model: str, device: str) -> tuple[Path, list[int]]:
    from safetensors.torch import save_model

    torch.manual_seed(0)
    if model == "resnet50":
        from gpu_models import resnet50

        save_model(resnet50().eval(), str(work / "m.safetensors"))
        source, shape, variant = f"{ROOT}/bench/gpu_models.py:resnet50", [3, 224, 224], \
            "eager/fp16+bnfold+channels_last+cudagraphs"
    else:
        save_model(Small().eval(), str(work / "m.safetensors"))
        source, shape, variant = f"{Path(__file__).resolve()}:Small", [3, 32, 32], "eager/fp32"
    r = kiln.build(source, weights=work / "m.safetensors", name=model, repo=work / "models", device=device,
                   inputs=[f"image:float32[batch,{','.join(map(str, shape))}]"], batch=(1, 64),
                   variants=["eager/fp32", variant] if variant != "eager/fp32" else [variant], report=False)
    assert r.path is not None and r.candidate(variant).status == "accepted", r.candidate(variant).reason
    return r.path, shape


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the engine's threads by role: its event loop, its runner threads, the rest."""
    from multigpu import thread_cpu as by_thread

    out: dict[str, float] = {}
    for (_, _, name), seconds in by_thread(pid).items():
        key = "loop" if name.startswith("engine-") else "run" if name.startswith("run-") else "other"
        out[key] = out.get(key, 0.0) + seconds
    return out


async def drive(model: engine.EngineModel, shape: list[int], concurrency: int, seconds: float, rows: int) -> int:
    """Rows answered. rows=0: each client submits one row to the worker's batcher, which sends batches (at most
    two in flight per engine); rows=N: each client sends its own message of N rows, as many workers' batches
    reach one engine at once."""
    assert model.batcher is not None
    x = np.random.default_rng(0).standard_normal((max(rows, 1), *shape), dtype=np.float32)
    key = (tuple(shape),)
    done = 0
    stop = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done
        while time.monotonic() < stop:
            if rows:
                await model._run_batch([[x]])
                model.stats.execution_count += 1
            else:
                await model.batcher.submit([x], rows=1, key=key, timeout_s=30.0)
            done += max(rows, 1)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done


async def measure(path: Path, shape: list[int], device: str, loads: list[tuple[int, int]], seconds: float,
                  max_delay_ms: float) -> list[dict[str, Any]]:
    rundir = Path(tempfile.mkdtemp(prefix="kiln-bench-engine-"))
    sock, slots = engine.listen(rundir, 0), engine.shm_dir(rundir)
    doc = {"device": device, "fd": sock.fileno(), "slots": str(slots), "grace_s": 5.0,
           "threads": max(1, (os.cpu_count() or 2) // 2)}
    log = (rundir / "engine.log").open("w+")  # a file, not a pipe nobody reads while the engine runs
    proc = subprocess.Popen([sys.executable, "-m", "kiln.server.engine"], pass_fds=[sock.fileno()], stderr=log,
                            env={**os.environ, engine.ENV: json.dumps(doc),
                                 "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))})
    rows: list[dict[str, Any]] = []
    try:
        vdir, manifest = repository.resolve(path)
        config = ModelConfig(devices=[device], max_batch_size=64, max_delay_ms=max_delay_ms)
        model = engine.EngineModel(path.name, vdir, manifest, config, engines=[device], rundir=str(rundir),
                                   slots=str(slots))
        await asyncio.to_thread(model.load)
        model.start()
        for c, n in loads:  # warm-up: slots made, batch sizes seen
            await drive(model, shape, c, 1.0, n)
        for c, n in loads:
            e0, w0, m0 = thread_cpu(proc.pid), time.process_time(), model.stats.execution_count
            t0 = time.perf_counter()
            done = await drive(model, shape, c, seconds, n)
            wall = time.perf_counter() - t0
            e1, w1, msgs = thread_cpu(proc.pid), time.process_time(), model.stats.execution_count - m0
            per = {k: (e1.get(k, 0.0) - e0.get(k, 0.0)) / msgs * 1e6 for k in ("loop", "run", "other")}
            rows.append({"concurrency": c, "path": f"messages of {n}" if n else "batcher", "rows_s": done / wall,
                         "messages_s": msgs / wall, "rows_per_message": done / msgs,
                         "engine_loop_us": per["loop"], "engine_run_us": per["run"], "engine_other_us": per["other"],
                         "worker_us": (w1 - w0) / msgs * 1e6})
        await model.stop(drain_s=5.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.seek(0)
        err = log.read()
        log.close()
        sock.close()
        shutil.rmtree(slots, ignore_errors=True)
        shutil.rmtree(rundir, ignore_errors=True)
    batches = re.findall(r"ran (\d+) batches, (\d+) rows", err)
    if proc.returncode != 0 or not batches:
        sys.stderr.write(err)
        raise SystemExit(f"the engine exited {proc.returncode}")
    rows[-1]["engine_summary"] = err.strip().splitlines()[-1]
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=["small", "resnet50"], default="small")
    p.add_argument("--loads", default="1:0,8:0,8:1,32:1,32:8",
                   help="comma-separated clients:rows, one table row each; rows 0: the clients submit one row each to "
                        "the worker's batcher; rows N: each client sends its own message of N rows (many workers)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--max-delay-ms", type=float, default=0.0, help="the engine's batching window (config.toml's)")
    p.add_argument("--out", type=Path, help="write the rows as JSON")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path, shape = build(Path(tmp), args.model, args.device)
        try:  # a worker runs on uvicorn's loop: uvloop where installed
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
        with asyncio.Runner(loop_factory=factory) as runner:
            rows = runner.run(measure(path, shape, args.device, [(int(c), int(n)) for c, _, n in (x.partition(":") for x in args.loads.split(","))],
                                      args.seconds, args.max_delay_ms))
    meta = {"device": args.device, "model": args.model, "torch": torch.__version__, "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    if args.out:
        args.out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    where = meta["gpu"] or f"{meta['cores']} cores"
    print(f"\nengine path, {args.model} on {args.device} ({where}), torch {torch.__version__}; CPU us per message")
    print(f"{'clients':>7} {'path':<14} {'rows/s':>9} {'msgs/s':>8} {'rows/msg':>8} {'engine loop':>11} {'engine run':>10} "
          f"{'engine other':>12} {'worker':>8}")
    for r in rows:
        print(f"{r['concurrency']:>7} {r['path']:<14} {r['rows_s']:>9,.0f} {r['messages_s']:>8,.0f} {r['rows_per_message']:>8.1f} "
              f"{r['engine_loop_us']:>11.0f} {r['engine_run_us']:>10.0f} {r['engine_other_us']:>12.0f} "
              f"{r['worker_us']:>8.0f}")
    print(rows[-1]["engine_summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
