"""Tramèr et al. (USENIX Security 2016), equation solving, against plain ONNX models.

Figures measured here (digits, d = 64 features, 10 classes; seeds fixed):
* binary LR: d + 1 = 65 queries, fidelity 1.0 on held-out and on uniform inputs (the paper: d + 1);
* softmax LR, log-ratio equations: d + 1 = 65 queries, fidelity 1.0;
* softmax LR, the paper's loss minimisation: c(d + 1) = 650 queries (the unknowns), fidelity 1.0;
* rounding to 2 decimals: d + 1 queries no longer suffice (fidelity < 0.95), 650 bring it back
  above 0.97 (the loss method);
* a 10-5-3 ReLU MLP (73 unknowns): fidelity above 0.95 with 4 x 73 queries.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from mlcapsule.attacks import (
    FidelityEvaluator,
    OnnxOracle,
    extract_logistic,
    extract_mlp,
    extract_softmax,
    labels_only,
    rounding,
)
from mlcapsule.demo.models import mlp
from mlcapsule.errors import UsageError
from test_attacks_oracle import softmax_lr_onnx


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x.astype(np.float32), y, test_size=0.25, random_state=0, stratify=y)
    return xtr, xte, ytr, yte


@pytest.fixture(scope="module")
def binary_lr(digits):  # type: ignore[no-untyped-def]
    xtr, _, ytr, _ = digits
    clf = LogisticRegression(max_iter=2000).fit(xtr, ytr % 2)  # odd digits against even digits
    w = np.vstack([np.zeros(64), clf.coef_[0]])
    return clf, softmax_lr_onnx(w, np.array([0.0, clf.intercept_[0]]))


@pytest.fixture(scope="module")
def softmax_lr(digits):  # type: ignore[no-untyped-def]
    xtr, _, ytr, _ = digits
    clf = LogisticRegression(max_iter=3000).fit(xtr, ytr)
    return clf, softmax_lr_onnx(clf.coef_, clf.intercept_)


def evaluator(model: object, x_heldout: np.ndarray, y: np.ndarray | None = None) -> FidelityEvaluator:
    return FidelityEvaluator(OnnxOracle(model), x_heldout, FidelityEvaluator.uniform_inputs(1000, (64,), 0, 16),
                             y_heldout=y)


def test_binary_logistic_regression_is_stolen_with_d_plus_1_queries(digits, binary_lr) -> None:  # type: ignore[no-untyped-def]
    clf, model = binary_lr
    oracle = OnnxOracle(model)
    # Queries in [0, 1]^64 (dim images) keep the answers away from 0 and 1; the equations are
    # linear, so the model recovered there holds on the whole domain [0, 16]^64.
    res = extract_logistic(oracle, 64, low=0.0, high=1.0, evaluator=evaluator(model, digits[1]))
    assert res.queries_spent == oracle.queries_spent == 65 == res.params["unknowns"]
    assert res.metrics["fidelity"] == 1.0 and res.metrics["fidelity_uniform"] == 1.0
    np.testing.assert_allclose(res.model.weight[1], clf.coef_[0], atol=1e-3)
    assert res.model.bias[1] == pytest.approx(clf.intercept_[0], abs=1e-2)


def test_softmax_regression_log_ratios_need_only_d_plus_1_queries(digits, softmax_lr) -> None:  # type: ignore[no-untyped-def]
    _, model = softmax_lr
    oracle = OnnxOracle(model)
    res = extract_softmax(oracle, 64, low=0.0, high=16.0, evaluator=evaluator(model, digits[1]),
                          checkpoints=[16, 32, 48, 64])
    assert res.queries_spent == 65 and res.params["unknowns"] == 650
    assert res.metrics["fidelity"] == 1.0 and res.metrics["fidelity_uniform"] == 1.0
    queries, fid = res.trace.series("fidelity")
    assert queries == [16, 32, 48, 64, 65] and fid[-1] == 1.0 and fid[0] < 0.9  # underdetermined before d + 1


def test_softmax_regression_with_the_papers_loss_method_and_query_count(digits, softmax_lr) -> None:  # type: ignore[no-untyped-def]
    _, model = softmax_lr
    oracle = OnnxOracle(model)
    res = extract_softmax(oracle, 64, method="loss", low=0.0, high=16.0, evaluator=evaluator(model, digits[1]))
    assert res.queries_spent == 650  # the paper's budget: one query per unknown
    assert res.metrics["fidelity"] == 1.0 and res.metrics["fidelity_uniform"] >= 0.999


def test_rounding_countermeasure_costs_the_attacker_queries(digits, softmax_lr) -> None:  # type: ignore[no-untyped-def]
    _, model = softmax_lr
    ev = evaluator(model, digits[1])
    few = extract_softmax(OnnxOracle(model, postprocess=rounding(2)), 64, low=0.0, high=16.0, evaluator=ev)
    many = extract_softmax(OnnxOracle(model, postprocess=rounding(2)), 64, method="loss", queries=650,
                           low=0.0, high=16.0, evaluator=ev)
    assert few.queries_spent == 65 and few.metrics["fidelity"] < 0.95
    assert many.metrics["fidelity"] >= 0.97


def test_rounded_binary_lr_recovers_with_twice_the_queries(digits, binary_lr) -> None:  # type: ignore[no-untyped-def]
    _, model = binary_lr
    ev = evaluator(model, digits[1])
    exact = extract_logistic(OnnxOracle(model, postprocess=rounding(4)), 64, high=1.0, evaluator=ev)
    more = extract_logistic(OnnxOracle(model, postprocess=rounding(4)), 64, high=1.0, queries=130, evaluator=ev)
    assert exact.metrics["fidelity"] < 1.0 <= more.metrics["fidelity"] + 1e-12


def test_mlp_with_softmax_outputs_by_loss_minimisation() -> None:
    victim = mlp(10, [5], 3, seed=0)  # ReLU MLP with random weights, 73 unknowns
    ev = FidelityEvaluator(OnnxOracle(victim), FidelityEvaluator.uniform_inputs(2000, (10,), -1, 1, seed=5))
    res = extract_mlp(OnnxOracle(victim), 10, [5], n_classes=3, queries=4 * 73, low=-1.0, high=1.0, evaluator=ev)
    assert res.params["unknowns"] == 73 and res.queries_spent == 292
    assert res.metrics["fidelity"] > 0.95


def test_equation_solving_refuses_a_label_only_oracle(softmax_lr) -> None:  # type: ignore[no-untyped-def]
    _, model = softmax_lr
    with pytest.raises(UsageError, match="labels only"):
        extract_softmax(OnnxOracle(model, postprocess=labels_only), 64)


def test_an_attack_budget_below_d_plus_1_leaves_an_underdetermined_model(digits, softmax_lr) -> None:  # type: ignore[no-untyped-def]
    _, model = softmax_lr
    oracle = OnnxOracle(model, budget=40)
    res = extract_softmax(oracle, 64, low=0.0, high=16.0, evaluator=evaluator(model, digits[1]))
    assert res.stopped == "attack budget" and res.exhausted and res.queries_spent == 40 == oracle.queries_spent
    assert res.metrics["fidelity"] < 0.9
