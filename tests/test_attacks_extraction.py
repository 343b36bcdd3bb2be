"""Retraining attacks against the demo's digits classifier (a scikit-learn MLP, 97.8 % accurate).

The attacker holds 30 natural digits (3 per class) for JbDA's seed; fidelity is measured on
225 other held-out digits and on 1,000 uniform inputs. Figures at 480 queries (seeds fixed, one
torch thread; measured when the test was written):

* uniform queries, labels only (Tramèr's uniform retraining, the label-only baseline): ~0.24;
* uniform queries with posteriors: ~0.33;
* Knockoff Nets (2,000 Fashion-MNIST images turned into 8x8 digits format, posteriors): ~0.64;
* JbDA (30 seeds, 4 rounds, λ = 4 of 16): ~0.74 after the seeds alone, ~0.80 after 480 queries.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mlcapsule.attacks import FidelityEvaluator, OnnxOracle, jbda, knockoff, uniform_retraining
from mlcapsule.attacks.data import load_idx_dataset, to_digits_format

SHARED = Path(os.environ.get("MLCAPSULE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
BUDGET = 480


@pytest.fixture(scope="module")
def victim():  # type: ignore[no-untyped-def]
    from mlcapsule.demo.models import digits_classifier

    model, info = digits_classifier()
    x, y = info["x_test"], info["y_test"]
    half = len(x) // 2
    seeds = np.concatenate([np.flatnonzero(y[:half] == c)[:3] for c in range(10)])
    ev = FidelityEvaluator(OnnxOracle(model), x[half:], FidelityEvaluator.uniform_inputs(1000, (64,), 0, 16),
                           y_heldout=y[half:])
    return model, x[seeds], ev


@pytest.fixture(scope="module")
def baseline(victim):  # type: ignore[no-untyped-def]
    model, _, ev = victim
    return uniform_retraining(OnnxOracle(model), (64,), low=0.0, high=16.0, queries=BUDGET, n_classes=10,
                              evaluator=ev)


def test_uniform_label_only_retraining_is_a_weak_baseline(baseline) -> None:  # type: ignore[no-untyped-def]
    assert baseline.queries_spent == BUDGET and baseline.stopped == "done"
    assert baseline.metrics["fidelity"] < 0.5
    assert baseline.metrics["victim_accuracy"] > 0.95


def test_jbda_beats_the_label_only_baseline_and_its_own_seed(victim, baseline) -> None:  # type: ignore[no-untyped-def]
    model, seed_x, ev = victim
    oracle = OnnxOracle(model)
    res = jbda(oracle, seed_x, n_classes=10, rounds=4, lam=4.0, low=0.0, high=16.0, evaluator=ev)
    queries, fid = res.trace.series("fidelity")
    assert queries == [30, 60, 120, 240, 480] and res.queries_spent == oracle.queries_spent == BUDGET
    assert res.metrics["fidelity"] > baseline.metrics["fidelity"] + 0.3
    assert fid[-1] > fid[0]  # the augmentation adds fidelity beyond the 30 labelled seeds
    # The synthetic points stay in the input domain.
    assert res.extra["queried_x"].min() >= 0.0 and res.extra["queried_x"].max() <= 16.0


def test_knockoff_with_fashion_mnist_beats_the_label_only_baseline(victim, baseline) -> None:  # type: ignore[no-untyped-def]
    if not (SHARED / "datasets" / "fashion-mnist").is_dir():
        pytest.skip(f"Fashion-MNIST not found under {SHARED}/datasets (set MLCAPSULE_SHARED)")
    model, _, ev = victim
    images, _ = load_idx_dataset("fashion-mnist", "test", root=SHARED / "datasets", limit=2000)
    pool = to_digits_format(images)
    assert pool.shape == (2000, 64) and pool.min() >= 0 and pool.max() <= 16
    res = knockoff(OnnxOracle(model), pool, queries=BUDGET, checkpoints=[120, 240], evaluator=ev)
    queries, fid = res.trace.series("fidelity")
    assert queries == [120, 240, 480] and res.queries_spent == BUDGET
    assert res.metrics["fidelity"] > baseline.metrics["fidelity"] + 0.2
    assert fid[-1] > fid[0]


def test_retraining_stops_at_the_attack_budget_and_still_trains(victim) -> None:  # type: ignore[no-untyped-def]
    model, seed_x, ev = victim
    oracle = OnnxOracle(model, budget=100)
    res = jbda(oracle, seed_x, n_classes=10, rounds=4, lam=4.0, low=0.0, high=16.0, evaluator=ev)
    assert res.stopped == "attack budget" and res.queries_spent == 100
    assert res.trace.points[-1].queries == 100 and res.model is not None  # trained on all 100 answers
