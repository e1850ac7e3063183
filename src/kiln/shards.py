"""Sharded, resumable output for offline prediction: the plan of shards, a collector that writes each shard once
all of its items are in, and the final merge. Both `kiln predict` paths (local and Ray Data) use it."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.inputs import Inputs
from kiln.spec import TensorSpec


@dataclass
class ShardPlan:
    inputs: Inputs
    outputs: list[TensorSpec]
    shard_size: int
    parts: Path
    manifest: dict[str, Any]

    def shard_range(self, s: int) -> range:
        return range(s * self.shard_size, min(len(self.inputs.ids), (s + 1) * self.shard_size))

    @property
    def shards(self) -> int:
        return max(1, -(-len(self.inputs.ids) // self.shard_size))


def plan_shards(items: Inputs, outputs: list[TensorSpec], out: Path, m: dict[str, Any], version_dir: Path,
          variant: str | None, shard_size: int, resume: bool) -> ShardPlan:
    parts = out.with_name(out.name + ".parts")
    identity = {"model": str(version_dir.resolve()), "version": m["version"], "variant": variant or m["selected"],
                "items": len(items.ids), "ids_sha256": items.digest(), "shard_size": shard_size}
    if parts.exists():
        if not resume:
            raise KilnError(f"{parts} holds an unfinished run", hint="pass --resume to continue it, or delete the folder to start over")
        try:
            manifest = json.loads((parts / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise KilnError(f"cannot read {parts / 'manifest.json'}: {e}", hint="delete the folder and start over") from None
        changed = [k for k, v in identity.items() if manifest.get(k) != v]
        if changed:
            raise KilnError(f"--resume: the unfinished run in {parts} differs in {', '.join(changed)}",
                            hint="resume with the same model, inputs and --shard-size, or delete the folder")
        for s, entry in manifest["done"].items():  # a shard listed but missing on disk is redone
            if not (parts / entry["file"]).is_file():
                del manifest["done"][s]
    else:
        if out.exists() and not resume:
            raise KilnError(f"{out} exists", hint="choose another --out or delete it")
        parts.mkdir(parents=True)
        manifest = {**identity, "done": {}}
        save_manifest(parts, manifest)
    return ShardPlan(items, outputs, shard_size, parts, manifest)


def save_manifest(parts: Path, manifest: dict[str, Any]) -> None:
    tmp = parts / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, parts / "manifest.json")


def write_shard(plan: ShardPlan, s: int, ids: list[int], outs: list[np.ndarray], skipped: list[tuple[int, str]]) -> None:
    """Write one completed shard atomically, then record it in the manifest."""
    name = f"shard-{s:05d}.npz"
    tmp = plan.parts / (name + ".tmp.npz")
    arrays: dict[str, Any] = {f"out_{k}": o for k, o in enumerate(outs)}
    np.savez(tmp, index=np.asarray(ids, np.int64), **arrays)
    os.replace(tmp, plan.parts / name)
    plan.manifest["done"][str(s)] = {"file": name, "skipped": [(plan.inputs.ids[i], e) for i, e in skipped]}
    save_manifest(plan.parts, plan.manifest)


class ShardCollector:
    """Gathers results per shard and writes a shard as soon as every one of its items is accounted for."""

    def __init__(self, plan: ShardPlan, todo: list[int]) -> None:
        self.plan = plan
        self.pending: dict[int, dict[str, Any]] = {s: {"need": len(plan.shard_range(s)), "idx": [], "outs": [], "bad": []} for s in todo}

    def add(self, idx: list[int], outs: list[np.ndarray], errors: list[tuple[int, str]]) -> None:
        size = self.plan.shard_size
        shards = {i // size for i in idx} | {i // size for i, _ in errors}
        for s in shards:
            p = self.pending[s]
            sel = [k for k, i in enumerate(idx) if i // size == s]
            p["idx"] += [idx[k] for k in sel]
            if sel:
                p["outs"].append([o[sel] for o in outs])
            p["bad"] += [(i, e) for i, e in errors if i // size == s]
            if len(p["idx"]) + len(p["bad"]) == p["need"]:
                order = np.argsort(p["idx"], kind="stable")
                merged = [np.concatenate([b[k] for b in p["outs"]])[order] for k in range(len(self.plan.outputs))] if p["outs"] \
                    else [np.zeros((0, *[d if isinstance(d, int) else 0 for d in o.shape[1:]]), o.dtype) for o in self.plan.outputs]
                write_shard(self.plan, s, sorted(p["idx"]), merged, sorted(p["bad"]))
                del self.pending[s]


def finish(plan: ShardPlan, out: Path) -> int:
    """Merge the shards in order into OUT, then remove the parts folder."""
    idx_parts: list[np.ndarray] = []
    out_parts: list[list[np.ndarray]] = [[] for _ in plan.outputs]
    for s in range(plan.shards):
        entry = plan.manifest["done"].get(str(s))
        if entry is None:
            raise KilnError(f"shard {s} is missing", hint="run again with --resume")
        with np.load(plan.parts / entry["file"]) as z:
            idx_parts.append(z["index"])
            for k in range(len(plan.outputs)):
                out_parts[k].append(z[f"out_{k}"])
    index = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
    if len(np.unique(index)) != len(index):
        raise KilnError("an item appears twice in the shards", hint="delete the .parts folder and run again")
    ids = np.asarray([plan.inputs.ids[i] for i in index])
    outs = [np.concatenate(p) for p in out_parts]
    tmp = out.with_name(out.name + ".tmp" + out.suffix)
    if out.suffix == ".npz":
        named: dict[str, Any] = {o.name: a for o, a in zip(plan.outputs, outs)}
        np.savez(tmp, id=ids, **named)
    else:
        write_parquet(tmp, ids, plan.outputs, outs)
    os.replace(tmp, out)
    shutil.rmtree(plan.parts)
    return len(ids)


def write_parquet(path: Path, ids: np.ndarray, specs: list[TensorSpec], outs: list[np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"id": pa.array(ids.tolist(), pa.string())}
    meta = {}
    for spec, a in zip(specs, outs):
        if a.ndim == 1:
            cols[spec.name] = pa.array(a)
            continue
        # one row per item, nested fixed-size lists that keep the item's shape ([seq, hidden] stays 2-D)
        col = pa.array(np.ascontiguousarray(a).ravel())
        for d in reversed(a.shape[1:]):
            col = pa.FixedSizeListArray.from_arrays(col, d)
        cols[spec.name] = col
        meta[f"kiln.shape.{spec.name}"] = json.dumps(list(a.shape[1:]))
    table = pa.table(cols).replace_schema_metadata(meta)
    pq.write_table(table, path)
