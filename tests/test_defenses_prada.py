"""PRADA against model stealing (issue 12 item 3), named after the attacks it stops.

The victim is a logistic regression on scikit-learn's digits (64 features scaled to [0, 1]);
MNIST from the shared datasets folder (``$MLCAPSULE_SHARED`` or ``../shared`` next to the repo)
adds benign streams at 784 features when it is there.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from mlcapsule.enclave.defenses import DefensePolicy, DefenseState, apply
from mlcapsule.enclave.defenses.policy import Prada
from mlcapsule.enclave.defenses.prada import PradaState, step
from mlcapsule.enclave.errors import FormatError

REPO = Path(__file__).resolve().parents[1]


def shared_datasets() -> Path | None:
    root = Path(os.environ.get("MLCAPSULE_SHARED", REPO.parent / "shared")) / "datasets"
    return root if (root / "mnist" / "t10k-images-idx3-ubyte.gz").exists() else None


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, LogisticRegression]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    train, held_out = order[:900], order[900:]
    model = LogisticRegression(max_iter=1000).fit(x[train], y[train])
    return x[train], y[train], x[held_out], model


def posteriors(model: LogisticRegression, x: np.ndarray) -> np.ndarray:
    return model.predict_proba(x).astype(np.float32)


def run_stream(policy: DefensePolicy, model: LogisticRegression, stream: np.ndarray, batch: int = 1) -> list:
    state = DefenseState.new(policy)
    alarms = []
    for i in range(0, len(stream), batch):
        result = apply(policy, state, stream[i:i + batch], posteriors(model, stream[i:i + batch]))
        state = result.state
        alarms.extend(result.alarms)
    return alarms


def jbda_stream(seeds: np.ndarray, model: LogisticRegression, *, queries: int, lam: float = 0.1,
                seed: int = 0) -> np.ndarray:
    """Papernot et al.'s Jacobian-based dataset augmentation, as the victim sees it.

    Each round trains a substitute (a logistic regression) on the set so far, labelled by the
    victim, and queries x + lam * sign(d substitute_label(x) / dx) for every x in the set: the set
    doubles each round, each new query a small step from an earlier one.
    """
    rng = np.random.default_rng(seed)
    current = seeds.copy()
    stream = [*current]
    while len(stream) < queries:
        labels = model.predict(current)
        if len(set(labels)) > 1:
            sub = LogisticRegression(max_iter=300).fit(current, labels)
            coef = sub.coef_ if sub.coef_.shape[0] > 1 else np.vstack([-sub.coef_[0], sub.coef_[0]])
            grad = coef[np.searchsorted(sub.classes_, labels)]
        else:
            grad = rng.normal(size=current.shape)
        new = np.clip(current + lam * np.sign(grad), 0.0, 1.0).astype(np.float32)
        stream.extend(new)
        current = np.vstack([current, new])
    return np.asarray(stream[:queries], dtype=np.float32)


def test_jbda_stream_is_flagged_by_prada(digits) -> None:
    _, _, held_out, model = digits
    policy = DefensePolicy.from_specs(["prada"])
    for seed in range(3):
        seeds = held_out[np.random.default_rng(seed).choice(len(held_out), 10, replace=False)]
        alarms = run_stream(policy, model, jbda_stream(seeds, model, queries=300, seed=seed))
        assert alarms, f"JbDA stream {seed} was not flagged within 300 queries"
        first = alarms[0]
        assert first.detector == "prada" and first.query < 300 and first.statistic < first.threshold == 0.9


def test_jbda_is_flagged_in_batches_too(digits) -> None:
    _, _, held_out, model = digits
    seeds = held_out[:10]
    alarms = run_stream(DefensePolicy.from_specs(["prada"]), model, jbda_stream(seeds, model, queries=300), batch=32)
    assert alarms and alarms[0].query < 300


def test_benign_streams_raise_no_alarm(digits) -> None:
    _, _, held_out, model = digits
    policy = DefensePolicy.from_specs(["prada"])  # the default parameters
    for seed in range(10):
        stream = held_out[np.random.default_rng(100 + seed).permutation(len(held_out))[:600]]
        assert run_stream(policy, model, stream, batch=16) == [], f"benign digits stream {seed} raised an alarm"


def test_benign_mnist_streams_raise_no_alarm() -> None:
    root = shared_datasets()
    if root is None:
        pytest.skip("MNIST not found: set MLCAPSULE_SHARED to the shared folder (digits streams ran above)")
    train = read_idx(root / "mnist" / "train-images-idx3-ubyte.gz")[:20000].reshape(-1, 784) / np.float32(255)
    labels = read_idx(root / "mnist" / "train-labels-idx1-ubyte.gz")[:20000]
    test = read_idx(root / "mnist" / "t10k-images-idx3-ubyte.gz").reshape(-1, 784) / np.float32(255)
    centroids = np.stack([train[labels == k].mean(axis=0) for k in range(10)])
    policy = DefensePolicy.from_specs(["prada"])
    for s in range(10):
        x = test[s * 600:(s + 1) * 600]
        d = ((x[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
        probs = np.exp(-(d - d.min(axis=1, keepdims=True)))
        probs = (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
        state = DefenseState.new(policy)
        for i in range(0, 600, 50):
            result = apply(policy, state, x[i:i + 50], probs[i:i + 50])
            assert result.alarms == [], f"benign MNIST stream {s} raised an alarm"


def test_the_growing_set_rule() -> None:
    """Far queries join their class's set; a query close to a stored one only adds its distance."""
    params = Prada()
    state = PradaState.new(params)
    base = np.zeros(4, np.float32)
    _, v = step(params, state, base, 1)
    assert v.stored and state.d_count == 0  # the first of a class: stored, no distance
    for k in (1, 2, 3):
        _, v = step(params, state, base + [5 * k, 0, 0, 0], 1)  # each 5 from the previous
        assert v.stored and state.d_values[k - 1] == 5.0
    gdists = [0, 5, 5, 5]
    assert state.classes[1].threshold == pytest.approx(np.mean(gdists) - np.std(gdists))  # T = mean - std
    _, v = step(params, state, base + [15.5, 0, 0, 0], 1)  # 0.5 < T: not stored, its distance counted
    assert not v.stored and state.d_count == 4 and state.d_values[3] == pytest.approx(0.5)
    assert state.classes[1].n == 4
    _, v = step(params, state, base + [15.5, 0, 0, 0], 2)  # another class has its own set
    assert v.stored and state.d_count == 4 and state.stored == 5


