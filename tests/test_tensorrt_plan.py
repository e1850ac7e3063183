"""The TensorRT backend's code path without TensorRT or a GPU, so it cannot rot before the day it runs: the
variants it declares, the optimization profile, the engine cache key and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.backends import tensorrt
from kiln.backends.common import Target
from kiln.errors import Skip
from kiln.spec import TensorSpec

IMAGE = TensorSpec.parse("image:float32[batch,3,32,32]")
IDS = TensorSpec.parse("ids:int64[batch,seq]@0..999")
MASK = TensorSpec.parse("mask:int64[batch,seq]@0..1")


def test_declares_gpu_variants_and_one_row_on_a_cpu() -> None:
    assert [r.tag for r in tensorrt.variants(Target(device="cpu"))] == ["fp32"]  # the table says why it is skipped
    tags = [r.tag for r in tensorrt.variants(Target(device="cuda:0", halves=("fp16", "bf16")))]
    assert "fp32" in tags and "fp16" in tags and "int8-dynamic" not in tags


def test_profile_spans_one_to_the_largest_build_batch_and_the_given_dims() -> None:
    shapes = tensorrt.profile_shapes([IDS, MASK], [1, 8, 64], {"seq": 128})
    assert shapes == {"ids": ((1, 1), (64, 128), (64, 128)), "mask": ((1, 1), (64, 128), (64, 128))}
    assert tensorrt.profile_shapes([IMAGE], [4]) == {"image": ((1, 3, 32, 32), (4, 3, 32, 32), (4, 3, 32, 32))}


def test_cache_key_changes_with_graph_gpu_version_and_profile(tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"graph one")
    _, key = tensorrt.engine_plan(onnx, [IMAGE], [1, 8], None, gpu="NVIDIA H100 sm_90", trt_version="10.9.0")
    again = tensorrt.engine_plan(onnx, [IMAGE], [1, 8], None, gpu="NVIDIA H100 sm_90", trt_version="10.9.0")[1]
    assert key == again and len(key) == 32
    others = {tensorrt.engine_plan(onnx, [IMAGE], [1, 16], None, gpu="NVIDIA H100 sm_90", trt_version="10.9.0")[1],
              tensorrt.engine_plan(onnx, [IMAGE], [1, 8], None, gpu="NVIDIA H200 sm_90", trt_version="10.9.0")[1],
              tensorrt.engine_plan(onnx, [IMAGE], [1, 8], None, gpu="NVIDIA H100 sm_90", trt_version="11.0.0")[1]}
    onnx.write_bytes(b"graph two")
    others.add(tensorrt.engine_plan(onnx, [IMAGE], [1, 8], None, gpu="NVIDIA H100 sm_90", trt_version="10.9.0")[1])
    assert key not in others and len(others) == 4


def test_refusals_say_what_is_missing(tmp_path: Path) -> None:
    from kiln.backends.common import Subject
    from kiln.recipe import Recipe
    from kiln.source import ModelSource

    (tmp_path / "model.onnx").write_bytes(b"")
    subject = Subject(ModelSource.parse(str(tmp_path / "model.onnx")), None, [IMAGE], [], [torch.zeros(1, 3, 32, 32)], "cpu")
    with pytest.raises(Skip, match="TensorRT runs on NVIDIA GPUs; build with --device cuda"):
        tensorrt.export(subject, tmp_path / "out", options={"recipe": Recipe("fp32")})
    try:
        import tensorrt as _  # noqa: F401
    except ImportError:
        with pytest.raises(Skip, match=r"tensorrt is not installed \(pip install tensorrt"):
            tensorrt._trt()
        assert "not installed" in (tensorrt.compatible({"tensorrt": "10.9.0"}) or "")
    with pytest.raises(Skip, match="tensorrt is not installed|TensorRT engines run on NVIDIA GPUs"):
        tensorrt.load(tmp_path, {"file": tensorrt.FILE}, [IMAGE], [], device="cpu")
