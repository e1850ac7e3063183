"""kiln predict: offline batch inference that never loses work.

Items are numbered once; the output is written in shards (`OUT.parts/shard-00003.npz`) listed in a
small manifest as each completes, so a killed run continues with --resume, and the final OUT holds
every item exactly once, in input order.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from kiln import repository
from kiln.errors import KilnError
from kiln.inputs import Inputs, Preprocess, collect
from kiln.runner import Runner
from kiln.shards import ShardCollector, ShardPlan, finish, plan_shards
from kiln.spec import TensorSpec

OnError = Literal["skip", "stop"]


@dataclass
class Summary:
    """`items` = `written` + len(`skipped`): every item found is either written or skipped with its reason.
    `ignored` lists files that held no items kiln could read (not an input, unreadable, wrong shape)."""

    out: Path
    items: int
    written: int
    skipped: list[tuple[str, str]]
    resumed_items: int
    elapsed_s: float
    items_per_s: float
    engine: str = "local"
    ignored: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def predict(model: str | Path, inputs: list[str | Path], out: str | Path, *, batch: int = 64, workers: int = 0,
            device: str = "cpu", variant: str | None = None, shard_size: int = 4096, resume: bool = False,
            on_error: OnError = "skip", preprocess: dict[str, Any] | None = None, ray: str | bool | None = None,
            replicas: int = 1, gpus_per_replica: float = 0.0, progress: bool | None = None,
            columns: dict[str, list[str]] | None = None, id_column: str | None = None) -> Summary:
    """Run a built model over files and folders; write OUT (.npz or .parquet).

    >>> predict("models/digits", ["test.npz"], "preds.npz", batch=256, workers=2)
    >>> predict("models/churn", ["customers.parquet"], "scores.parquet", columns={"x": ["age", "tenure", "spend"]})

    Tables feed inputs by column name (`columns`, else the model's [columns] from kiln.toml, else a column named
    like the input, else the numeric columns of the first table in its order); a column named `id` (or
    `id_column`) becomes the items' ids. Rows with NaN or missing values are skipped with the column named.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix not in (".npz", ".parquet"):
        raise KilnError(f"unknown output format {out.suffix!r}: {out}", hint="write .npz or .parquet")
    if batch < 1 or workers < 0 or shard_size < 1:
        raise KilnError("--batch and --shard-size must be at least 1, --workers at least 0", hint="e.g. --batch 256 --workers 2")
    if on_error not in ("skip", "stop"):
        raise KilnError(f"--on-error {on_error!r}", hint="use skip or stop")
    version_dir, m = repository.resolve(model)
    specs = [TensorSpec.from_dict(s) for s in m["inputs"]]
    outputs = [TensorSpec.from_dict(s) for s in m["outputs"]]
    prep = Preprocess.from_dict({**m.get("preprocess", {}), **(preprocess or {})})
    items, bad_files = collect(list(inputs), specs, prep, columns=columns or m.get("columns") or None, id_column=id_column)
    if columns and items.kind != "table":
        raise KilnError("--columns is for .parquet/.csv inputs", hint="arrays are matched to inputs by their names in the .npz")
    notes = list(items.notes)
    if items.kind == "images" and not m.get("preprocess") and not preprocess:
        notes.insert(0, "the model has no [preprocess]: images are read as RGB, scaled by 1/255, laid out CHW, with "
                        "no mean/std normalisation. If it was trained on other pixels its outputs are wrong: add "
                        "[preprocess] (mode, resize, crop, scale, mean, std, layout) to its kiln.toml and rebuild")
    if bad_files and on_error == "stop":
        path, err = bad_files[0]
        raise KilnError(f"bad input {path}: {err}", hint="fix or remove it, or pass --on-error skip")
    if not items.ids:
        listed = "; ".join(f"{p}: {e}" for p, e in bad_files[:5])
        raise KilnError(f"no readable input items ({listed})", hint="give .npy/.npz/.parquet/.csv files or folders of images")
    plan = plan_shards(items, outputs, out, m, version_dir, variant, shard_size, resume)
    done_items = sum(len(plan.shard_range(int(s))) for s in plan.manifest["done"])
    todo = [s for s in range(plan.shards) if str(s) not in plan.manifest["done"]]
    bar = _Progress(len(items.ids), done_items, enabled=progress)
    try:
        if ray is not None and ray is not False:
            from kiln.ray.data import run_shards

            run_shards({"version_dir": str(version_dir), "variant": variant, "device": device, "batch": batch}, plan, todo,
                       bar, address=ray if isinstance(ray, str) else None, replicas=replicas,
                       gpus_per_replica=gpus_per_replica, on_error=on_error)
            engine = "ray"
        else:
            _run_local(version_dir, plan, todo, variant, device, batch, workers, on_error, bar)
            engine = "local"
    finally:
        bar.close()
    skipped: list[tuple[str, str]] = [(str(x[0]), str(x[1])) for s in sorted(plan.manifest["done"], key=int)
                                      for x in plan.manifest["done"][s]["skipped"]]
    written = finish(plan, out)
    elapsed = time.perf_counter() - t0
    return Summary(out, len(items.ids), written, skipped, done_items, elapsed,
                   (len(items.ids) - done_items) / elapsed if elapsed > 0 else 0.0, engine, bad_files, notes)


