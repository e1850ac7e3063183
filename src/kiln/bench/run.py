"""kiln bench: every variant of a built model, timed at every batch size, with memory and accuracy."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln import repository
from kiln.bench.memory import PeakMemory
from kiln.bench.timing import Timing, time_runner
from kiln.data import batch_dim, timing_inputs, verification_data
from kiln.errors import KilnError
from kiln.progress import Reporter, Silent
from kiln.report import summarize_accuracy
from kiln.spec import TensorSpec
from kiln.verify import compare, to_dict


@dataclass
class VariantBench:
    variant: str
    status: str = "accepted"
    reason: str = ""
    load_s: float = 0.0
    size_bytes: int = 0
    memory_mb: float = 0.0
    timings: list[Timing] = field(default_factory=list)
    accuracy: dict[str, Any] = field(default_factory=dict)
    selected: bool = False

    def timing(self, batch: int) -> Timing | None:
        return next((t for t in self.timings if t.batch == batch), None)


@dataclass
class BenchReport:
    model: str
    version: int
    path: Path
    device: str
    threads: int
    batch_sizes: list[int]
    accuracy_source: str
    variants: list[VariantBench]
    manifest: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "path": str(self.path), "device": self.device,
                "threads": self.threads, "batch_sizes": self.batch_sizes, "accuracy_source": self.accuracy_source,
                "variants": [{**asdict(v), "timings": [asdict(t) for t in v.timings]} for v in self.variants]}


def bench(path: str | Path, *, variants: list[str] | None = None, batch_sizes: list[int] | None = None,
          threads: int | None = None, device: str = "cpu", data: str | Path | None = None,
          dim_sizes: dict[str, int] | None = None, min_time_s: float = 0.5,
          progress: Reporter | None = None) -> BenchReport:
    """Benchmark the accepted variants of repo/<model>[/<version>].

    >>> report = bench("models/digits", batch_sizes=[1, 8, 32], threads=2)
    """
    prog = progress or Silent()
    version_dir, m = repository.resolve(path)
    inputs = [TensorSpec.from_dict(s) for s in m["inputs"]]
    outputs = [TensorSpec.from_dict(s) for s in m["outputs"]]
    accepted = [c["variant"] for c in m["candidates"] if c.get("status") == "accepted"]
    chosen = variants or accepted
    unknown = [v for v in chosen if v not in accepted]
    if unknown:
        raise KilnError(f"variants {unknown} are not accepted variants of {m['name']} v{m['version']}",
                        hint=f"choose from {', '.join(accepted)}")
    sizes = sorted(set(batch_sizes or [1, 8, 32])) if batch_dim(inputs) else [1]
    if any(b < 1 for b in sizes):
        raise KilnError(f"bad batch sizes {sizes}", hint="give positive sizes, e.g. --batch 1,8,32")
    if threads is not None:
        if threads < 1:
            raise KilnError(f"--threads {threads} must be at least 1", hint="e.g. --threads 2")
    threads_before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)  # torch's pool is per process: set for this bench, restored after
        return _bench_variants(version_dir, m, chosen, accepted, inputs, outputs, sizes, threads, device, data,
                               dim_sizes, min_time_s, prog)
    finally:
        torch.set_num_threads(threads_before)


def _bench_variants(version_dir: Path, m: dict[str, Any], chosen: list[str], accepted: list[str], inputs: list[TensorSpec],
                    outputs: list[TensorSpec], sizes: list[int], threads: int | None, device: str,
                    data: str | Path | None, dim_sizes: dict[str, int] | None, min_time_s: float,
                    prog: Reporter) -> BenchReport:
    verify = verification_data(inputs, Path(data) if data else None)
    reference = None
    if data is not None:
        if "eager/fp32" not in accepted:
            raise KilnError("--data needs the eager/fp32 variant as the reference", hint="rebuild with the eager backend")
        ref_runner = repository.load(version_dir, device="cpu", variant="eager/fp32")
        reference = [[o.numpy(force=True) for o in ref_runner.run(b)] for b in verify.batches]
    prog.start(len(chosen) * (2 + len(sizes)))
    results = []
    for variant in chosen:
        entry = repository.candidate(m, variant)
        vb = VariantBench(variant, size_bytes=int(entry["artifact"]["bytes"]), selected=variant == m["selected"])
        runner = None
        try:
            with PeakMemory(device) as mem:
                prog.step(variant, "loading")
                t0 = time.perf_counter()
                runner = repository.load(version_dir, device=device, variant=variant, threads=threads)
                vb.load_s = time.perf_counter() - t0
                prog.step(variant, "checking accuracy")
                if reference is not None:
                    got = [[o.numpy(force=True) for o in runner.run(b)] for b in verify.batches]
                    vb.accuracy = summarize_accuracy(to_dict(compare(outputs, reference, got, verify.labels)))
                else:
                    vb.accuracy = summarize_accuracy(entry.get("accuracy", []))
                for b in sizes:
                    prog.step(variant, f"timing batch {b}")
                    xs = [x.to(device) for x in timing_inputs(inputs, b, verify, dim_sizes or {})]
                    vb.timings.append(time_runner(runner, xs, batch=b, min_time_s=min_time_s, min_repeats=30))
            vb.memory_mb = max(0.0, mem.peak_mb)
        except KilnError as e:
            vb.status, vb.reason = "failed", e.message
        best = min((tm.p50_ms for tm in vb.timings), default=None)
        prog.outcome(variant, f"{vb.status} - {vb.reason}" if vb.status != "accepted" else
                     f"timed at batch {', '.join(str(tm.batch) for tm in vb.timings)}" + (f" (p50 {best:.3f} ms at the smallest)" if best else ""))
        results.append(vb)
        del runner
    prog.close()
    source = f"recomputed against eager/fp32 on {verify.description}" if reference is not None else \
        f"from the build's verification on {m['verification']['data']}"
    return BenchReport(m["name"], m["version"], version_dir, device, threads or torch.get_num_threads(), sizes, source,
                       results, m)


def report_data(r: BenchReport) -> dict[str, Any]:
    """HTML report data: the bench results plus the build's non-accepted candidates with their reasons."""
    from kiln.report import from_manifest

    data = from_manifest(r.manifest)
    benched = {v.variant: v for v in r.variants}
    rows = []
    for v in data["variants"]:
        b = benched.get(v["variant"])
        if b is not None:
            v = {**v, "status": b.status if b.status != "accepted" else v["status"], "reason": b.reason or v["reason"],
                 "timings": [asdict(t) for t in b.timings], "load_s": b.load_s, "memory_mb": b.memory_mb,
                 "accuracy": b.accuracy or v["accuracy"]}
        elif v["status"] == "accepted":
            continue  # accepted but not chosen with --variants
        rows.append(v)
    data.update(kind="bench", batch_sizes=r.batch_sizes, variants=rows)
    data["environment"] = {"bench device": r.device, "bench threads": r.threads, "accuracy": r.accuracy_source,
                           **data["environment"]}
    return data


