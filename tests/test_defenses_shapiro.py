"""Shapiro-Wilk W (AS R94) in numpy, against scipy.stats.shapiro (issue 12: PRADA's test)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats

from mlcapsule.enclave.defenses.shapiro import coefficients, ppnd, shapiro_w


def _samples() -> list[np.ndarray]:
    rng = np.random.default_rng(12)
    makers = [
        lambda n: rng.normal(size=n),
        lambda n: rng.exponential(size=n),
        lambda n: rng.uniform(size=n),
        lambda n: rng.standard_t(2, size=n),
        lambda n: rng.lognormal(sigma=1.5, size=n),
        lambda n: rng.normal(size=n) * 1e-3 + 1e3,  # far from 0: the median shift matters
        lambda n: np.round(rng.normal(size=n), 1),  # ties
        lambda n: np.concatenate([rng.normal(size=n - n // 3), rng.normal(5, 0.1, size=n // 3)]),
    ]
    sizes = [3, 4, 5, 6, 7, 11, 12, 20, 50, 100, 101, 257, 1000, 2999, 5000]
    return [make(n) for n in sizes for make in makers] + [make(int(rng.integers(3, 5001))) for make in makers * 10]


def test_shapiro_w_matches_scipy_on_many_samples() -> None:
    worst = 0.0
    for x in _samples():
        ours, theirs = shapiro_w(x), float(stats.shapiro(x).statistic)
        worst = max(worst, abs(ours - theirs))
    assert worst < 1e-6, worst


@settings(max_examples=200)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=3, max_size=300))
def test_shapiro_w_matches_scipy_on_any_sample(values: list[float]) -> None:
    x = np.array(values)
    if np.ptp(x) <= 1e-9 * max(1.0, np.abs(x).max()):
        assert shapiro_w(x) == 1.0  # zero range: scipy warns and returns 1 too
        return
    assert shapiro_w(x) == pytest.approx(float(stats.shapiro(x).statistic), abs=1e-6)


def test_shapiro_w_is_affine_invariant_and_in_range() -> None:
    x = np.random.default_rng(1).exponential(size=500)
    w = shapiro_w(x)
    assert 0.0 < w <= 1.0
    assert shapiro_w(3.0 * x - 7.0) == pytest.approx(w, abs=1e-12)
    assert shapiro_w(np.sort(x), presorted=True) == pytest.approx(w, abs=1e-15)


def test_shapiro_w_refuses_sizes_outside_3_to_5000() -> None:
    with pytest.raises(ValueError):
        shapiro_w([1.0, 2.0])
    with pytest.raises(ValueError):
        shapiro_w(np.arange(5001.0))


def test_coefficients_are_antisymmetric_unit_and_ppnd_is_the_normal_quantile() -> None:
    for n in (3, 4, 5, 6, 10, 11, 1000, 5000):
        a = coefficients(n)
        assert a.shape == (n,) and np.allclose(a, -a[::-1]) and np.all(np.diff(a) >= 0)
        assert float(np.dot(a, a)) == pytest.approx(1.0, abs=1e-3)
    p = np.linspace(1e-4, 1 - 1e-4, 2001)  # AS R94 needs p >= (1 - 0.375)/(5000 + 0.25)
    assert np.abs(ppnd(p) - stats.norm.ppf(p)).max() < 1e-6
