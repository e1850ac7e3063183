"""`+trim`: a batch's trailing padding cut before the call, for models with a mask input and pooled outputs;
verified against the untrimmed reference, refused when the verification data has no padding to cut."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import kiln
import zoo
from kiln.spec import TensorSpec
from kiln.transforms import trim
from support import ZOO

SPECS = ["ids:int64[batch,seq]@0..99", "mask:int64[batch,seq]@0..1"]


def padded(path: Path, rows: int = 48, seq: int = 24, longest: int = 16) -> Path:
    """Token ids and masks as a tokenizer pads them: every row a valid prefix, the longest `longest` of `seq`."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, longest + 1, size=rows)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(0, 100, size=(rows, seq)) * mask
    np.savez(path, ids=ids, mask=mask)
    return path


def test_plan_needs_a_mask_and_pooled_outputs() -> None:
    ins = [TensorSpec.parse(s) for s in SPECS]
    pooled = [TensorSpec.parse("logits:float32[batch,2]")]
    per_token = [TensorSpec.parse("hidden:float32[batch,seq,32]"), *pooled]
    t = trim.plan(ins, pooled)
    assert t is not None and t.dim == "seq" and t.mask == 1 and t.axes == (1, 1)
    assert trim.plan(ins, per_token) is None and "per-token outputs" in (trim.reason(ins, per_token) or "")
    assert trim.plan([TensorSpec.parse("x:float32[batch,seq]")], pooled) is None  # no mask input
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    ids, m = t.cut([torch.arange(10).view(2, 5), mask])
    assert m.tolist() == [[1, 1, 0], [1, 1, 1]] and ids.tolist() == [[0, 1, 2], [5, 6, 7]]
    assert t.cut([torch.zeros(2, 4, dtype=torch.long)] * 2)[1].shape == (2, 1)  # an all-padding batch keeps one column
    assert trim.exercised(ins, pooled, [[torch.zeros(2, 5, dtype=torch.long), mask]])
    assert not trim.exercised(ins, pooled, [[torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)]])


def test_trim_variants_verified_and_loaded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    from safetensors.torch import save_model

    save_model(zoo.seeded(zoo.PooledEncoder), str(tmp_path / "w.safetensors"))
    r = kiln.build(f"{ZOO}:PooledEncoder", weights=tmp_path / "w.safetensors", inputs=SPECS,
                   data=padded(tmp_path / "data.npz"), repo=tmp_path / "repo", backends="eager,onnxruntime",
                   precision="fp32", batch=(8,), report=False)
    for v in ("eager/fp32+trim", "onnxruntime/fp32+trim"):
        c = r.candidate(v)
        assert c.status == "accepted", c.reason
        assert c.accuracy[0]["max_rel_err"] < 1e-4
    assert r.path is not None
    runner = kiln.load(r.path, variant="onnxruntime/fp32+trim")
    ref = kiln.load(r.path, variant="eager/fp32")
    assert runner.info["trim"] == {"mask": "mask", "dim": "seq"}
    z = np.load(tmp_path / "data.npz")
    ids, mask = z["ids"][:8], z["mask"][:8]
    np.testing.assert_allclose(runner(ids, mask), ref(ids, mask), atol=1e-4)
    # Padding longer than any the build saw is still cut: 200 columns, the model's positions stop at 64.
    wide = [np.pad(a, ((0, 0), (0, 200 - a.shape[1]))) for a in (ids, mask)]
    np.testing.assert_allclose(runner(*wide), ref(ids, mask), atol=1e-4)


def test_a_model_that_reads_padding_is_rejected(tmp_path: Path) -> None:
    r = kiln.build(f"{ZOO}:MaskBlind", inputs=SPECS, data=padded(tmp_path / "data.npz"), repo=tmp_path / "repo",
                   backends="eager", precision="fp32", batch=(8,), report=False)
    c = r.candidate("eager/fp32+trim")
    assert c.status == "rejected" and "relative error" in c.reason
    assert r.selected == "eager/fp32"


def test_no_padding_in_the_data_no_trim_variants(tmp_path: Path) -> None:
    r = kiln.build(f"{ZOO}:PooledEncoder", inputs=SPECS, repo=tmp_path / "repo", backends="eager",
                   precision="fp32", batch=(8,), report=False)  # synthetic masks keep one full row per batch
    assert not any("trim" in c.variant for c in r.candidates)
    assert any("+trim variants not tried" in n for n in r.manifest["notes"])
    with pytest.raises(kiln.KilnError, match="trailing padding"):
        kiln.build(f"{ZOO}:PooledEncoder", inputs=SPECS, repo=tmp_path / "repo2", backends="eager",
                   variants=["*+trim"], batch=(8,), report=False)
