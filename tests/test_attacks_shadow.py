"""Shokri et al.'s shadow-model membership inference against the overfit victim of
tests/test_attacks_membership.py (a scikit-learn MLP, 128 hidden units, no regularisation,
trained on 200 noisy digits: 100 % accurate on them, about 53 % on fresh data).

The attacker holds the other 1,397 noisy digits (disjoint from the 200 members and 200
non-members) and trains 4 shadows on 200 + 200 of them each. Figures (seeds fixed; measured
when the test was written): per-class attack models with scikit-learn shadows (Shokri's "same
platform"): AUC 0.92 and TPR 0.15 at 1 % FPR, against 0.90 and 0.02 for the entropy threshold;
one attack model on the sorted top-3 log-posteriors with the default torch shadows: AUC 0.92,
TPR 0.10.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from mlcapsule.attacks import (
    OnnxOracle,
    fit_shadow_attack,
    labels_only,
    shadow_membership,
    shadow_model_attack,
    train_shadow_models,
)
from mlcapsule.errors import UsageError
from mlcapsule.export import sklearn_to_onnx

N = 200


def _mlp(x: np.ndarray, y: np.ndarray, seed: int) -> MLPClassifier:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return MLPClassifier(hidden_layer_sizes=(128,), alpha=0.0, max_iter=1000, random_state=seed).fit(x, y)


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0 + 0.5 * np.random.default_rng(1).standard_normal(x.shape)).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    members, non_members, attacker = order[:N], order[N:2 * N], order[2 * N:]
    model = sklearn_to_onnx(_mlp(x[members], y[members], 0), 64, probabilities_only=True)
    return model, (x[members], y[members]), (x[non_members], y[non_members]), (x[attacker], y[attacker])


@pytest.fixture(scope="module")
def per_class(setup):  # type: ignore[no-untyped-def]
    model, (xm, ym), (xn, yn), (xa, ya) = setup
    oracle = OnnxOracle(model)
    res = shadow_model_attack(oracle, xa, ya, xm, xn, k=4, train_size=N, trainer=_mlp, mode="per_class",
                              member_labels=ym, non_member_labels=yn)
    return oracle, res


def test_shadow_models_on_an_overfit_model(per_class) -> None:  # type: ignore[no-untyped-def]
    oracle, res = per_class
    m = res.metrics
    assert res.queries_spent == oracle.queries_spent == 2 * N and res.stopped == "done"
    assert m["shadow.auc"] > 0.85, m
    assert m["shadow.best_auc"] == max(m["shadow.auc"], 1 - m["shadow.auc"])
    assert m["shadow.tpr_at_1pct_fpr"] > m["entropy.tpr_at_1pct_fpr"]  # the learned attack is better at low FPR
    shadows = res.extra["shadows"]
    assert len(shadows) == 4 and all(s.train_accuracy == 1.0 and s.test_accuracy < 0.7 for s in shadows)
    assert len(res.extra["attack"].per_class) == 10  # one attack model per class


def test_sorted_log_posteriors_with_the_default_torch_shadows(setup) -> None:  # type: ignore[no-untyped-def]
    model, (xm, ym), (xn, yn), (xa, ya) = setup
    shadows = train_shadow_models(xa, ya, k=3, train_size=N, seed=1)
    attack = fit_shadow_attack(shadows, xa, ya, mode="sorted", log=True)
    assert attack.training["auc"] > 0.8 and not attack.per_class
    res = shadow_membership(OnnxOracle(model), attack, xm, xn)  # no labels needed in this mode
    assert res.metrics["shadow.auc"] > 0.85, res.metrics


def test_budget_and_label_only_answers(setup, per_class) -> None:  # type: ignore[no-untyped-def]
    model, (xm, ym), (xn, yn), _ = setup
    attack = per_class[1].extra["attack"]
    res = shadow_membership(OnnxOracle(model, budget=250), attack, xm, xn, member_labels=ym, non_member_labels=yn)
    assert res.stopped == "attack budget" and res.queries_spent == 250 and len(res.extra["is_member"]) == 250
    assert res.metrics["shadow.auc"] > 0.8
    with pytest.raises(UsageError, match="labels only"):
        shadow_membership(OnnxOracle(model, postprocess=labels_only), attack, xm[:5], xn[:5])
