"""A second stealing detector, for PRADA's blind spot: the out-of-distribution rate of a stream.

PRADA looks at distances between a client's queries, so queries that are each drawn
independently from *some* distribution pass it: uniform random inputs, or natural images from
another dataset (Knockoff Nets, Orekondy et al., CVPR 2019). Those queries share one trait: they
do not look like the model's training data. This detector tests exactly that, with the
provider's statistics of the training data (never the data):

* **Pack time** (:func:`fit_ood_stats`, pure numpy): a probabilistic PCA of the training inputs
  (Tipping and Bishop, 1999) -- the mean, the top k principal directions and their variances, and
  the mean variance of the discarded directions. A query's score is its Mahalanobis distance in
  that model, ``sum_j z_j^2 / lambda_j + r^2 / sigma^2`` (z: the coordinates on the k directions,
  r: the residual), i.e. minus twice its log-likelihood up to a constant. The threshold is the
  score's q-quantile on a held-out part of the training data (20 %), so a query from the
  training distribution is a *hit* with probability about p0 = 1 - q.
* **Query time** (:func:`step`): the hits among the client's last W queries are counted; the
  stream is flagged when that count is one that a benign client (hits ~ Binomial(n, p0), n the
  queries in the window) reaches with probability below ``level``. The critical counts for every
  n <= W are computed once per (W, p0, level).

What it assumes: the benign client's queries come from (close to) the training distribution, so
its hit rate is near p0 -- a client whose data legitimately differs (another camera, another
preprocessing) is flagged too, and the provider must fit the statistics on data like its
clients'. And that the score separates the two distributions, which holds for raw pixels of
uniform noise and of other datasets with a different structure (Fashion-MNIST against MNIST),
and fails for an attacker whose queries are natural and close to the training distribution
(the same dataset's other images: that is not a stealing signal this detector can see).
An adaptive attacker can keep the hit rate below the critical count by mixing in-distribution
queries, or by choosing only out-of-distribution queries that score below the threshold: see
docs/defenses.md.

The statistics reveal the training data's mean and top principal directions; they travel inside
the encrypted, signed capsule, like the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _blob
from .errors import DefenseSpecError
from .policy import MAX_OOD_WINDOW, Ood

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

_STATS_MAGIC = b"MLCO"
_STATE_MAGIC = b"MLCW"
_VERSION = 1
MAX_COMPONENTS = 1024
MAX_INPUT_SIZE = 1 << 24


@dataclass(frozen=True)
class OodStats:
    """The provider's training-data statistics for the detector (see the module docstring)."""

    mean: F32  # (d,)
    components: F32  # (k, d), orthonormal rows
    variances: F64  # (k,), the eigenvalues
    noise_variance: float  # sigma^2, the mean eigenvalue of the discarded directions
    threshold: float  # the score's q-quantile on the held-out training data
    quantile: float  # q
    n_fit: int  # training rows used

    @property
    def dim(self) -> int:
        return int(self.mean.size)

    @property
    def expected_rate(self) -> float:
        """p0, the hit rate of a client whose queries follow the training distribution."""
        return 1.0 - self.quantile

    def scores(self, x: npt.ArrayLike) -> F64:
        """The score of each row of ``x`` (rows flattened to ``dim`` values)."""
        a = np.asarray(x, dtype=np.float32)
        a = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)
        if a.shape[1] != self.dim:
            raise DefenseSpecError(f"ood: a query has {a.shape[1]} values, the statistics {self.dim}",
                                   hint="fit the ood statistics on inputs of the model's input shape")
        if not np.isfinite(a).all():
            a = np.nan_to_num(a, nan=0.0, posinf=1e9, neginf=-1e9)
        centred = (a - self.mean).astype(np.float64)
        z = centred @ self.components.T.astype(np.float64)
        total = np.einsum("ij,ij->i", centred, centred)
        residual = np.maximum(total - np.einsum("ij,ij->i", z, z), 0.0)
        return (z * z / self.variances).sum(axis=1) + residual / self.noise_variance

    def to_bytes(self) -> bytes:
        fields = {"noise_variance": self.noise_variance, "threshold": self.threshold, "quantile": self.quantile,
                  "n_fit": self.n_fit}
        arrays: dict[str, npt.NDArray[Any]] = {"mean": self.mean, "components": self.components,
                                               "variances": self.variances}
        return _blob.pack(_STATS_MAGIC, _VERSION, fields, arrays)

    @classmethod
    def from_bytes(cls, blob: bytes) -> OodStats:
        what = "ood statistics"
        fields, arrays = _blob.unpack(blob, _STATS_MAGIC, _VERSION, what)
        mean, comps = arrays.get("mean"), arrays.get("components")
        if mean is None or comps is None or mean.ndim != 1 or comps.ndim != 2:
            raise _blob.damaged(what, "missing arrays")
        d, k = mean.size, comps.shape[0]
        if not (0 < d <= MAX_INPUT_SIZE and 0 < k <= min(d, MAX_COMPONENTS)):
            raise _blob.damaged(what, "bad sizes")
        mean = _blob.get_array(arrays, "mean", "<f4", (d,), what)
        comps = _blob.get_array(arrays, "components", "<f4", (k, d), what)
        variances = _blob.get_array(arrays, "variances", "<f8", (k,), what)
        noise = _blob.get_float(fields, "noise_variance", what)
        threshold = _blob.get_float(fields, "threshold", what)
        quantile = _blob.get_float(fields, "quantile", what)
        n_fit = _blob.get_int(fields, "n_fit", 1, 1 << 40, what)
        if not (np.isfinite(mean).all() and np.isfinite(comps).all() and np.isfinite(variances).all()
                and variances.min() > 0 and math.isfinite(noise) and noise > 0 and math.isfinite(threshold)
                and threshold > 0 and 0.5 <= quantile < 1.0):
            raise _blob.damaged(what, "values out of range")
        return cls(mean.copy(), comps.copy(), variances.copy(), noise, threshold, quantile, n_fit)


