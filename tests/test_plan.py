"""The search space: which variants the build tries, for which model, device and --precision."""

from __future__ import annotations

import pytest
import torch

import zoo
from kiln.errors import KilnError
from kiln.plan import plan, probe_low_precision
from test_transforms import ConvNet

ALL = ("eager", "torchscript", "aoti", "onnxruntime", "compile", "tensorrt")


def names(**kw: object) -> list[str]:
    return [v.name for v in plan(ALL, **kw)]  # type: ignore[arg-type]


def test_cpu_plan_follows_the_model() -> None:
    conv = names(module=zoo.seeded(ConvNet))
    assert conv[:3] == ["eager/fp32", "eager/fp32+bnfold", "eager/fp32+bnfold+channels_last"]
    assert {"aoti/fp32+bnfold", "aoti/int8-static", "aoti/bf16+bnfold+channels_last", "onnxruntime/int8-dynamic",
            "onnxruntime/int8-static", "compile/fp32+bnfold", "eager/int8-dynamic+bnfold"} <= set(conv)
    assert not [n for n in conv if "cudagraphs" in n or "max-autotune" in n]  # CUDA-only passes stay off a CPU build
    assert [n for n in conv if n.startswith("tensorrt/")] == ["tensorrt/fp32"]  # one row says why it is not here
    mlp = names(module=zoo.seeded(zoo.MLP))
    assert "eager/fp32" in mlp and not [n for n in mlp if "bnfold" in n or "channels_last" in n]


def test_cuda_plan_has_graphs_autotune_and_tensorrt() -> None:
    cuda = names(module=zoo.seeded(ConvNet), device="cuda")
    assert {"eager/fp16+bnfold+channels_last+cudagraphs", "compile/bf16+bnfold+channels_last+cudagraphs",
            "compile/fp16+bnfold+channels_last+max-autotune+cudagraphs", "tensorrt/fp16", "tensorrt/bf16",
            "tensorrt/int8-static", "aoti/fp16+bnfold+channels_last"} <= set(cuda)
    assert "aoti/int8-static" not in cuda  # the x86 Inductor quantizer is for CPUs


def test_precision_prune_and_patterns_bound_the_search() -> None:
    m = zoo.seeded(ConvNet)
    assert {n.split("/")[1].split("+")[0] for n in names(module=m, precision="bf16")} == {"bf16"}
    assert {n.split("/")[1].split("+")[0] for n in names(module=m, precision="int8")} == {"int8-dynamic", "int8-static"}
    assert not [n for n in names(module=m, low_precision=()) if "16" in n]  # a CPU where halves measured slower
    assert "aoti/fp16+bnfold+channels_last" in names(module=m, precision="fp16", low_precision=())  # asked for: built
    pruned = names(module=m, prune=0.3)
    assert {"eager/fp32+bnfold+prune30", "eager/fp32+bnfold+chprune30", "onnxruntime/fp32+prune30",
            "onnxruntime/fp32+chprune30"} <= set(pruned)
    assert names(module=m, patterns=["compile/*", "eager/fp32"]) == ["eager/fp32"] + [
        n for n in names(module=m) if n.startswith("compile/")]
    with pytest.raises(KilnError, match="--prune 3"):
        names(module=m, prune=3)
    with pytest.raises(KilnError, match="no variant"):
        names(module=m, patterns=["nothing/*"])


def test_sources_that_are_not_python_are_exported_as_they_are() -> None:
    got = names(module=torch.jit.script(zoo.seeded(zoo.MLP)), transformable=False)
    assert all(n.split("/")[1] in ("fp32", "int8-dynamic", "int8-static") for n in got)
    assert "aoti/int8-static" not in got and "onnxruntime/int8-dynamic" in got


def test_cpu_probe_leaves_out_exactly_the_halves_that_measured_slower() -> None:
    """Which halves win depends on the CPU, so the test checks the rule against the probe's own measurements: a
    precision is left out if and only if it measured at least 0.9x fp32's time (or cannot run)."""
    timings: dict[str, float] = {}
    reasons = probe_low_precision(zoo.seeded(ConvNet), [torch.randn(8, 3, 16, 16)], budget_s=0.3, timings=timings)
    assert "fp32" in timings and set(reasons) <= {"fp16", "bf16"}
    for prec in ("fp16", "bf16"):
        if prec not in timings:
            assert "does not run" in reasons[prec]
            continue
        slower = timings[prec] >= 0.9 * timings["fp32"]
        assert (prec in reasons) == slower, (prec, timings, reasons)
        if slower:
            assert reasons[prec].startswith(f"{prec} eager measured {timings[prec] * 1e3:.3g} ms vs fp32 {timings['fp32'] * 1e3:.3g} ms")
