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
    assert to_dict(checks) == [{"name": "hidden", "shape_mismatch": "shape [2, 4] where the reference has [2, 5]"}]