def fit_ood_stats(x_train: npt.ArrayLike, *, components: int = 50, quantile: float = 0.99,
                  holdout: float = 0.2, seed: int = 0) -> OodStats:
    """The statistics of the training inputs ``x_train`` (one row per example, any trailing shape).

    A fraction ``holdout`` of the rows (a seeded permutation) is kept out of the PCA to set the
    threshold at their score's ``quantile``, so the benign hit rate is not underestimated.
    """
    x = np.asarray(x_train, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    n, d = x.shape
    if n < 20 or not 0 < d <= MAX_INPUT_SIZE:
        raise DefenseSpecError(f"ood: fitting needs at least 20 training rows of 1 to {MAX_INPUT_SIZE} values")
    if not 0.5 <= quantile < 1.0 or not 0.05 <= holdout <= 0.5:
        raise DefenseSpecError("ood: quantile must be in [0.5, 1) and holdout in [0.05, 0.5]")
    if not np.isfinite(x).all():
        raise DefenseSpecError("ood: the training inputs contain NaN or infinite values")
    order = np.random.default_rng(seed).permutation(n)
    n_hold = max(10, int(round(n * holdout)))
    fit, hold = x[order[n_hold:]], x[order[:n_hold]]
    mean = fit.mean(axis=0)
    centred = fit - mean
    cov = centred.T @ centred / max(fit.shape[0] - 1, 1)
    eigval, eigvec = np.linalg.eigh(cov)
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    eigval = np.maximum(eigval, 0.0)
    total = float(eigval.sum())
    if total <= 0:
        raise DefenseSpecError("ood: the training inputs do not vary")
    floor = total * 1e-9 / d + 1e-12
    k = int(min(components, d - 1 if d > 1 else 1, MAX_COMPONENTS, int((eigval > floor).sum()) or 1))
    variances = np.maximum(eigval[:k], floor)
    rest = eigval[k:]
    noise = max(float(rest.mean()) if rest.size else floor, floor)
    stats = OodStats(mean.astype(np.float32), np.ascontiguousarray(eigvec[:, :k].T, dtype=np.float32),
                     variances.astype(np.float64), noise, 1.0, quantile, int(fit.shape[0]))
    threshold = float(np.quantile(stats.scores(hold), quantile, method="higher"))
    return OodStats(stats.mean, stats.components, stats.variances, noise, max(threshold, 1e-12), quantile,
                    stats.n_fit)


@lru_cache(maxsize=16)
def _critical_counts(window: int, p0: float, level: float) -> tuple[int, ...]:
    """For n = 0..window: the least h with P(Binomial(n, p0) >= h) <= level (n + 1: never)."""
    out = [1]
    lp, lq, llevel = math.log(p0), math.log1p(-p0), math.log(level)
    logs = np.log(np.arange(1, window + 1, dtype=np.float64))
    for n in range(1, window + 1):
        h = np.arange(1, n + 1)
        log_choose = np.concatenate(([0.0], np.cumsum(logs[n - h] - logs[h - 1])))  # log C(n, h), h = 0..n
        logpmf = log_choose + np.arange(n + 1) * lp + (n - np.arange(n + 1)) * lq
        tail = np.logaddexp.accumulate(logpmf[::-1])[::-1]  # log P(X >= h)
        ok = np.nonzero(tail <= llevel)[0]
        out.append(int(ok[0]) if ok.size else n + 1)
    return tuple(out)


def critical_counts(window: int, p0: float, level: float) -> npt.NDArray[np.int64]:
    """:func:`_critical_counts` as an array (cached)."""
    if not 1 <= window <= MAX_OOD_WINDOW or not 0 < p0 < 1 or not 0 < level < 1:
        raise DefenseSpecError("ood: window, rate or level out of range")
    return np.asarray(_critical_counts(window, float(p0), float(level)), dtype=np.int64)


@dataclass(frozen=True)
class OodVerdict:
    statistic: float  # hits in the window
    threshold: float  # the critical count for the window's size
    hit: bool
    flagged: bool


@dataclass
class OodState:
    """The last ``window`` queries' hits (a ring of 0/1 bytes) and the running count."""

    window: int
    hits: npt.NDArray[np.uint8]
    count: int = 0  # queries in the window
    next: int = 0
    total_hits: int = 0  # hits in the window
    queries: int = 0
    flagged: bool = False

    @classmethod
    def new(cls, params: Ood) -> OodState:
        return cls(window=params.window, hits=np.zeros(params.window, np.uint8))

    def to_bytes(self) -> bytes:
        order = np.r_[self.next:self.window, 0:self.next] if self.count == self.window else np.arange(self.count)
        fields = {"window": self.window, "queries": self.queries, "flagged": self.flagged}
        return _blob.pack(_STATE_MAGIC, _VERSION, fields, {"hits": self.hits[order]})

    @classmethod
    def from_bytes(cls, blob: bytes, params: Ood) -> OodState:
        what = "ood state"
        fields, arrays = _blob.unpack(blob, _STATE_MAGIC, _VERSION, what)
        window = _blob.get_int(fields, "window", 1, MAX_OOD_WINDOW, what)
        if window != params.window:
            raise _blob.damaged(what, "its window differs from the policy's")
        hits = arrays.get("hits")
        m = hits.size if hits is not None and hits.ndim == 1 else -1
        if not 0 <= m <= window:
            raise _blob.damaged(what, "more hits than the window")
        hits = _blob.get_array(arrays, "hits", "|u1", (m,), what)
        if m and hits.max() > 1:
            raise _blob.damaged(what, "values out of range")
        state = cls.new(params)
        state.hits[:m] = hits
        state.count, state.next = m, m % window
        state.total_hits = int(hits.sum())
        state.queries = _blob.get_int(fields, "queries", m, 1 << 62, what)
        state.flagged = _blob.get_bool(fields, "flagged", what)
        return state


def step(params: Ood, stats: OodStats, state: OodState, query: npt.ArrayLike,
         score: float | None = None) -> tuple[OodState, OodVerdict]:
    """Process one query (``score`` may be given when computed for a whole batch at once)."""
    s = float(stats.scores(query)[0]) if score is None else score
    hit = bool(s > stats.threshold) or math.isnan(s)
    if state.count == state.window:
        state.total_hits -= int(state.hits[state.next])
    else:
        state.count += 1
    state.hits[state.next] = 1 if hit else 0
    state.total_hits += int(hit)
    state.next = (state.next + 1) % state.window
    state.queries += 1
    crit = int(critical_counts(state.window, stats.expected_rate, params.level)[state.count])
    state.flagged = state.total_hits >= crit
    return state, OodVerdict(statistic=float(state.total_hits), threshold=float(crit), hit=hit,
                             flagged=state.flagged)
