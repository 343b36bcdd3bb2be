"""The second stealing detector (issue 12 item 3): the out-of-distribution rate of a query stream.

It stops what PRADA misses: uniform random queries (the retraining attacks of Tramer et al.) and
natural images from another distribution (Knockoff Nets). The victim's training data is
scikit-learn's digits; with the shared datasets, also MNIST against Fashion-MNIST queries.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from mlcapsule.enclave.defenses import DefensePolicy, DefenseState, OodStats, apply, fit_ood_stats
from mlcapsule.enclave.defenses.ood import OodState, critical_counts, step
from mlcapsule.enclave.defenses.policy import Ood
from mlcapsule.enclave.errors import FormatError

REPO = Path(__file__).resolve().parents[1]
POLICY = DefensePolicy.from_specs(["ood"])  # the default parameters


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, LogisticRegression, OodStats]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    train, held_out = order[:900], order[900:]
    model = LogisticRegression(max_iter=1000).fit(x[train], y[train])
    return x[train], x[held_out], model, fit_ood_stats(x[train], components=20)


def first_alarm(policy: DefensePolicy, model: LogisticRegression, stats_: OodStats, stream: np.ndarray,
                batch: int = 10) -> int | None:
    state = DefenseState.new(policy)
    for i in range(0, len(stream), batch):
        x = stream[i:i + batch]
        result = apply(policy, state, x, model.predict_proba(x).astype(np.float32), ood_stats=stats_)
        if result.alarms:
            return result.alarms[0].query
    return None


def test_uniform_random_queries_are_flagged(digits) -> None:
    _, _, model, stats_ = digits
    stream = np.random.default_rng(3).random((200, 64), dtype=np.float32)
    first = first_alarm(POLICY, model, stats_, stream)
    assert first is not None and first < 10


def test_uniform_random_queries_pass_prada_but_not_the_ood_detector(digits) -> None:
    """PRADA's blind spot: independent uniform queries have roughly normal nearest distances."""
    _, _, model, stats_ = digits
    stream = np.random.default_rng(4).random((600, 64), dtype=np.float32)
    assert first_alarm(DefensePolicy.from_specs(["prada"]), model, stats_, stream) is None
    both = first_alarm(DefensePolicy.from_specs(["prada", "ood"]), model, stats_, stream)
    assert both is not None and both < 10


def test_other_dataset_queries_are_flagged(digits) -> None:
    """Natural-looking queries from another distribution: digits with their pixels shuffled (the same
    pixel statistics, another structure) and inverted digits, standing in for Knockoff's transfer set."""
    _, held_out, model, stats_ = digits
    rng = np.random.default_rng(5)
    shuffled = held_out[:, rng.permutation(64)]
    for other in (shuffled, 1.0 - held_out):
        first = first_alarm(POLICY, model, stats_, other[:300])
        assert first is not None and first < 20


def test_benign_streams_raise_no_ood_alarm(digits) -> None:
    _, held_out, model, stats_ = digits
    for seed in range(10):
        stream = held_out[np.random.default_rng(200 + seed).permutation(len(held_out))]
        assert first_alarm(POLICY, model, stats_, stream) is None, f"benign stream {seed} raised an alarm"


def _shared() -> Path | None:
    root = Path(os.environ.get("MLCAPSULE_SHARED", REPO.parent / "shared")) / "datasets"
    return root if (root / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").exists() else None


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def test_fashion_mnist_queries_against_mnist_statistics_are_flagged() -> None:
    root = _shared()
    if root is None:
        pytest.skip("MNIST/Fashion-MNIST not found: set MLCAPSULE_SHARED to the shared folder")
    mnist = _idx(root / "mnist" / "train-images-idx3-ubyte.gz")[:10000].reshape(-1, 784) / np.float32(255)
    mnist_test = _idx(root / "mnist" / "t10k-images-idx3-ubyte.gz").reshape(-1, 784) / np.float32(255)
    fashion = _idx(root / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").reshape(-1, 784) / np.float32(255)
    stats_ = fit_ood_stats(mnist)
    params = Ood()
    for name, stream, expect in [("fashion", fashion[:300], True), ("uniform", np.random.default_rng(0).random(
            (300, 784), dtype=np.float32), True)] + [(f"mnist {s}", mnist_test[s * 1000:(s + 1) * 1000], False)
                                                   for s in range(10)]:
        state = OodState.new(params)
        scores = stats_.scores(stream)
        flagged = [step(params, stats_, state, q, float(s))[1].flagged for q, s in zip(stream, scores, strict=True)]
        assert any(flagged) == expect, name
        if expect:
            assert flagged.index(True) < 10, name


def test_critical_counts_match_the_binomial_tail() -> None:
    crit = critical_counts(200, 0.01, 1e-6)
    for n in (1, 2, 5, 10, 50, 100, 200):
        h = int(crit[n])
        if h <= n:
            assert stats.binom.sf(h - 1, n, 0.01) <= 1e-6 < stats.binom.sf(h - 2, n, 0.01)
        else:
            assert stats.binom.sf(n - 1, n, 0.01) > 1e-6  # even n hits out of n is not rare enough


def test_ood_stats_and_state_round_trip_and_refuse_damage(digits) -> None:
    train, held_out, _, stats_ = digits
    copy = OodStats.from_bytes(stats_.to_bytes())
    assert np.array_equal(copy.scores(held_out), stats_.scores(held_out))
    params = Ood(window=50)
    state = OodState.new(params)
    for q in np.vstack([held_out[:70], np.ones((5, 64), np.float32)]):
        step(params, stats_, state, q)
    blob = state.to_bytes()
    loaded = OodState.from_bytes(blob, params)
    assert loaded.to_bytes() == blob and loaded.total_hits == state.total_hits and loaded.count == 50
    for bad in (blob[:-1], blob + b"\0", b"MLCX" + blob[4:], stats_.to_bytes()[:100]):
        with pytest.raises(FormatError):
            OodState.from_bytes(bad, params)
    with pytest.raises(FormatError):
        OodState.from_bytes(blob, Ood(window=40))
    with pytest.raises(FormatError):
        OodStats.from_bytes(stats_.to_bytes()[:-8])