def test_nan_queries_cannot_poison_the_distances() -> None:
    params = Prada()
    state = PradaState.new(params)
    for i in range(50):
        step(params, state, np.full(8, np.nan if i % 2 else float(i), np.float32), 0)
    assert np.isfinite(state.d_values[: state.d_count]).all()


def test_the_cap_replaces_the_oldest_query_of_the_class() -> None:
    params = Prada(max_queries=100)
    state = PradaState.new(params)
    rng = np.random.default_rng(0)
    for i in range(400):
        step(params, state, rng.random(16, dtype=np.float32) * 10, i % 3)
        assert state.stored <= 100
    assert state.stored == 100 and sum(cs.n for cs in state.classes.values()) == 100
    ages = np.concatenate([cs.ages[: cs.n] for cs in state.classes.values()])
    assert ages.min() > 150  # the oldest queries are gone (not every query is stored: the threshold rule)
    # a new class at the cap takes the oldest row of the largest class
    step(params, state, np.ones(16, np.float32), 7)
    assert state.stored == 100 and state.classes[7].n == 1


def test_state_round_trips_and_goes_on_identically(digits) -> None:
    _, _, held_out, model = digits
    params = Prada()
    state = PradaState.new(params)
    preds = model.predict(held_out)
    for x, c in zip(held_out[:300], preds[:300], strict=True):
        step(params, state, x, int(c))
    blob = state.to_bytes()
    copy = PradaState.from_bytes(blob, params)
    assert copy.to_bytes() == blob
    for x, c in zip(held_out[300:400], preds[300:400], strict=True):
        _, a = step(params, state, x, int(c))
        _, b = step(params, copy, x, int(c))
        assert a == b or (np.isnan(a.statistic) and np.isnan(b.statistic))
    assert copy.to_bytes() == state.to_bytes()
    # memory per stored query: 4 bytes per input value + 16
    rows = sum(len(cs.rows) for cs in state.classes.values())
    assert state.memory_bytes() == rows * (4 * 64 + 16) + state.window * 12


def test_corrupted_or_oversized_state_is_refused_cleanly(digits) -> None:
    _, _, held_out, model = digits
    params = Prada(max_queries=200, window=500)
    state = PradaState.new(params)
    for x, c in zip(held_out[:120], model.predict(held_out[:120]), strict=True):
        step(params, state, x, int(c))
    blob = state.to_bytes()
    for cut in range(0, len(blob), 97):
        with pytest.raises(FormatError):
            PradaState.from_bytes(blob[:cut], params)
    rng = np.random.default_rng(1)
    for _ in range(300):
        bad = bytearray(blob)
        bad[int(rng.integers(len(bad)))] ^= 1 << int(rng.integers(8))
        try:
            loaded = PradaState.from_bytes(bytes(bad), params)
        except FormatError:
            continue
        assert loaded.stored <= params.max_queries  # a flip in the data itself may load, within the caps
    # a forged header claiming a huge matrix: refused from the lengths, nothing allocated
    head = blob.replace(b'"rows","<f4",[', b'"rows","<f4",[999999999999,')
    with pytest.raises(FormatError):
        PradaState.from_bytes(head, params)
    # more stored queries than the policy's cap, or another window
    with pytest.raises(FormatError, match="cap"):
        PradaState.from_bytes(blob, Prada(max_queries=100, window=500))
    with pytest.raises(FormatError, match="window"):
        PradaState.from_bytes(blob, Prada(max_queries=200))
