"""kiln bench on real built models: sane numbers, every output format parses, --threads honoured."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import kiln
import zoo
from kiln.bench.run import bench, report_data, rows, to_csv


@pytest.fixture
def restore_threads() -> Iterator[None]:
    threads, ort = torch.get_num_threads(), os.environ.get("KILN_ORT_THREADS")
    yield
    torch.set_num_threads(threads)
    if ort is not None:
        os.environ["KILN_ORT_THREADS"] = ort


def test_numbers_are_sane(built: Callable[[str], kiln.BuildResult], restore_threads: None) -> None:
    r = bench(built("MLP").path, variants=["eager/fp32", "onnxruntime/fp32"], batch_sizes=[1, 64], threads=1,
              min_time_s=0.2)
    assert r.threads == 1 and r.batch_sizes == [1, 64] and [v.variant for v in r.variants] == ["eager/fp32", "onnxruntime/fp32"]
    m = built("MLP").manifest
    for v in r.variants:
        t1, t64 = v.timing(1), v.timing(64)
        assert t1 and t64
        # a tiny MLP is dominated by per-call overhead: 64 rows per call must beat 1 row per call by far
        assert t64.items_per_s > 5 * t1.items_per_s
        for t in (t1, t64):
            assert 0 < t.p50_ms <= t.p90_ms <= t.p99_ms and t.repeats >= 30
        assert v.load_s > 0 and v.memory_mb >= 0
        assert v.size_bytes == next(c for c in m["candidates"] if c["variant"] == v.variant)["artifact"]["bytes"]
        assert v.accuracy["max_rel_err"] < 1e-3 and v.accuracy["cosine"] > 0.999
    assert "from the build's verification" in r.accuracy_source
    labels = [label for label, _ in rows(r)]
    assert {"p50 ms @1", "p99 ms @64", "items/s @64", "memory MB", "accuracy delta"} <= set(labels)


def test_formats_parse(built: Callable[[str], kiln.BuildResult]) -> None:
    r = bench(built("ConvBN").path, variants=["torchscript/fp32"], batch_sizes=[2, 4], min_time_s=0.05)
    table = list(csv.DictReader(io.StringIO(to_csv(r))))
    assert [(row["variant"], int(row["batch"])) for row in table] == [("torchscript/fp32", 2), ("torchscript/fp32", 4)]
    assert all(float(row["p50_ms"]) > 0 and float(row["items_per_s"]) > 0 for row in table)
    doc = json.loads(json.dumps(r.to_dict()))
    assert doc["variants"][0]["timings"][1]["batch"] == 4
    data = report_data(r)
    accepted = {v["variant"] for v in data["variants"] if v["status"] == "accepted"}
    assert accepted == {"torchscript/fp32"}  # other accepted ones were not chosen; skipped ones keep their reasons


def test_data_recomputes_accuracy_against_eager(built: Callable[[str], kiln.BuildResult], tmp_path: Path) -> None:
    x = np.random.default_rng(5).standard_normal((40, 16)).astype(np.float32)
    with torch.no_grad():
        labels = zoo.seeded(zoo.MLP)(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    r = bench(built("MLP").path, variants=["onnxruntime/fp32"], batch_sizes=[1], data=tmp_path / "d.npz", min_time_s=0.05)
    acc = r.variants[0].accuracy
    assert "recomputed against eager/fp32 on d.npz (40 items)" == r.accuracy_source
    assert acc["accuracy"] == 1.0 and acc["accuracy_delta"] == 0.0 and acc["max_rel_err"] < 1e-5


def test_bad_arguments(built: Callable[[str], kiln.BuildResult]) -> None:
    with pytest.raises(kiln.KilnError, match="not accepted variants"):
        bench(built("MLP").path, variants=["tensorrt/fp16"])
    with pytest.raises(kiln.KilnError, match="at least 1"):
        bench(built("MLP").path, threads=0)
