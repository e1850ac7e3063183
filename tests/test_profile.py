import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import kiln
from kiln.profile import KernelStat, ProfileResult, kernel_kind, profile


def test_torch_profile_and_trace(built: Callable[[str], kiln.BuildResult], tmp_path: Path) -> None:
    r = profile(built("ConvBN").path, variant="eager/fp32", batch=4, steps=5, trace=tmp_path / "t.json", memory=True)
    assert r.profiler == "torch.profiler" and r.ops and r.ops[0].self_ms >= r.ops[-1].self_ms
    assert any("conv" in o.name for o in r.ops[:5])
    trace = json.loads((tmp_path / "t.json").read_text())
    assert any(e.get("name", "").startswith("aten::") and e.get("ph") == "X" for e in trace["traceEvents"])
    assert r.memory and "peak growth" in r.memory


def test_onnxruntime_profile_and_trace(built: Callable[[str], kiln.BuildResult], tmp_path: Path) -> None:
    r = profile(built("ConvBN").path, variant="onnxruntime/fp32", batch=2, steps=7, trace=tmp_path / "o.json")
    assert r.profiler == "onnxruntime profiler"
    names = {o.name for o in r.ops}
    assert "Conv" in names and all(o.calls == 7 for o in r.ops if o.name == "Conv")
    events = json.loads((tmp_path / "o.json").read_text())
    assert isinstance(events, list) and any(e.get("cat") == "Node" and e.get("ph") == "X" for e in events)


def test_profile_cli(built: Callable[[str], kiln.BuildResult], tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "kiln", "profile", str(built("MLP").path), "--batch", "8", "--steps", "5",
                        "--trace", str(tmp_path / "cli.json")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "top operators by self time" in p.stdout and (tmp_path / "cli.json").is_file()


@pytest.mark.parametrize(("name", "kind"), [  # kernel names from torch.profiler on an H100 (bench/results)
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1", "convolution"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_gelubias_TNT", "GEMM"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
    ("triton_poi_fused_add_convolution_relu_5", "fused pointwise/reduction (triton)"),
    ("triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_add_arange", "fused pointwise/reduction (triton)"),
    ("triton_per_fused_add_native_layer_norm_view_2", "fused pointwise/reduction (triton)"),
    ("triton_tem_fused_convolution_0", "convolution"),
    ("triton_tem_fused_addmm_1", "GEMM"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__half, __half, float, false, true, (cudnnKernelDataType_t)0>", "layout transform"),
    ("Memcpy DtoD (Device -> Device)", "copy/fill"),
    ("void at::native::(anonymous namespace)::max_pool_forward_nhwc<c10::Half, c10::Half>", "pooling"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "other"),
])
def test_a_cuda_kernel_is_named_by_what_it_does(name: str, kind: str) -> None:
    assert kernel_kind(name) == kind


def test_kinds_add_up_the_kernels_per_run() -> None:
    r = ProfileResult("compile/fp16", "torch.profiler", [], None, None, 0.0, run_us=120.0, kernels=[
        KernelStat("sm90_xmma_fprop_implicit_gemm_a", "convolution", 50.0, 2),
        KernelStat("triton_poi_fused_relu_0", "fused pointwise/reduction (triton)", 20.0, 2),
        KernelStat("sm90_xmma_fprop_implicit_gemm_b", "convolution", 30.0, 1)])
    assert r.kinds() == [("convolution", 80.0), ("fused pointwise/reduction (triton)", 20.0)]


def test_profile_takes_the_sequence_length_it_is_given_and_refuses_a_dim_the_model_lacks(
        built: Callable[[str], kiln.BuildResult]) -> None:
    """A model with a sequence dim is profiled at the size asked for (the build's --dim-size by default, which the
    manifest records), so that `kiln profile` shows the shape the model serves, not a synthetic short one."""
    r = built("Encoder")
    assert r.manifest["dim_sizes"] == {}
    p = profile(r.path, variant="eager/fp32", batch=3, steps=2, dim_size={"seq": 40})
    assert p.shapes == "ids 3x40, mask 3x40"
    with pytest.raises(kiln.KilnError, match="names len, which no input") as e:
        profile(r.path, variant="eager/fp32", steps=1, dim_size={"len": 40})
    assert "ids" in str(e.value.hint)
