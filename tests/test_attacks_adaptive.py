"""The adaptive attacker's Algorithm-1 inverter (`mlcapsule.attacks.invert_mi_noise`): given the
defended answers P' = (1 - c*alpha(P)) P + c*alpha(P) T and the policy's c and T, it recovers P.

Random posteriors (Dirichlet, fixed seeds), c from 0.1 to 1, uniform T unless said otherwise;
numpy only, about a second. Measured when the test was written (400 rows, 10 classes,
Dirichlet(1)): P recovered within 1e-3 for 100 % of the rows up to c = 0.5, 99 % at c = 0.8 and
97 % at c = 1; peaked posteriors (Dirichlet(0.1)) often have several consistent readings at large
c, and the most confident one is the true one for more than 99 % of them."""

from __future__ import annotations

import numpy as np
import pytest

from mlcapsule.attacks import invert_mi_noise
from mlcapsule.attacks.adaptive import mi_noise_alpha
from mlcapsule.enclave.defenses.outputs import mi_noise
from mlcapsule.errors import UsageError

C_VALUES = (0.1, 0.3, 0.5, 0.8, 1.0)


@pytest.mark.parametrize("c", C_VALUES)
def test_the_inverter_recovers_p_from_p_prime(c: float) -> None:
    p = np.random.default_rng(0).dirichlet(np.ones(10), 400)
    answers = mi_noise(p, c)
    inv = invert_mi_noise(answers, c)
    rec = inv.recovered(p)
    assert rec.mean() >= (0.999 if c <= 0.5 else 0.95), (c, rec.mean())
    # Every unique reading is the true posterior, and its weight is Algorithm 1's c * alpha(P).
    assert inv.unique.mean() > 0.9 and rec[inv.unique].all()
    u = inv.unique
    assert np.allclose(inv.weight[u], c * mi_noise_alpha(p[u]), atol=1e-3)
    # Whatever reading is chosen, Algorithm 1 maps it back onto the answer.
    found = inv.roots > 0
    assert np.abs(mi_noise(inv.posteriors[found], c) - answers[found]).max() < 1e-6


@pytest.mark.parametrize("c", C_VALUES)
def test_peaked_posteriors_are_ambiguous_but_the_confident_reading_is_right(c: float) -> None:
    p = np.random.default_rng(1).dirichlet(np.full(10, 0.1), 400)  # the confident answers of an overfit model
    inv = invert_mi_noise(mi_noise(p, c), c)
    assert inv.recovered(p).mean() > 0.99, (c, inv.recovered(p).mean())
    if c >= 0.5:
        assert inv.unique.mean() < 0.5  # several posteriors fit most answers: the choice matters
        smallest = invert_mi_noise(mi_noise(p, c), c, choose="smallest")
        assert smallest.recovered(p).mean() < inv.recovered(p).mean()


def test_few_classes_leave_real_ambiguity() -> None:
    p = np.random.default_rng(2).dirichlet(np.ones(3), 400)
    inv = invert_mi_noise(mi_noise(p, 1.0), 1.0)
    rec = inv.recovered(p)
    assert 0.5 < rec.mean() < 0.9  # with 3 classes at c = 1 a third or so of the answers are not recovered
    assert rec[inv.unique].all()


def test_c_zero_is_the_identity_and_bad_input_is_refused() -> None:
    p = np.random.default_rng(3).dirichlet(np.ones(5), 50)
    inv = invert_mi_noise(p, 0.0)
    assert np.allclose(inv.posteriors, p) and inv.unique.all()
    with pytest.raises(UsageError):
        invert_mi_noise(p, 1.5)
    with pytest.raises(UsageError):
        invert_mi_noise(p[:, :1], 0.5)
    with pytest.raises(UsageError):
        invert_mi_noise(p, 0.5, np.ones(4) / 4)
    with pytest.raises(UsageError):
        invert_mi_noise(p, 0.5, choose="median")


def test_the_inverter_takes_a_non_uniform_prior() -> None:
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(4), 200)
    t = np.array([0.1, 0.2, 0.3, 0.4])
    inv = invert_mi_noise(mi_noise(p, 0.5, t), 0.5, t)
    assert inv.recovered(p).mean() > 0.8
