"""Drift watch: sampled live requests run through the fp32 reference; a drifted variant is caught."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from kiln import repository
from kiln.server.app import create_app
from kiln.server.dataplane import DataPlane
from server.conftest import ServerThread
from support import DIGITS

onnx = pytest.importorskip("onnx")


def perturbed_copy(src: Path, dest: Path, scale: float) -> None:
    """A copy of the digits model whose onnxruntime/fp32 variant has its first conv's weights scaled, re-signed
    in kiln.json as a faulty deployment pipeline would: it loads, and it answers differently."""
    shutil.copytree(src, dest)
    vdir = dest / str(max(repository.versions(dest)))
    manifest = json.loads((vdir / repository.MANIFEST).read_text())
    entry = repository.candidate(manifest, "onnxruntime/fp32")
    art = vdir / entry["artifact"]["dir"]
    model = onnx.load(str(art / "model.onnx"))
    init = next(i for i in model.graph.initializer if len(i.dims) == 4)
    w = onnx.numpy_helper.to_array(init) * scale
    init.CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), init.name))
    onnx.save(model, str(art / "model.onnx"))
    entry["artifact"]["files"] = repository.hash_dir(art)
    repository.write_manifest(vdir, manifest)
    (dest / "config.toml").write_text('variant = "onnxruntime/fp32"\nshadow_rate = 1.0\n')


def test_drift_watch_catches_a_perturbed_variant_and_clears_a_faithful_one(serve_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    perturbed_copy(serve_repo / "digits", repo / "drifted", 1.5)
    perturbed_copy(serve_repo / "digits", repo / "faithful", 1.0)
    shutil.copytree(serve_repo / "digits", repo / "plain")
    x = np.load(DIGITS / "test.npz")["image"][:40]
    with ServerThread(create_app(DataPlane(repo))) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        reports = {}
        for name in ("drifted", "faithful"):
            for i in range(20):
                body = {"inputs": [{"name": "image", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                    "data": x[2 * i:2 * i + 2].ravel().tolist()}]}
                assert c.post(f"/v2/models/{name}/infer", json=body).status_code == 200
                # one request at a time, each sample accounted for before the next: on a busy machine a burst
                # would fill the shadow queue and drop samples by design, which is not what this test measures
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    reports[name] = c.get(f"/v2/models/{name}/fidelity").json()
                    if reports[name]["samples"] + reports[name]["dropped"] >= i + 1:
                        break
                    time.sleep(0.02)
        metrics = c.get("/metrics").text
        off = c.get("/v2/models/plain/fidelity")
    bad, good = reports["drifted"], reports["faithful"]
    assert bad["reference"] == "eager/fp32" and bad["served"] == "onnxruntime/fp32"
    assert bad["samples"] >= 5, bad  # the queue may drop some under a burst; the rest are compared
    assert not bad["ok"] and any("relative error" in p for p in bad["problems"]), bad
    assert bad["outputs"][0]["metrics"]["max_rel_err"] > 0.1
    assert good["ok"] and good["samples"] >= 5 and good["outputs"][0]["metrics"]["max_rel_err"] < 1e-4, good
    assert good["outputs"][0]["kind"] == "logits" and "top1_agreement" in good["outputs"][0]["metrics"]
    assert 'kiln_fidelity{metric="max_rel_err",model="drifted",output="output"}' in metrics
    assert off.status_code == 404 and "--shadow-rate" in off.json()["error"]