class _BatchDataset(torch.utils.data.Dataset):
    """Index lists in, (indices, arrays, errors) out: workers read whole batches."""

    def __init__(self, inputs: Inputs) -> None:
        self.inputs = inputs

    def __getitem__(self, indices: list[int]) -> tuple[list[int], list[np.ndarray], list[tuple[int, str]]]:
        return self.inputs.fetch(indices)

    def __len__(self) -> int:
        return len(self.inputs.ids)


def _batches(plan: ShardPlan, todo: list[int], batch: int) -> Iterator[list[int]]:
    for s in todo:
        r = plan.shard_range(s)
        for lo in range(r.start, r.stop, batch):
            yield list(range(lo, min(r.stop, lo + batch)))


def devices_of(device: str) -> list[str]:
    """The devices a predict run uses: `cuda` is every visible GPU (one runner each), a comma list names several
    (`cuda:0,cuda:1`; `cpu,cpu` runs two CPU runners side by side), anything else is one device."""
    if device == "cuda":
        n = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(n)] if n > 1 else ["cuda"]
    out = [d.strip() for d in device.split(",") if d.strip()]
    if not out:
        raise KilnError(f"no device in {device!r}", hint="use cpu, cuda, cuda:N or a list like cuda:0,cuda:1")
    return out


def _run_local(version_dir: Path, plan: ShardPlan, todo: list[int], variant: str | None, device: str, batch: int,
               workers: int, on_error: OnError, bar: _Progress) -> None:
    """Batches from a DataLoader (`workers` processes read and preprocess), each run on the next free device's
    runner: one thread per device, so several GPUs work at once (torch releases the GIL while they do)."""
    runners = [repository.load(version_dir, device=d, variant=variant) for d in devices_of(device)]
    bar.restart()
    cuda = any(r.device.startswith("cuda") for r in runners)
    loader = torch.utils.data.DataLoader(_BatchDataset(plan.inputs), batch_size=None, sampler=list(_batches(plan, todo, batch)),
                                         num_workers=workers, pin_memory=cuda, collate_fn=_collate)  # type: ignore[arg-type]
    collector = ShardCollector(plan, todo)
    lock = threading.Lock()

    def run(runner: Runner, idx: list[int], arrays: list[torch.Tensor], errors: list[tuple[int, str]]) -> None:
        outs: list[np.ndarray] = []
        if idx:
            on_gpu = runner.device.startswith("cuda")
            xs = [a.to(runner.device, non_blocking=True) if on_gpu else a for a in arrays]
            outs = [o.numpy(force=True) for o in runner.run(xs)]
        with lock:
            collector.add(idx, outs, errors)
            bar.advance(len(idx) + len(errors))

    def check(idx: list[int], errors: list[tuple[int, str]]) -> None:
        if errors and on_error == "stop":
            i, err = errors[0]
            raise KilnError(f"bad input {plan.inputs.ids[i]}: {err}", hint="fix or remove it, or pass --on-error skip; "
                            "finished shards are kept, so --resume continues from here")

    if len(runners) == 1:
        for idx, arrays, errors in loader:
            check(idx, errors)
            run(runners[0], idx, arrays, errors)
        return
    work: queue.Queue[Any] = queue.Queue(maxsize=2 * len(runners))
    failures: list[BaseException] = []

    def device_loop(runner: Runner) -> None:
        while (item := work.get()) is not None:
            if failures:
                continue  # drain: the main thread stops feeding and reports the first failure
            try:
                run(runner, *item)
            except BaseException as e:  # re-raised in the main thread
                failures.append(e)

    threads = [threading.Thread(target=device_loop, args=(r,), name=f"kiln-predict-{r.device}", daemon=True)
               for r in runners]
    for t in threads:
        t.start()
    try:
        for idx, arrays, errors in loader:
            check(idx, errors)
            if failures:
                break
            work.put((idx, arrays, errors))
    finally:
        for _ in threads:
            work.put(None)
        for t in threads:
            t.join()
    if failures:
        raise failures[0]


def _collate(batch: tuple[list[int], list[np.ndarray], list[tuple[int, str]]]) -> tuple[list[int], list[torch.Tensor], list[tuple[int, str]]]:
    idx, arrays, errors = batch
    return idx, [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays], errors


class _Progress:
    """A rich bar with items/s and time left on a terminal; a line every few seconds otherwise."""

    def __init__(self, total: int, done: int, *, enabled: bool | None) -> None:
        self.total, self.done, self.t0, self.start_done = total, done, time.perf_counter(), done
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        self.last = 0.0
        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]} items/s"), TimeRemainingColumn(), transient=True)
            self.task = self.bar.add_task("predict", total=total, completed=done, rate="-")
            self.bar.start()

    def advance(self, n: int) -> None:
        self.done += n
        elapsed = time.perf_counter() - self.t0
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=f"{rate:,.0f}")
        elif self.enabled and (time.perf_counter() - self.last > 2 or self.done == self.total):
            self.last = time.perf_counter()
            left = (self.total - self.done) / rate if rate > 0 else 0
            print(f"  predict {self.done}/{self.total} items, {rate:,.0f} items/s, ~{left:.0f}s left", file=sys.stderr, flush=True)

    def restart(self) -> None:
        """Count the rate from now on (after the model has loaded)."""
        self.t0 = time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

