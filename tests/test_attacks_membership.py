"""Membership inference against an overfit classifier, served as plain ONNX.

The victim: a scikit-learn MLP (128 hidden units, no regularisation) trained on 200 digits with
Gaussian pixel noise (σ = 0.5 on 0..1 pixels), so that, like the overfit CIFAR models of Salem
et al., it is 100 % accurate on its training set and about 53 % on fresh data. (On clean digits
the gap is small, 100 % against 94 %, and the entropy attack's AUC only ~0.62.) Members: its
200 training inputs; non-members: 200 others. Figures (seeds fixed): the entropy attack's
(Salem et al.) AUC ~0.90 (> 0.8 asserted); the modified entropy (Song & Mittal) at least as
good; the label-only gap attack's AUC is exactly (1 + train acc - test acc) / 2 (~0.74).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from mlcapsule.attacks import (
    CallableOracle,
    OnnxOracle,
    ThresholdAttack,
    labels_only,
    membership_inference,
    membership_report,
    membership_scores,
)
from mlcapsule.errors import BudgetExhaustedError, UsageError
from mlcapsule.export import sklearn_to_onnx

N = 200  # members, and as many non-members


@pytest.fixture(scope="module")
def overfit():  # type: ignore[no-untyped-def]
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0 + 0.5 * np.random.default_rng(1).standard_normal(x.shape)).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    members, non_members = order[:N], order[N:2 * N]
    clf = MLPClassifier(hidden_layer_sizes=(128,), alpha=0.0, max_iter=1000, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x[members], y[members])
    model = sklearn_to_onnx(clf, 64, probabilities_only=True)
    return model, x[members], y[members], x[non_members], y[non_members]


def test_entropy_attack_auc_on_an_overfit_model(overfit) -> None:  # type: ignore[no-untyped-def]
    model, xm, ym, xn, yn = overfit
    oracle = OnnxOracle(model)
    res = membership_inference(oracle, xm, xn, member_labels=ym, non_member_labels=yn,
                               kinds=("entropy", "max_posterior", "modified_entropy", "loss", "gap"))
    assert res.queries_spent == oracle.queries_spent == 2 * N and res.stopped == "done"
    m = res.metrics
    assert m["entropy.auc"] > 0.8, m
    assert m["entropy.best_auc"] == max(m["entropy.auc"], 1 - m["entropy.auc"])
    assert m["modified_entropy.auc"] >= m["entropy.auc"] - 0.02
    assert 0.0 <= m["entropy.tpr_at_1pct_fpr"] <= 1.0
    # Gap attack: AUC = (1 + train accuracy - test accuracy) / 2.
    answers = oracle.query(np.concatenate([xm, xn]))
    train_acc = np.mean(answers[:N].argmax(1) == ym)
    test_acc = np.mean(answers[N:].argmax(1) == yn)
    assert train_acc == 1.0
    assert m["gap.auc"] == pytest.approx((1 + train_acc - test_acc) / 2)


def test_cross_checked_with_scikit_learn(overfit) -> None:  # type: ignore[no-untyped-def]
    from sklearn.metrics import roc_auc_score

    model, xm, ym, xn, yn = overfit
    p = OnnxOracle(model).query(np.concatenate([xm, xn]))
    truth = np.r_[np.ones(N), np.zeros(N)]
    for kind in ("entropy", "modified_entropy"):
        s = membership_scores(p, kind, np.r_[ym, yn])
        assert membership_report(s[:N], s[N:]).auc == pytest.approx(roc_auc_score(truth, s), abs=1e-12)


def test_modified_entropy_of_a_confident_wrong_answer_is_low() -> None:
    p = np.array([[0.98, 0.01, 0.01], [0.98, 0.01, 0.01]])
    s = membership_scores(p, "modified_entropy", np.array([0, 1]))
    assert s[0] > s[1]  # right and confident: member-like; confidently wrong: not
    e = membership_scores(p, "entropy")
    assert e[0] == e[1]  # the plain entropy cannot tell them apart


def test_label_only_oracle_allows_only_the_gap_attack(overfit) -> None:  # type: ignore[no-untyped-def]
    model, xm, ym, xn, yn = overfit
    oracle = OnnxOracle(model, postprocess=labels_only)
    with pytest.raises(UsageError, match="labels only"):
        membership_inference(oracle, xm[:5], xn[:5])
    res = membership_inference(OnnxOracle(model, postprocess=labels_only), xm, xn, kinds=("gap",),
                               member_labels=ym, non_member_labels=yn)
    assert res.metrics["gap.auc"] > 0.5


def test_threshold_attack_learned_on_one_half_applied_to_the_other(overfit) -> None:  # type: ignore[no-untyped-def]
    model, xm, _, xn, _ = overfit
    oracle = OnnxOracle(model)
    sm, sn = (membership_scores(oracle.query(x), "entropy") for x in (xm, xn))
    attack = ThresholdAttack("entropy").fit(sm[:N // 2], sn[:N // 2])
    acc = (attack.predict(sm[N // 2:]).mean() + (1 - attack.predict(sn[N // 2:]).mean())) / 2
    assert acc > 0.7
    t90 = ThresholdAttack().fit_percentile(sn, 90.0)
    assert np.mean(t90.predict(sn)) == pytest.approx(0.1, abs=0.01)


def test_a_budget_mid_run_scores_the_candidates_answered(overfit) -> None:  # type: ignore[no-untyped-def]
    model, xm, _, xn, _ = overfit
    inner = OnnxOracle(model)
    spent = {"n": 0}

    def capsule_like(x: np.ndarray) -> np.ndarray:
        if spent["n"] + len(x) > 250:  # fewer than the 2N = 400 candidates
            raise BudgetExhaustedError("budget exhausted")
        spent["n"] += len(x)
        return inner.query(x)

    res = membership_inference(CallableOracle(capsule_like), xm, xn, batch_size=100)
    # Batches of 100: the third is refused whole, as a capsule refuses a batch it cannot pay for.
    assert res.stopped == "capsule budget" and res.queries_spent == 200 and len(res.extra["is_member"]) == 200
    assert res.metrics["entropy.auc"] > 0.75
    res = membership_inference(CallableOracle(inner.query, budget=250), xm, xn)
    assert res.stopped == "attack budget" and res.queries_spent == 250
    assert len(res.extra["is_member"]) == 250 and res.metrics["entropy.auc"] > 0.75
