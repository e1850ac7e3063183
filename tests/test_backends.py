"""Round trips: every backend exports each zoo model, the artifact is loaded back from the repository
and must reproduce eager on inputs (sizes and values) it never saw."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

import kiln
import zoo
from kiln.backends import defaults as backend_names
from kiln.signature import example_inputs
from kiln.spec import TensorSpec

ROUND_TRIP = ["MLP", "ConvBN", "Encoder", "TwoInTwoOut"]


def fresh_inputs(result: kiln.BuildResult, batch: int, seed: int) -> list[torch.Tensor]:
    xs = example_inputs(result.inputs, scale=3, seed=seed)
    return [x[:batch] if batch <= len(x) else x.repeat(-(-batch // len(x)), *[1] * (x.dim() - 1))[:batch] for x in xs]


def eager(name: str, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = zoo.seeded(getattr(zoo, name))(*xs)
    return list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, tuple) else [out]


# TensorRT: tests/test_cuda.py; the optional runtimes (OpenVINO, ExecuTorch, TVM): tests/test_runtimes.py
@pytest.mark.parametrize("backend", [b for b in backend_names() if b != "tensorrt"])
@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip(built: Callable[[str], kiln.BuildResult], name: str, backend: str) -> None:
    result = built(name)
    # with BatchNorm in the model, the fp32 variants fold it first (fp32+bnfold): exact up to rounding
    c = next((c for c in result.candidates if c.variant == f"{backend}/fp32+bnfold"), None) or result.candidate(f"{backend}/fp32")
    assert c.status == "accepted", c.reason
    runner = kiln.load(str(result.path), variant=c.variant)
    for batch, seed in ((1, 5), (9, 6)):
        xs = fresh_inputs(result, batch, seed)
        got = runner(*xs)
        got = list(got.values()) if isinstance(got, dict) else list(got) if isinstance(got, tuple) else [got]
        for g, r in zip(got, eager(name, xs), strict=True):
            assert isinstance(g, torch.Tensor) and g.shape == r.shape
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_branch_never_silently_traced(built: Callable[[str], kiln.BuildResult]) -> None:
    result = built("Branchy")
    ts = result.candidate("torchscript/fp32")
    assert ts.status == "accepted" and ts.artifact and ts.artifact["meta"]["method"] == "script"
    assert any("Python boolean" in n and "torch.jit.script" in n for n in ts.notes)
    for backend in ("aoti", "onnxruntime"):
        c = result.candidate(f"{backend}/fp32")
        assert c.status == "failed" and "data-dependent control flow" in c.reason and "torch.cond" in c.reason
    runner = kiln.load(str(result.path), variant="torchscript/fp32")
    for sign in (1.0, -1.0):  # both branches
        x = torch.full((4, 8), sign)
        torch.testing.assert_close(runner(x), eager("Branchy", [x])[0])


def test_multi_output_names_and_dims(built: Callable[[str], kiln.BuildResult]) -> None:
    enc = built("Encoder")
    assert [str(s) for s in enc.outputs] == ["output0:float32[batch,seq,32]", "output1:float32[batch,2]"]
    two = built("TwoInTwoOut")
    assert [s.name for s in two.outputs] == ["embedding", "score"]
    runner = kiln.load(str(two.path))
    a, b = np.ones((3, 4), np.float32), np.zeros((3, 6), np.float32)
    by_pos, by_name = runner(a, b), runner.named(b=b, a=a)
    assert isinstance(by_pos, dict) and list(by_pos) == ["embedding", "score"]  # forward() returns a dict: so does the runner
    assert isinstance(by_pos["embedding"], np.ndarray) and by_pos["score"].shape == (3, 1)
    np.testing.assert_array_equal(by_pos["embedding"], by_name["embedding"])
    enc = kiln.load(str(built("Encoder").path))  # a tuple stays a tuple
    ids, mask = np.ones((2, 5), np.int64), np.ones((2, 5), np.int64)
    assert isinstance(enc(ids, mask), tuple) and list(enc.named(ids, mask)) == ["output0", "output1"]


def test_runner_rejects_bad_inputs(built: Callable[[str], kiln.BuildResult]) -> None:
    runner = kiln.load(str(built("TwoInTwoOut").path))
    a, b = np.ones((3, 4), np.float32), np.zeros((3, 6), np.float32)
    cases = [
        ((np.ones((4,), np.float32), b), 'expected input "a" float32[batch,4], got float32[4]', "add a batch dimension"),
        ((a.astype(np.int64), b), "got int64[3,4]", "astype"),
        ((a, np.zeros((2, 6), np.float32)), "dim 'batch' is 3", "must agree"),
        ((a,), "expected 2 inputs", "one array per input"),
        ((a, np.zeros((3, 5), np.float32)), 'expected input "b" float32[batch,6]', "fix the shape"),
    ]
    for args, msg, hint in cases:
        with pytest.raises(kiln.KilnError) as e:
            runner(*args)
        assert msg in e.value.message and hint in (e.value.hint or ""), e.value
    with pytest.raises(kiln.KilnError, match="unknown \\['c'\\]"):
        runner(a=a, c=b)
    # the server's rule too: float64 numpy (the numpy default) is converted for a float32 input
    assert runner(a.astype(np.float64), b)["embedding"].dtype == np.float32


def test_encoder_longer_sequence(built: Callable[[str], kiln.BuildResult]) -> None:
    """Dynamic seq beyond every size seen at export (still within the model's 64 positions)."""
    result = built("Encoder")
    runner = kiln.load(str(result.path), variant="onnxruntime/fp32")
    ids = torch.randint(0, 100, (2, 60))
    mask = torch.ones(2, 60, dtype=torch.int64)
    mask[1, 30:] = 0
    for g, r in zip(runner(ids, mask), eager("Encoder", [ids, mask])):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    assert TensorSpec.parse("ids:int64[batch,seq]@0..99") == result.inputs[0]


def test_every_compiled_model_gets_its_own_dynamo_cache() -> None:
    """Dynamo compiles one code object at most recompile_limit times, then runs it eagerly without a word: twelve
    models behind one shared FlatModel.forward would leave the last ones uncompiled. own_frame gives each its own."""
    import torch

    from kiln.signature import FlatModel, own_frame

    compiled: list[int] = []

    def backend(gm: torch.fx.GraphModule, _: list[torch.Tensor]) -> object:
        compiled.append(1)
        return gm.forward

    x = torch.randn(2, 4)
    limit = torch._dynamo.config.recompile_limit
    for i in range(limit + 4):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU() if i % 2 else torch.nn.Tanh()).eval()
        flat = own_frame(FlatModel(model))
        with torch.no_grad():
            out = torch.compile(flat, backend=backend)(x)[0]
            torch.testing.assert_close(out, model(x))
    assert len(compiled) == limit + 4  # each compiled for itself (shared, only 2 of 12 compile: 8 entries, then eager)
    assert len({own_frame(FlatModel(torch.nn.ReLU())).forward.__code__ for _ in range(3)}) == 3
