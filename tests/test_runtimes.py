"""The optional runtimes on real exports of small models: OpenVINO, ExecuTorch, TVM, ONNX import (onnx2torch) and
MindSpore's ONNX route. Each test skips with its reason where the package is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kiln
import zoo
from kiln.errors import KilnError

pytestmark = pytest.mark.runtimes
ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"


def _digits(repo: Path, backends: tuple[str, ...], **kw: object) -> kiln.BuildResult:
    return kiln.build(f"{DIGITS}/model.py:DigitsNet", weights=DIGITS / "digits.safetensors", data=DIGITS / "test.npz",
                      calib=DIGITS / "calib.npz", repo=repo, backends=("eager", *backends), batch=(1, 8), **kw)  # type: ignore[arg-type]


def _by_name(r: kiln.BuildResult) -> dict[str, kiln.builder.Candidate]:
    return {c.variant: c for c in r.candidates}


def _digits_batch(n: int) -> np.ndarray:
    return np.load(DIGITS / "test.npz")["image"][:n]


def test_optional_runtimes_are_opt_in() -> None:
    from kiln import backends

    assert {"openvino", "executorch", "tvm"} <= set(backends.names())
    assert not {"openvino", "executorch", "tvm"} & set(backends.defaults())


def test_openvino_ir_is_the_artifact_and_int8_is_calibrated(tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'kiln[openvino]')")
    r = _digits(tmp_path, ("openvino",), objective="throughput")
    got = _by_name(r)
    assert got["openvino/fp32"].status == "accepted", got["openvino/fp32"].reason
    int8 = got["openvino/int8-static"]
    assert int8.status in ("accepted", "rejected"), int8.reason
    assert int8.accuracy and int8.accuracy[0]["max_rel_err"] > 0  # quantized: not the fp32 graph
    bf16 = got["openvino/bf16"]
    assert bf16.status == "accepted" or "no bf16" in bf16.reason, bf16.reason
    manifest = json.loads((r.path / "kiln.json").read_text())
    ov = next(c for c in manifest["candidates"] if c["variant"] == "openvino/fp32")
    assert ov["artifact"]["meta"]["hint"] == "THROUGHPUT" and ov["artifact"]["meta"]["precision_hint"] == "f32"
    folder = r.path / "variants" / "openvino-fp32"
    assert (folder / "model.xml").is_file() and (folder / "model.bin").is_file()
    x = _digits_batch(5)
    ref = kiln.load(r.path, variant="eager/fp32")(image=x)
    np.testing.assert_allclose(kiln.load(r.path, variant="openvino/fp32")(image=x), ref, rtol=1e-4, atol=1e-4)
    (folder / "model.bin").write_bytes(b"\0" * 16)  # tampered weights: refused by the hash check, not run
    with pytest.raises(KilnError):
        kiln.load(r.path, variant="openvino/fp32")


def test_executorch_pte_runs_through_the_executorch_runtime(tmp_path: Path) -> None:
    pytest.importorskip("executorch", reason="executorch is not installed (pip install 'kiln[executorch]')")
    r = _digits(tmp_path, ("executorch",), variants=["eager/fp32", "executorch/*"])
    got = _by_name(r)
    fp32 = got["executorch/fp32+bnfold"]
    assert fp32.status == "accepted", fp32.reason
    assert any("XNNPACK runs" in n for n in fp32.notes), fp32.notes
    assert got["executorch/int8-static+bnfold"].status in ("accepted", "rejected"), got["executorch/int8-static+bnfold"].reason
    manifest = json.loads((r.path / "kiln.json").read_text())
    meta = next(c for c in manifest["candidates"] if c["variant"] == "executorch/fp32+bnfold")["artifact"]["meta"]
    assert 0 < meta["delegation"]["share"] <= 1 and meta["delegation"]["delegated"] > 0
    assert (r.path / "variants" / "executorch-fp32_bnfold" / "model.pte").is_file()
    x = _digits_batch(70)  # past the program's batch capacity: run in slices, same answer
    ref = kiln.load(r.path, variant="eager/fp32")(image=x)
    np.testing.assert_allclose(kiln.load(r.path, variant="executorch/fp32+bnfold")(image=x), ref, rtol=1e-4, atol=1e-4)


def test_tvm_untuned_and_tuned_with_a_reused_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'kiln[tvm]')")
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    m = zoo.seeded(zoo.MLP)
    untuned = kiln.build(m, inputs=zoo.SPECS["MLP"], repo=tmp_path, name="mlp", backends=("eager", "tvm"), batch=(1, 4),
                         tvm_trials=0)
    c = _by_name(untuned)["tvm/fp32"]
    assert c.status == "accepted", c.reason
    x = np.random.default_rng(0).standard_normal((9, 16)).astype(np.float32)
    want = m(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(kiln.load(untuned.path, variant="tvm/fp32")(x=x), want, rtol=1e-4, atol=1e-5)
    cuda_intrinsics = "tvm.s_tir.tensor_intrin.cuda" in sys.modules
    tuned = kiln.build(m, inputs=zoo.SPECS["MLP"], repo=tmp_path, name="mlp", backends=("eager", "tvm"), batch=(2,),
                       tvm_trials=2)
    # tuning for the CPU registers the CPU tensor intrinsics only (CUDA's took a minute per process to parse)
    assert cuda_intrinsics or "tvm.s_tir.tensor_intrin.cuda" not in sys.modules
    c = _by_name(tuned)["tvm/fp32"]
    assert c.status == "accepted", c.reason
    folder = tuned.path / "variants" / "tvm-fp32"
    assert (folder / "tuning" / "b2" / "database_tuning_record.json").is_file()
    assert (folder / "model.b2.so").is_file()
    # batch 9 with a bucket of 2: slices padded to the bucket, same answer
    np.testing.assert_allclose(kiln.load(tuned.path, variant="tvm/fp32")(x=x), want, rtol=1e-4, atol=1e-5)
    again = kiln.build(m, inputs=zoo.SPECS["MLP"], repo=tmp_path, name="mlp", backends=("tvm",), batch=(2,), tvm_trials=2)
    assert any("reused from the cache" in n for n in _by_name(again)["tvm/fp32"].notes)


def _need_onnx2torch() -> None:
    import importlib.util

    if importlib.util.find_spec("onnx2torch") is None:
        pytest.skip("onnx2torch is not installed (pip install 'kiln[onnx-import]')")


def _mlp_onnx(path: Path) -> torch.nn.Module:
    m = zoo.seeded(zoo.MLP)
    torch.onnx.export(m, (torch.randn(2, 16),), str(path), input_names=["features"], output_names=["scores"],
                      dynamic_axes={"features": {0: "batch"}, "scores": {0: "batch"}}, dynamo=False)
    return m


def test_onnx_source_gets_torch_variants_verified_against_onnxruntime(tmp_path: Path) -> None:
    _need_onnx2torch()
    m = _mlp_onnx(tmp_path / "mlp.onnx")
    r = kiln.build(str(tmp_path / "mlp.onnx"), repo=tmp_path / "repo", backends=("eager", "onnxruntime", "torchscript"),
                   batch=(1, 4))
    got = _by_name(r)
    assert got["eager/fp32"].status == "accepted", got["eager/fp32"].reason
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    # the eager artifact carries the ONNX file and converts it again at load: no build-machine files needed
    assert (r.path / "variants" / "eager-fp32" / "model.onnx").is_file()
    np.testing.assert_allclose(kiln.load(r.path, variant="eager/fp32")(features=x), m(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_onnx_import_names_the_operators_it_cannot_convert(tmp_path: Path) -> None:
    _need_onnx2torch()
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("DFT", ["x"], ["y"])  # a spectral op onnx2torch has no converter for
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what this onnxruntime reads
    onnx.save(model, str(tmp_path / "dft.onnx"))
    r = kiln.build(str(tmp_path / "dft.onnx"), repo=tmp_path / "repo", backends=("eager", "onnxruntime"), batch=(1,))
    eager = _by_name(r)["eager/fp32"]
    assert eager.status == "skipped" and "DFT-17" in eager.reason, eager.reason
    assert r.selected == "onnxruntime/fp32"


def test_mindspore_files_get_the_onnx_route(tmp_path: Path) -> None:
    (tmp_path / "net.mindir").write_bytes(b"\0" * 8)
    with pytest.raises(KilnError) as e:
        kiln.build(str(tmp_path / "net.mindir"), repo=tmp_path / "repo")
    assert "through ONNX" in e.value.message and "mindspore.onnx.export" in (e.value.hint or "")


def test_mindspore_network_to_onnx_to_verified_variants(tmp_path: Path) -> None:
    """MindSpore lives in its own environment (2.7 GB): KILN_MINDSPORE_PYTHON names its python."""
    py = os.environ.get("KILN_MINDSPORE_PYTHON")
    if not py:
        pytest.skip("set KILN_MINDSPORE_PYTHON to a python with mindspore (README: MindSpore) to run this test")
    subprocess.run([py, str(ROOT / "examples" / "mindspore" / "export_onnx.py"), str(tmp_path)], check=True, timeout=600)
    r = kiln.build(str(tmp_path / "msnet.onnx"), repo=tmp_path / "repo", backends=("eager", "onnxruntime"), batch=(1,))
    assert r.selected is not None and _by_name(r)["eager/fp32"].status == "accepted"
    x, want = np.load(tmp_path / "ref_in.npy"), np.load(tmp_path / "ref_out.npy")
    name = r.inputs[0].name
    np.testing.assert_allclose(kiln.load(r.path, variant="onnxruntime/fp32")(**{name: x}), want, rtol=1e-4, atol=1e-5)
