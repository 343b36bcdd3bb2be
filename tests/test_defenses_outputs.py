"""Output transforms against membership inference (issue 12 item 4): Algorithm 1, top-k, round, label-only."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from mlcapsule.enclave.defenses import DefensePolicy, DefenseSpecError, transform
from mlcapsule.enclave.defenses.outputs import alpha, as_distribution, mi_noise, one_hot, round_to, top_k

logit_rows = hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(2, 40)),
                        elements=st.floats(-30, 30, allow_nan=False))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _entropy(p: np.ndarray) -> np.ndarray:
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0), axis=1)


@settings(max_examples=300)
@given(logit_rows, st.floats(0, 1), st.booleans())
def test_algorithm1_output_is_a_distribution(z: np.ndarray, c: float, with_prior: bool) -> None:
    p = _softmax(z)
    prior = _softmax(z[:1])[0] if with_prior else None
    out = mi_noise(p, c, prior)
    assert out.shape == p.shape
    assert (out >= -1e-12).all()
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-9)


@settings(max_examples=200)
@given(logit_rows)
def test_algorithm1_with_c_0_is_the_identity(z: np.ndarray) -> None:
    p = _softmax(z)
    assert np.array_equal(mi_noise(p, 0.0), p)


@settings(max_examples=300)
@given(logit_rows, st.floats(0.01, 1))
def test_algorithm1_more_entropy_means_less_noise(z: np.ndarray, c: float) -> None:
    p = _softmax(z)
    a = alpha(p)
    h = _entropy(p)
    assert np.allclose(a, 1.0 - h / math.log(p.shape[1]), atol=1e-9)  # the paper's alpha
    order = np.argsort(h)
    assert np.all(np.diff(a[order]) <= 1e-9)  # more entropy, smaller alpha
    # the noise is exactly c*alpha*(T - P): its weight shrinks as the entropy grows
    out = mi_noise(p, c)
    t = np.full(p.shape[1], 1.0 / p.shape[1])
    assert np.allclose(out - p, (c * a)[:, None] * (t - p), atol=1e-12)
    # along the path from one-hot to uniform, the entropy rises and alpha falls
    onehot, uniform = np.eye(p.shape[1])[:1], np.full((1, p.shape[1]), 1.0 / p.shape[1])
    path = np.vstack([(1 - s) * onehot + s * uniform for s in np.linspace(0, 1, 11)])
    assert np.all(np.diff(alpha(path)) <= 1e-12) and alpha(path)[0] == 1.0 and alpha(path)[-1] == pytest.approx(0.0)


@settings(max_examples=200)
@given(logit_rows, st.floats(0, 1))
def test_algorithm1_with_uniform_prior_keeps_the_argmax(z: np.ndarray, c: float) -> None:
    p = _softmax(z)
    out = mi_noise(p, c)
    top = p.max(axis=1)
    clear = (np.sort(p, axis=1)[:, -2] < top - 1e-9)  # no tie at the top
    assert np.array_equal(np.argmax(out, axis=1)[clear], np.argmax(p, axis=1)[clear])


def test_algorithm1_with_a_skewed_prior_can_change_the_argmax() -> None:
    """The documented accuracy cost: a non-uniform T can flip a confident-enough answer."""
    p = np.array([[0.6, 0.4, 0.0]])
    out = mi_noise(p, 1.0, prior=[0.0, 0.0, 1.0])
    assert np.argmax(out) == 2


def test_single_and_batched_posteriors_agree() -> None:
    p = _softmax(np.random.default_rng(3).normal(size=(50, 10)) * 4)
    batched = mi_noise(p, 0.7)
    single = np.vstack([mi_noise(p[i:i + 1], 0.7) for i in range(50)])
    assert np.allclose(batched, single, atol=1e-14)


def test_top_k_keeps_the_k_largest_renormalised() -> None:
    p = np.array([[0.1, 0.5, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]])
    out = top_k(p, 2)
    assert np.allclose(out[0], [0, 0.5 / 0.7, 0.2 / 0.7, 0])  # tie between 2 and 3: the lower index
    assert np.allclose(out[1], [0.5, 0.5, 0, 0])
    assert np.array_equal(top_k(p, 4), p)
    with pytest.raises(DefenseSpecError):
        top_k(p, 0)


def test_round_and_label_only() -> None:
    p = np.array([[0.123456, 0.876544]])
    assert np.array_equal(round_to(p, 2), [[0.12, 0.88]])
    assert np.array_equal(one_hot(p), [[0.0, 1.0]])


def test_transforms_compose_in_the_documented_order() -> None:
    p = _softmax(np.random.default_rng(5).normal(size=(20, 10)) * 3).astype(np.float32)
    policy = DefensePolicy.from_specs(["round:3", "top-k:3", "mi-noise:c=0.5"])
    expected = round_to(top_k(mi_noise(as_distribution(p), 0.5), 3), 3).astype(np.float32)
    out = transform(policy, p)
    assert out.dtype == np.float32 and np.array_equal(out, expected)
    assert ((out > 0).sum(axis=1) <= 3).all()
    # label-only overrides the rest and uses the model's own argmax
    labels = transform(DefensePolicy.from_specs(["mi-noise:c=1,prior=0.91/0.01/0.01/0.01/0.01/0.01/0.01/0.01/0.01/0.01",
                                                 "label-only"]), p)
    assert np.array_equal(labels, np.eye(10, dtype=np.float32)[np.argmax(p, axis=1)])
    # degrade forces labels only
    assert np.array_equal(transform(policy, p, labels_only=True), labels)
    # no output defense: the outputs as they are
    assert np.array_equal(transform(DefensePolicy(), p), p)


def test_logits_are_refused_without_leaking_values() -> None:
    logits = np.array([[3.14159, -2.71828]], dtype=np.float32)
    with pytest.raises(DefenseSpecError) as err:
        transform(DefensePolicy.from_specs(["mi-noise:c=0.5"]), logits)
    assert "3.14" not in str(err.value) and "2.71" not in str(err.value) and "softmax" in err.value.hint
    # rounding and label-only work on any scores
    assert np.array_equal(transform(DefensePolicy.from_specs(["round:1"]), logits), np.round(logits, 1))
