"""The model repository: versions, manifest, and refusing what was tampered with or cannot load here."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import kiln
from kiln import repository
from kiln.source import sha256_file


@pytest.fixture
def copy(built: Callable[[str], kiln.BuildResult], tmp_path: Path) -> Path:
    """A private copy of the built MLP's version folder, to damage."""
    src = built("MLP").path
    assert src is not None
    dest = tmp_path / "mlp" / "1"
    shutil.copytree(src, dest)
    return dest


def test_manifest_contents(built: Callable[[str], kiln.BuildResult]) -> None:
    r = built("MLP")
    m = json.loads((r.path / "kiln.json").read_text())  # type: ignore[operator]
    assert m["format"] == 1 and m["name"] == "mlp" and m["version"] == r.version
    zoo_file = Path(__file__).with_name("zoo.py")
    assert m["source"]["file"] == "zoo.py" and m["source"]["sha256"] == sha256_file(zoo_file)
    assert m["source"]["files"]["zoo.py"] == sha256_file(zoo_file)
    assert m["source"]["weights"] == "MLP.safetensors" and len(m["source"]["weights_sha256"]) == 64
    assert str(zoo_file.parent) not in json.dumps(m), "an absolute build-machine path reached kiln.json"
    assert m["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 16]}]
    assert {"torch", "onnxruntime", "numpy", "kiln", "python"} <= m["libraries"].keys()
    assert m["device"]["device"] == "cpu" and m["device"]["cores"] >= 1
    fp32 = {f"{b}/fp32" for b in __import__("kiln.backends").backends.defaults() if b != "tensorrt"}  # no optional runtimes
    assert {c["variant"] for c in m["candidates"]} == fp32 | {"onnxruntime/int8-dynamic", "onnxruntime/int8-static",
                                                              "tensorrt/fp32"}
    for c in m["candidates"]:
        if c["variant"] == "tensorrt/fp32":  # no GPU here: skipped, with the reason kept in the manifest
            assert c["status"] == "skipped" and "NVIDIA GPU" in c["reason"] and not torch.cuda.is_available()
            continue
        assert c["status"] in ("accepted", "rejected") and c["accuracy"], c
        assert c["status"] == "accepted" or c["variant"] not in fp32
        if c["status"] != "accepted":
            continue
        assert c["timings"]
        for name, digest in c["artifact"]["files"].items():
            assert sha256_file(r.path / c["artifact"]["dir"] / name) == digest  # type: ignore[operator]


def test_each_build_adds_a_version(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for _ in range(2):
        kiln.build(f"{Path(__file__).with_name('zoo.py')}:MLP", inputs=["x:float32[batch,16]"], repo=repo,
                   backends=("eager",), report=False)
    assert repository.versions(repo / "mlp") == [1, 2]
    assert repository.resolve(repo / "mlp")[1]["version"] == 2
    assert repository.resolve(repo / "mlp" / "1")[1]["version"] == 1


def test_tampered_artifact_is_refused(copy: Path) -> None:
    m = json.loads((copy / "kiln.json").read_text())
    art = copy / repository.candidate(m)["artifact"]["dir"]
    f = next(p for p in art.iterdir() if p.is_file())
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(kiln.KilnError, match="modified after the build") as e:
        kiln.load(str(copy))
    assert "rebuild" in (e.value.hint or "")


def test_missing_and_extra_files_are_refused(copy: Path) -> None:
    m = json.loads((copy / "kiln.json").read_text())
    art = copy / repository.candidate(m, "eager/fp32")["artifact"]["dir"]
    (art / "extra.py").write_text("import os")
    with pytest.raises(kiln.KilnError, match="unexpected files"):
        kiln.load(str(copy), variant="eager/fp32")
    (art / "weights.safetensors").unlink()
    with pytest.raises(kiln.KilnError, match="artifact file missing"):
        kiln.load(str(copy), variant="eager/fp32")


def _edit_entry(copy: Path, variant: str, change: Callable[[dict], None]) -> None:  # type: ignore[type-arg]
    path = copy / "kiln.json"
    m = json.loads(path.read_text())
    change(next(c for c in m["candidates"] if c["variant"] == variant))
    path.write_text(json.dumps(m))


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c["artifact"].update(dir="../../outside"), "not a relative path inside its version folder"),
    (lambda c: c["artifact"].update(dir="/etc"), "not a relative path inside its version folder"),
    (lambda c: c["artifact"]["meta"].update(file="../../../outside.onnx"), "not among its hashed files"),
    (lambda c: c["artifact"]["files"].update({"../../kiln.json": "0" * 64}), "not a relative path inside"),
])
def test_manifest_paths_are_confined_to_the_version_folder(copy: Path, change: Callable[[dict], None],  # type: ignore[type-arg]
                                                           message: str) -> None:
    """A path in kiln.json that leaves the version folder is refused before anything is read or hashed there."""
    outside = copy.parent.parent / "outside.onnx"
    shutil.copyfile(next(copy.glob("variants/onnxruntime-fp32/model.onnx")), outside)
    _edit_entry(copy, "onnxruntime/fp32", change)
    with pytest.raises(kiln.KilnError, match=message) as e:
        kiln.load(str(copy), variant="onnxruntime/fp32")
    assert "/etc/" not in str(e.value) and "passwd" not in str(e.value)


def test_a_symlink_out_of_the_artifact_is_refused(copy: Path, tmp_path: Path) -> None:
    art = next(copy.glob("variants/onnxruntime-fp32"))
    real = tmp_path / "elsewhere.onnx"
    shutil.move(art / "model.onnx", real)
    (art / "model.onnx").symlink_to(real)
    with pytest.raises(kiln.KilnError, match="outside its version folder|artifact file missing"):
        kiln.load(str(copy), variant="onnxruntime/fp32")


def test_incompatible_library_version_is_refused(copy: Path) -> None:
    path = copy / "kiln.json"
    m = json.loads(path.read_text())
    for c in m["candidates"]:
        if c["variant"] == "aoti/fp32":
            c["artifact"]["meta"]["torch"] = "1.13.1"
    path.write_text(json.dumps(m))
    with pytest.raises(kiln.KilnError, match="built with torch 1.13.1"):
        kiln.load(str(copy), variant="aoti/fp32")


def test_bad_paths_and_manifests(copy: Path, tmp_path: Path) -> None:
    with pytest.raises(kiln.KilnError, match="no model at"):
        kiln.load(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(kiln.KilnError, match="no built version"):
        kiln.load(str(tmp_path / "empty"))
    with pytest.raises(kiln.KilnError, match="no variant 'tensorrt/fp16'"):
        kiln.load(str(copy), variant="tensorrt/fp16")
    (copy / "kiln.json").write_text("{not json")
    with pytest.raises(kiln.KilnError, match="manifest is corrupt|cannot read"):
        kiln.load(str(copy))
    (copy / "kiln.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(kiln.KilnError, match="format 99"):
        kiln.load(str(copy))


def test_unavailable_device_is_a_clear_error(built: Callable[[str], kiln.BuildResult]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(kiln.KilnError, match="no CUDA GPU on this machine"):
        kiln.load(str(built("MLP").path), device="cuda:0")
    with pytest.raises(kiln.KilnError, match="unknown device 'tpu'"):
        kiln.load(str(built("MLP").path), device="tpu")
