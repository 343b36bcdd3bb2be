"""The defense pipeline (issue 12 items 2, 3 and 6): actions on an alarm, lock and unlock, sealed state."""

from __future__ import annotations

import numpy as np
import pytest

from mlcapsule.enclave.defenses import (
    Alarm,
    DefenseError,
    DefenseLockedError,
    DefensePolicy,
    DefenseSpecError,
    DefenseState,
    apply,
    fit_ood_stats,
    precheck,
    tighten,
    unlock,
)
from mlcapsule.enclave.errors import FormatError, RollbackError

RNG = np.random.default_rng(0)
X = RNG.random((8, 5), dtype=np.float32)
P = (lambda e: (e / e.sum(axis=1, keepdims=True)).astype(np.float32))(np.exp(RNG.normal(size=(8, 4)) * 2))
BENIGN, PROBE = np.zeros(8), np.ones(8)


def kennen(action: str, *more: str) -> DefensePolicy:
    return DefensePolicy.from_specs([f"kennen:threshold=0.5,action={action}", *more])


def test_record_answers_and_raises_one_alarm_per_episode() -> None:
    policy = kennen("record", "round:2")
    state = DefenseState.new(policy)
    r = apply(policy, state, X, P, kennen_scores=BENIGN)
    assert r.alarms == [] and r.refusal is None and np.array_equal(r.answer, np.round(P, 2))
    scores = np.array([0, 0, 0.9, 0.8, 0, 0.7, 0.6, 0.55])
    r = apply(policy, r.state, X, P, kennen_scores=scores)
    assert r.refusal is None and np.array_equal(r.answer, np.round(P, 2))
    assert r.alarms == [Alarm("kennen", 10, 0.9, 0.5, "record")]  # one per detector per batch
    assert r.state.flagged_queries["kennen"] == 5 and r.state.alarms["kennen"] == 1 and r.state.queries == 16
    assert r.alarms[0].to_dict() == {"detector": "kennen", "query": 10, "statistic": 0.9, "threshold": 0.5,
                                     "action": "record"}
    assert Alarm.from_dict(r.alarms[0].to_dict()) == r.alarms[0]
    # still flagged at the start of the next batch: no new alarm until it clears
    r = apply(policy, r.state, X[:1], P[:1], kennen_scores=[0.9])
    assert r.alarms == []
    r = apply(policy, r.state, X[:2], P[:2], kennen_scores=[0.1, 0.95])
    assert [a.query for a in r.alarms] == [18]


def test_degrade_answers_labels_only_from_then_on() -> None:
    policy = kennen("degrade", "mi-noise:c=0.5")
    state = DefenseState.new(policy)
    r = apply(policy, state, X, P, kennen_scores=BENIGN)
    assert not np.array_equal(r.answer, np.eye(4, dtype=np.float32)[P.argmax(axis=1)])
    r = apply(policy, r.state, X, P, kennen_scores=PROBE)
    labels = np.eye(4, dtype=np.float32)[P.argmax(axis=1)]
    assert r.refusal is None and np.array_equal(r.answer, labels) and r.alarms[0].action == "degrade"
    state = DefenseState.from_bytes(r.state.to_bytes(), policy)  # sticky across a restart
    r = apply(policy, state, X, P, kennen_scores=BENIGN)
    assert np.array_equal(r.answer, labels) and r.state.degraded


def test_refuse_refuses_while_flagged_and_charges_the_query() -> None:
    policy = kennen("refuse")
    state = DefenseState.new(policy)
    scores = BENIGN.copy()
    scores[5] = 0.99
    r = apply(policy, state, X, P, kennen_scores=scores)
    assert r.answer is None and isinstance(r.refusal, DefenseError) and not isinstance(r.refusal, DefenseLockedError)
    assert r.refusal.exit_code == 12 and "kennen" in str(r.refusal)
    assert r.state.refused == 8 and r.state.queries == 8 and len(r.alarms) == 1  # the alarm is kept for receipts
    with pytest.raises(DefenseError):
        r.raise_if_refused()
    r = apply(policy, r.state, X, P, kennen_scores=BENIGN)  # not sticky
    assert r.refusal is None and np.array_equal(r.raise_if_refused(), P)


def test_a_lock_lifts_only_with_the_next_unlock_voucher_and_a_replay_is_refused() -> None:
    policy = kennen("lock")
    state = DefenseState.new(policy)
    r = apply(policy, state, X, P, kennen_scores=PROBE)
    assert isinstance(r.refusal, DefenseLockedError) and r.alarms[0].action == "lock" and r.state.locked
    assert "unlock voucher" in r.refusal.hint
    state = DefenseState.from_bytes(r.state.to_bytes(), policy)  # sealed and reloaded: still locked
    assert isinstance(precheck(policy, state), DefenseLockedError)
    r = apply(policy, state, X, P, kennen_scores=BENIGN)
    assert isinstance(r.refusal, DefenseLockedError) and r.alarms == [] and r.state.refused == 16
    with pytest.raises(RollbackError, match="out of order"):
        unlock(r.state, 2)
    state = unlock(r.state, 1)
    assert not state.locked and state.unlock_seq == 1 and precheck(policy, state) is None
    r = apply(policy, state, X, P, kennen_scores=BENIGN)
    assert r.refusal is None and np.array_equal(r.answer, P)
    r = apply(policy, r.state, X, P, kennen_scores=PROBE)  # the next attack locks again
    assert r.state.locked
    with pytest.raises(RollbackError, match="already applied"):
        unlock(r.state, 1)  # the replayed voucher
    assert r.state.locked
    assert not unlock(r.state, 2).locked


