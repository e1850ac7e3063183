"""`kiln predict --ray`: the same items and shards, read and run by a pool of Ray Data actors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.ray.cluster import require_ray


class _Predictor:
    """One Ray actor: a Runner and the input reader; index batches in, outputs out."""

    def __init__(self, args: dict[str, Any], inputs: Any) -> None:
        from kiln import repository

        self.runner = repository.load(Path(args["version_dir"]), device=args["device"], variant=args["variant"])
        self.inputs = inputs
        self.device = args["device"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        wanted = [int(i) for i in batch["item"]]
        ok, arrays, bad = self.inputs.fetch(wanted)
        n_out = len(self.runner.outputs)
        outs: list[np.ndarray] = []
        if ok:
            xs = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays]
            outs = [o.numpy(force=True) for o in self.runner.run(xs)]
        result: dict[str, np.ndarray] = {
            "item": np.asarray(ok + [i for i, _ in bad], np.int64),
            "error": np.asarray([""] * len(ok) + [e for _, e in bad], dtype=object),
        }
        for k in range(n_out):
            o = outs[k] if outs else None
            shape = o.shape[1:] if o is not None else tuple(d if isinstance(d, int) else 1 for d in self.runner.outputs[k].shape[1:])
            pad = np.zeros((len(bad), *shape), o.dtype if o is not None else np.float32)
            result[f"out_{k}"] = np.concatenate([o, pad]) if o is not None else pad
        return result


def run_shards(args: dict[str, Any], plan: Any, todo: list[int], bar: Any, *, address: str | None,
               replicas: int, gpus_per_replica: float, on_error: str) -> None:
    """Run every item of the shards in `todo` on Ray Data, writing each shard as it completes."""
    ray = require_ray()
    from kiln.shards import ShardCollector

    if replicas < 1:
        raise KilnError(f"--replicas {replicas} must be at least 1", hint="e.g. --replicas 2")
    started_here = not ray.is_initialized()
    if started_here:
        from kiln.ray.cluster import init

        init(address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        indices = np.asarray([i for s in todo for i in plan.shard_range(s)], np.int64)
        if len(indices) == 0:
            return
        ds = ray.data.from_items([{"item": int(i)} for i in indices])
        results = ds.map_batches(_Predictor, fn_constructor_kwargs={"args": args, "inputs": plan.inputs},
                                 batch_size=args["batch"], compute=ray.data.ActorPoolStrategy(size=replicas),
                                 num_gpus=gpus_per_replica or None, batch_format="numpy")
        collector = ShardCollector(plan, todo)
        n_out = len(plan.outputs)
        for b in results.iter_batches(batch_size=None, batch_format="numpy"):
            items = b["item"].tolist()
            errors = [(i, str(e)) for i, e in zip(items, b["error"]) if e]
            if errors and on_error == "stop":
                i, err = errors[0]
                raise KilnError(f"bad input {plan.inputs.ids[i]}: {err}", hint="fix or remove it, or pass --on-error skip")
            keep = [k for k, e in enumerate(b["error"]) if not e]
            collector.add([items[k] for k in keep], [b[f"out_{k}"][keep] for k in range(n_out)], errors)
            bar.advance(len(items))
    finally:
        if started_here:
            ray.shutdown()
