"""mlcapsule.attacks: oracles (budget, log, partial batches, postprocessing) and the metrics.

The metrics are cross-checked against scikit-learn's; the package must import without torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from mlcapsule.attacks import (
    AttackResult,
    CallableOracle,
    OnnxOracle,
    QueryBudgetExhausted,
    Trace,
    agreement,
    best_auc,
    jensen_shannon,
    labels_only,
    roc_auc,
    rounding,
    top_k,
    tpr_at_fpr,
)
from mlcapsule.attacks._run import spend
from mlcapsule.errors import BudgetExhaustedError, UsageError


def softmax_lr_onnx(w: np.ndarray, b: np.ndarray) -> object:
    """softmax(x W^T + b) as Gemm + Softmax, input "input" [N, d], output "probabilities"."""
    g = helper.make_graph(
        [helper.make_node("Gemm", ["input", "W", "B"], ["logits"], transB=1),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "lr", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", w.shape[1]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", w.shape[0]])],
        [numpy_helper.from_array(w.astype(np.float32), "W"), numpy_helper.from_array(b.astype(np.float32), "B")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_importing_the_attacks_does_not_import_torch_or_onnxruntime() -> None:
    code = ("import sys, mlcapsule.attacks; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_onnx_oracle_counts_every_row_and_logs_queries_and_answers() -> None:
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((3, 4)), rng.standard_normal(3)
    oracle = OnnxOracle(softmax_lr_onnx(w, b))
    x1, x2 = rng.random((5, 4)), rng.random((2, 4))
    y1 = oracle.query(x1)
    oracle.query(x2)
    assert oracle.queries_spent == 7 and oracle.budget is None
    assert [r.n for r in oracle.log.records] == [5, 2] and [r.first for r in oracle.log.records] == [0, 5]
    np.testing.assert_allclose(oracle.log.inputs(), np.concatenate([x1, x2]).astype(np.float32))
    np.testing.assert_allclose(y1.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(oracle.log.outputs()[:5], y1)


def test_the_attacks_own_budget_answers_the_prefix_then_stops() -> None:
    oracle = CallableOracle(lambda x: x.sum(axis=1, keepdims=True), budget=10)
    oracle.query(np.ones((6, 2)))
    with pytest.raises(QueryBudgetExhausted) as e:
        oracle.query(np.ones((7, 2)))
    assert e.value.source == "attack" and e.value.spent == 10 and e.value.budget == 10
    assert e.value.answered_x is not None and len(e.value.answered_x) == 4
    assert isinstance(e.value, BudgetExhaustedError)  # one exception tree: a policy error
    assert oracle.queries_spent == 10 and oracle.remaining == 0
    with pytest.raises(QueryBudgetExhausted):
        oracle.query(np.ones((1, 2)))
    assert oracle.queries_spent == 10


def test_a_victim_that_raises_budget_exhausted_ends_the_attack_cleanly() -> None:
    """A stand-in for a licensed capsule: it refuses after 12 answered rows, as the enclave does."""
    answered = {"n": 0}

    def victim(x: np.ndarray) -> np.ndarray:
        if answered["n"] + len(x) > 12:
            raise BudgetExhaustedError("the license's budget is spent")
        answered["n"] += len(x)
        return np.tile([0.2, 0.8], (len(x), 1))

    oracle = CallableOracle(victim)
    xs, ys, stopped = spend(oracle, np.zeros((8, 3)))
    assert stopped == "done" and len(ys) == 8
    xs, ys, stopped = spend(oracle, np.zeros((8, 3)))
    assert stopped == "capsule budget" and len(xs) == 0 and oracle.queries_spent == 8


def test_postprocessing_rounds_masks_and_reduces_to_labels() -> None:
    y = np.array([[0.123456, 0.3, 0.576544], [0.7, 0.2, 0.1]], np.float32)
    np.testing.assert_allclose(rounding(2)(y), [[0.12, 0.3, 0.58], [0.7, 0.2, 0.1]], atol=1e-7)
    np.testing.assert_array_equal(labels_only(y), [2, 0])
    np.testing.assert_allclose(top_k(1)(y), [[0, 0, 0.576544], [0.7, 0, 0]], atol=1e-7)
    oracle = CallableOracle(lambda x: y[: len(x)], postprocess=labels_only)
    assert oracle.query(np.zeros((2, 1))).tolist() == [2, 0]
    assert oracle.log.outputs().tolist() == [2, 0]  # the log holds what the attacker saw
    with pytest.raises(UsageError):
        rounding(-1)


def test_roc_auc_matches_scikit_learn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.4
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounded: many ties
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert best_auc(-scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert tpr_at_fpr(scores, labels, 0.01) == pytest.approx(tpr[fpr <= 0.01].max())
    # A 0/1 score (the gap attack): AUC = (1 + TPR - FPR) / 2.
    gap = np.r_[np.ones(80), np.zeros(20), np.ones(30), np.zeros(70)]
    truth = np.r_[np.ones(100), np.zeros(100)].astype(bool)
    assert roc_auc(gap, truth) == pytest.approx((1 + 0.8 - 0.3) / 2)


def test_small_metrics() -> None:
    assert agreement(np.array([1, 2, 3]), np.array([1, 0, 3])) == pytest.approx(2 / 3)
    p = np.array([[0.5, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(jensen_shannon(p, p), 0.0, atol=1e-12)
    assert jensen_shannon(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))[0] == pytest.approx(np.log(2))
    with pytest.raises(ValueError):
        roc_auc(np.ones(3), np.ones(3))


def test_trace_and_result_report_metric_against_queries() -> None:
    t = Trace()
    for q, f in [(10, 0.5), (20, 0.85), (40, 0.93), (80, 0.99)]:
        t.add(q, fidelity=f)
    assert t.first_reaching("fidelity", 0.9) == 40 and t.first_reaching("fidelity", 1.0) is None
    assert t.last("fidelity") == 0.99
    r = AttackResult("x", queries_spent=80, trace=t, params={"a": np.int64(3)})
    d = r.to_dict()
    assert d["trace"][1] == {"queries": 20, "fidelity": 0.85} and d["params"] == {"a": 3}
    assert not r.exhausted and '"queries_spent": 80' in r.to_json()
