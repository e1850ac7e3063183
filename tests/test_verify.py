import numpy as np
import pytest

from kiln.spec import TensorSpec
from kiln.verify import Budget, compare, judge, to_dict

LOGITS = TensorSpec("logits", "float32", ("batch", 3))
HIDDEN = TensorSpec("hidden", "float32", ("batch", "seq"))


def test_identical_outputs_pass() -> None:
    ref = [[np.eye(3, dtype=np.float32)], [np.array([[0, 2, 1]], np.float32)]]
    checks = compare([LOGITS], ref, ref, labels=np.array([0, 1, 2, 1]))
    assert checks[0].max_abs_err == 0 and checks[0].cosine == pytest.approx(1.0)
    assert checks[0].top1_agreement == 1.0 and checks[0].accuracy == 1.0
    assert judge(checks, Budget()) == []


def test_every_problem_is_listed() -> None:
    ref = [[np.array([[1, 0, 0], [0, 1, 0]], np.float32)]]
    got = [[np.array([[0, 1, 0], [np.nan, 1, 0]], np.float32)]]
    problems = judge(compare([LOGITS], ref, got), Budget())
    text = "; ".join(problems)
    assert "NaN" in text and "relative error" in text and "cosine" in text and "top-1" in text


def test_batches_with_different_sequence_lengths() -> None:
    ref = [[np.ones((2, 5), np.float32)], [np.ones((1, 9), np.float32)]]
    got = [[np.ones((2, 5), np.float32)], [np.full((1, 9), 1.01, np.float32)]]
    c = compare([HIDDEN], ref, got)[0]
    assert abs(c.max_rel_err - 0.01) < 1e-6 and c.top1_agreement is None
    assert judge([c], Budget(tolerance=0.02)) == [] and judge([c], Budget(tolerance=0.001))


def test_shape_mismatch_reads_as_a_shape_error_not_numbers() -> None:
    ref = [[np.ones((2, 5), np.float32)]]
    got = [[np.ones((2, 4), np.float32)]]
    checks = compare([HIDDEN], ref, got)
    assert judge(checks, Budget()) == ["hidden: shape [2, 4] where the reference has [2, 5]"]
    assert to_dict(checks) == [{"name": "hidden", "kind": "regression", "shape_mismatch": "shape [2, 4] where the reference has [2, 5]"}]


def _rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_embedding_is_judged_by_row_cosine_and_retrieval_never_by_argmax() -> None:
    base = _rows(32, 384, 0)  # pairs of near-duplicates: each row's nearest neighbour is its twin
    ref = np.concatenate([base, base + 0.3 * _rows(32, 384, 2)])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    got = ref + 0.07 * _rows(64, 384, 1)  # cosine ~0.9975 per row; the argmax of 384 dims often moves
    emb = TensorSpec("embedding", "float32", ("batch", 384), kind="embedding")
    check = compare([emb], [[ref]], [[got]])[0]
    assert check.top1_agreement is None and check.row_cosine_mean is not None and check.row_cosine_mean > 0.99
    assert check.retrieval_agreement == 1.0
    assert judge([check], Budget().for_recipe("int8-dynamic")) == []
    as_logits = compare([TensorSpec("embedding", "float32", ("batch", 384), kind="logits")], [[ref]], [[got]])[0]
    assert as_logits.top1_agreement is not None and as_logits.top1_agreement < 0.97
    assert any("top-1 agreement" in p for p in judge([as_logits], Budget().for_recipe("int8-dynamic")))


def test_a_shuffled_embedding_fails_on_retrieval_and_row_cosine() -> None:
    ref = _rows(64, 32, 0)
    check = compare([TensorSpec("e", "float32", ("batch", 32), kind="embedding")], [[ref]], [[ref[::-1].copy()]])[0]
    problems = judge([check], Budget().for_recipe("int8-dynamic"))
    assert any(p.startswith("e: row cosine") for p in problems) and any("retrieval agreement" in p for p in problems)


def test_kinds_are_inferred_conservatively_and_say_why() -> None:
    from kiln.verify import infer_kind

    unit = _rows(8, 16, 0)
    assert infer_kind(TensorSpec("output", "float32", ("batch", 16)), [unit]) == ("embedding", "its rows have unit length")
    assert infer_kind(TensorSpec("output", "float32", ("batch", 10)), [np.ones((4, 10), np.float32)])[0] == "logits"
    assert infer_kind(TensorSpec("pooler_output", "float32", ("batch", 768)))[0] == "embedding"
    assert infer_kind(TensorSpec("hidden", "float32", ("batch", "seq", 8)))[0] == "regression"
    assert infer_kind(TensorSpec("pred_boxes", "float32", ("batch", 100, 4)))[0] == "boxes"
    assert infer_kind(TensorSpec("y", "float32", ("batch", 1)))[0] == "regression"
    assert infer_kind(TensorSpec("y", "float32", ("batch", 10), kind="regression")) == ("regression", "declared")


def test_mask_and_boxes_metrics() -> None:
    seg = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    flipped = seg.copy()
    for b in range(2):  # pixel (0, 0) of each image changes class: 2 of 32 pixels
        flipped[b, (seg[b, :, 0, 0].argmax() + 1) % 3, 0, 0] = 100
    m = compare([TensorSpec("mask", "float32", ("batch", 3, 4, 4), kind="mask")], [[seg]], [[flipped]])[0]
    assert m.pixel_agreement is not None and 0.8 < m.pixel_agreement < 1.0
    boxes = np.array([[[0, 0, 10, 10], [5, 5, 15, 15]]], np.float32)
    shifted = boxes + np.array([1, 0, 1, 0], np.float32)
    b = compare([TensorSpec("boxes", "float32", ("batch", 2, 4), kind="boxes")], [[boxes]], [[shifted]])[0]
    assert b.box_iou == pytest.approx(90 / 110)
    assert any("mean IoU" in p for p in judge([b], Budget()))
