"""The data an audit needs: held-out labelled inputs, the training members, a transfer set.

* ``x_eval``/``y_eval``: held-out inputs the attacker never queries: fidelity is measured on
  them, and the accuracy each defense costs.
* ``x_pool``/``y_pool``: other held-out inputs, the attacker's natural data: JbDA's seed set
  and the non-members of membership inference.
* ``members``/``member_labels``: training inputs (membership inference).
* ``transfer``: natural inputs of another distribution (Knockoff Nets), or ``None``.
* ``low``/``high``: the input domain (uniform queries, equation solving, JbDA's clipping).

:func:`split_heldout` makes ``eval`` and ``pool`` from one held-out set (``--data``,
``--labels``). :func:`builtin_digits` is the demo capsule's data: scikit-learn's digits split
exactly as :func:`mlcapsule.demo.models.digits_classifier` split it (its training rows are the
members), with Fashion-MNIST in the digits' 8x8 format as the transfer set when
``../shared/datasets`` has it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError

__all__ = ["AuditData", "builtin_digits", "split_heldout", "load_array", "looks_like_digits"]


@dataclass
class AuditData:
    x_eval: np.ndarray
    y_eval: np.ndarray
    x_pool: np.ndarray
    y_pool: np.ndarray
    members: np.ndarray | None = None
    member_labels: np.ndarray | None = None
    transfer: np.ndarray | None = None
    low: float = 0.0
    high: float = 1.0
    source: str = "given"
    transfer_source: str | None = None

    def describe(self) -> dict[str, object]:
        return {"source": self.source, "eval": len(self.x_eval), "pool": len(self.x_pool),
                "members": 0 if self.members is None else len(self.members),
                "transfer": 0 if self.transfer is None else len(self.transfer),
                "transfer_source": self.transfer_source, "low": self.low, "high": self.high}


def load_array(path: str | os.PathLike[str], what: str) -> np.ndarray:
    p = Path(path)
    try:
        arr = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {what} from {p}: {e}", hint="pass a .npy file written by numpy.save") from e
    if isinstance(arr, np.lib.npyio.NpzFile):  # pragma: no cover - .npz given
        raise UsageError(f"{what}: pass a .npy file, not .npz")
    return np.asarray(arr)


def split_heldout(x: np.ndarray, y: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                           np.ndarray]:
    """Half of the held-out set for evaluation, half for the attacker (a seeded permutation)."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).astype(np.int64).ravel()
    if len(x) != len(y):
        raise UsageError(f"--data has {len(x)} rows but --labels has {len(y)}")
    if len(x) < 20:
        raise UsageError(f"the held-out data has {len(x)} rows; the audit needs at least 20")
    order = np.random.default_rng(seed).permutation(len(x))
    half = len(x) // 2
    ev, pool = order[:half], order[half:]
    return x[ev], y[ev], x[pool], y[pool]


def looks_like_digits(input_shape: tuple[int, ...], n_classes: int) -> bool:
    """The demo capsule's shapes: 64 features (8x8 digits), 10 classes."""
    return tuple(input_shape) == (64,) and n_classes == 10


def builtin_digits(*, seed: int = 0, transfer: bool = True) -> AuditData:
    """The demo's digits split (the one :func:`~mlcapsule.demo.models.digits_classifier` trains
    on with ``seed=0``), without training anything."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UsageError(f"the built-in digits data needs scikit-learn ({e})",
                         hint="pip install 'mlcapsule[sklearn]', or pass --data and --labels") from e
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    x_eval, y_eval, x_pool, y_pool = split_heldout(x_test, y_test, seed=seed)
    data = AuditData(x_eval, y_eval, x_pool, y_pool, np.asarray(x_train, np.float32),
                     np.asarray(y_train, np.int64), low=0.0, high=16.0, source="built-in digits (demo split)")
    if transfer:
        data.transfer, data.transfer_source = _fashion_digits()
    return data


def _fashion_digits() -> tuple[np.ndarray | None, str | None]:
    from ..attacks.data import load_idx_dataset, to_digits_format

    try:
        images, _ = load_idx_dataset("fashion-mnist", "test", limit=4000)
    except Exception:  # noqa: BLE001 - no shared datasets on this machine: Knockoff is skipped
        return None, None
    return to_digits_format(images), "Fashion-MNIST test images in digits format"