def rows(r: BenchReport) -> list[tuple[str, list[str]]]:
    """The terminal table's columns, one cell per variant: latency, throughput, memory, accuracy delta."""
    out: list[tuple[str, list[str]]] = []
    vs = r.variants

    def row(label: str, f: Any) -> None:
        out.append((label, [f(v) for v in vs]))

    for b in r.batch_sizes:
        row(f"p50 ms @{b}", lambda v, b=b: f"{v.timing(b).p50_ms:.3f}" if v.timing(b) else "-")
    for b in r.batch_sizes:
        row(f"p99 ms @{b}", lambda v, b=b: f"{v.timing(b).p99_ms:.3f}" if v.timing(b) else "-")
    for b in r.batch_sizes:
        row(f"items/s @{b}", lambda v, b=b: f"{v.timing(b).items_per_s:,.0f}" if v.timing(b) else "-")
    row("memory MB", lambda v: f"{v.memory_mb:.1f}")
    row("load s", lambda v: f"{v.load_s:.2f}")
    row("size MB", lambda v: f"{v.size_bytes / 1e6:.2f}")
    row("max rel err", lambda v: f"{v.accuracy['max_rel_err']:.1e}" if "max_rel_err" in v.accuracy else "-")
    row("accuracy delta", lambda v: f"{v.accuracy['accuracy_delta']:+.2%}" if "accuracy_delta" in v.accuracy else
        (f"top-1 {v.accuracy['top1_agreement']:.2%}" if "top1_agreement" in v.accuracy else "-"))
    return out


def to_csv(r: BenchReport) -> str:
    lines = ["variant,batch,p50_ms,p90_ms,p99_ms,items_per_s,repeats,memory_mb,load_s,size_bytes,max_rel_err,accuracy"]
    for v in r.variants:
        for t in v.timings:
            acc = v.accuracy
            lines.append(",".join(str(x) for x in (
                v.variant, t.batch, f"{t.p50_ms:.6f}", f"{t.p90_ms:.6f}", f"{t.p99_ms:.6f}", f"{t.items_per_s:.3f}", t.repeats,
                f"{v.memory_mb:.3f}", f"{v.load_s:.4f}", v.size_bytes, acc.get("max_rel_err", ""), acc.get("accuracy", ""))))
    return "\n".join(lines) + "\n"


def median_curve(v: VariantBench) -> list[tuple[int, float, float]]:
    """(batch, p50 ms, p99 ms) sorted by batch: the curve batching advice is read from."""
    return sorted((t.batch, t.p50_ms, t.p99_ms) for t in v.timings)