def test_lock_beats_refuse_and_detectors_still_count_refused_queries() -> None:
    policy = DefensePolicy.from_specs(["kennen:threshold=0.5,action=refuse", "prada:action=lock"])
    state = DefenseState.new(policy)
    r = apply(policy, state, X, P, kennen_scores=PROBE)
    assert isinstance(r.refusal, DefenseError) and r.state.prada is not None and r.state.prada.queries == 8


def test_unlock_can_reset_the_detectors() -> None:
    policy = DefensePolicy.from_specs(["prada:action=lock"])
    state = DefenseState.new(policy)
    r = apply(policy, state, X, P)
    assert r.state.prada is not None and r.state.prada.stored > 0
    state = unlock(r.state, 1, reset_detectors=True)
    assert state.prada is not None and state.prada.stored == 0 and state.prada.d_count == 0


def test_state_round_trips_with_every_detector_and_refuses_damage() -> None:
    x_train = np.random.default_rng(1).random((300, 5), dtype=np.float32)
    stats_ = fit_ood_stats(x_train, components=3)
    policy = DefensePolicy.from_specs(["kennen", "prada", "ood:window=20", "top-k:2"])
    state = DefenseState.new(policy)
    rng = np.random.default_rng(2)
    for _ in range(20):
        x = rng.random((8, 5), dtype=np.float32)
        state = apply(policy, state, x, P, kennen_scores=BENIGN, ood_stats=stats_).state
    blob = state.to_bytes()
    loaded = DefenseState.from_bytes(blob, policy)
    assert loaded.to_bytes() == blob and loaded.summary() == state.summary()
    a = apply(policy, state, X, P, kennen_scores=BENIGN, ood_stats=stats_)
    b = apply(policy, loaded, X, P, kennen_scores=BENIGN, ood_stats=stats_)
    assert np.array_equal(a.answer, b.answer) and a.alarms == b.alarms and a.state.to_bytes() == b.state.to_bytes()
    for cut in range(0, len(blob), max(1, len(blob) // 50)):
        with pytest.raises(FormatError):
            DefenseState.from_bytes(blob[:cut], policy)
    with pytest.raises(FormatError, match="policy has no PRADA"):
        DefenseState.from_bytes(blob, DefensePolicy.from_specs(["kennen", "ood:window=20"]))
    forged = blob.replace(b'"queries":', b'"queries":-', 1)
    with pytest.raises(FormatError):
        DefenseState.from_bytes(forged, policy)


def test_a_grant_that_adds_a_detector_starts_its_state_and_keeps_the_rest() -> None:
    base = kennen("record")
    state = apply(base, DefenseState.new(base), X, P, kennen_scores=PROBE).state
    granted = tighten(base, ["prada:delta=0.95"])
    loaded = DefenseState.from_bytes(state.to_bytes(), granted)
    assert loaded.prada is not None and loaded.alarms["kennen"] == 1 and loaded.flagged["kennen"]


def test_missing_inputs_for_a_detector_are_an_error_not_a_silent_pass() -> None:
    with pytest.raises(DefenseSpecError, match="no kennen scores"):
        apply(kennen("record"), DefenseState(), X, P)
    with pytest.raises(DefenseSpecError, match="no ood statistics"):
        apply(DefensePolicy.from_specs(["ood"]), DefenseState(), X, P)
    with pytest.raises(DefenseSpecError, match="inputs for"):
        apply(DefensePolicy.from_specs(["prada"]), DefenseState(), X[:3], P)


def test_refusals_carry_no_model_output() -> None:
    """The host never receives an undefended output, not even in an error message."""
    policy = kennen("refuse")
    r = apply(policy, DefenseState.new(policy), X, P, kennen_scores=PROBE)
    assert r.answer is None and r.refusal is not None
    text = r.refusal.diagnostics() + repr(r.alarms)
    for value in P.ravel():
        assert f"{value:.4f}" not in text


def test_empty_batches_and_image_shaped_inputs() -> None:
    policy = DefensePolicy.from_specs(["prada", "kennen", "mi-noise:c=0.5", "top-k:2"])
    state = DefenseState.new(policy)
    r = apply(policy, state, np.zeros((0, 1, 2, 2), np.float32), np.zeros((0, 4), np.float32),
              kennen_scores=np.zeros(0))
    assert r.answer is not None and r.answer.shape == (0, 4) and r.alarms == [] and r.state.queries == 0
    r = apply(policy, r.state, X[:, :4].reshape(8, 1, 2, 2), P, kennen_scores=BENIGN)
    assert r.answer is not None and r.answer.shape == (8, 4) and r.state.prada is not None
    assert r.state.prada.dim == 4
