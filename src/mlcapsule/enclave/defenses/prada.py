"""PRADA (Juuti, Szyller, Marchal and Asokan, EuroS&P 2019): detect model-extraction query streams.

The rule, per client (one :class:`PradaState`):

* Each predicted class c has a *growing set* G_c of stored queries and a threshold T_c (0 at
  first). A query x predicted as c, when G_c is empty, is stored, with the distance 0 in D_Gc
  (the distances recorded for G_c), and adds nothing to D.
* Otherwise d_min, the L2 distance from x to its nearest query in G_c, is appended to D (the
  distances the test sees). If d_min > T_c, x joins G_c, d_min joins D_Gc, and
  T_c = max(T_c, mean(D_Gc) - std(D_Gc)). So a query close to one already stored is *not*
  stored (it still counts in D): the growing set keeps the spread-out queries, as in the authors'
  reference code.
* The test: D restricted to the classes with at least 10 distances (as the reference code does),
  values more than 3 standard deviations from the mean dropped; if more than ``min_dists`` (100)
  remain, W = Shapiro-Wilk(D); W < delta raises the alarm. Benign queries give roughly normal
  minimum distances; synthetic queries made by small steps from earlier ones (JbDA and its
  variants) give a skewed distribution with a mass of small distances.

Differences from the reference code, all documented in docs/defenses.md: the test runs after
every query (the paper's Algorithm 1) rather than every 10th; D is the last ``window`` distances
(at most 5,000, the range where Royston's W approximation holds) rather than all of them; and
the growing sets are capped at ``max_queries`` stored queries in all, at which point a newly
stored query replaces the oldest stored query of its own class (of the largest class if its own
is empty), so the sets track the recent stream and filling them first with benign queries does
not blind the detector. Non-finite input values count as 0 and inputs are clipped to +-1e9, so
a NaN query cannot poison D.

Cost: per query one float32 matrix-vector product with the stored queries of the predicted class
(their squared norms are kept), the exact distance to the nearest, and the test (a sort of at
most ``window`` values and O(window) numpy work; the W coefficients are cached per n). Memory:
``4 * input_size + 16`` bytes per stored query (row, squared norm, its distance, its age), up to
twice that while a class's matrix has spare capacity, plus 12 bytes per distance in the window.

The step mutates the state in place and returns it (copying megabytes per query would defeat the
purpose); keep :meth:`PradaState.to_bytes` if an older state is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _blob
from .errors import DefenseSpecError
from .policy import MAX_CLASSES, MAX_PRADA_QUERIES, MAX_SW_WINDOW, Prada
from .shapiro import shapiro_w

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]

#: A class's distances enter the test once it has this many (the reference code's rule).
MIN_CLASS_DISTS = 10
#: Distances further than this many standard deviations from the mean are left out of the test.
OUTLIER_SIGMAS = 3.0
#: Input values are clipped to this magnitude (so squared norms stay finite in float32).
INPUT_CLIP = 1e9
#: The largest input (values per query) PRADA stores.
MAX_INPUT_SIZE = 1 << 24

_MAGIC = b"MLCP"
_VERSION = 1
_INITIAL_ROWS = 8


@dataclass
class ClassSet:
    """The growing set of one class: stored queries in a matrix that grows by doubling."""

    rows: F32
    sqnorms: F32
    gdists: F32
    ages: I64
    n: int = 0
    threshold: float = 0.0

    @classmethod
    def empty(cls, dim: int, capacity: int = _INITIAL_ROWS) -> ClassSet:
        return cls(np.zeros((capacity, dim), np.float32), np.zeros(capacity, np.float32),
                   np.zeros(capacity, np.float32), np.zeros(capacity, np.int64))

    def _grow(self, limit: int) -> None:
        cap = min(max(2 * len(self.rows), _INITIAL_ROWS), max(limit, self.n + 1))
        for name in ("rows", "sqnorms", "gdists", "ages"):
            old = getattr(self, name)
            new = np.zeros((cap, *old.shape[1:]), old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)

    def put(self, i: int, x: F32, sqnorm: float, gdist: float, age: int) -> None:
        self.rows[i] = x
        self.sqnorms[i] = sqnorm
        self.gdists[i] = gdist
        self.ages[i] = age

    def append(self, x: F32, sqnorm: float, gdist: float, age: int, limit: int) -> None:
        if self.n == len(self.rows):
            self._grow(limit)
        self.put(self.n, x, sqnorm, gdist, age)
        self.n += 1

    def remove(self, i: int) -> None:
        """Drop row i (the last row takes its place)."""
        last = self.n - 1
        if i != last:
            self.put(i, self.rows[last], float(self.sqnorms[last]), float(self.gdists[last]), int(self.ages[last]))
        self.n = last

    def oldest(self) -> int:
        return int(np.argmin(self.ages[: self.n]))


@dataclass(frozen=True)
class PradaVerdict:
    """What one query did: the test's statistic (NaN when not tested), its sample size, the verdict."""

    statistic: float
    n: int
    flagged: bool
    stored: bool


@dataclass
class PradaState:
    """One client's PRADA state (see the module docstring)."""

    window: int
    dim: int = 0
    classes: dict[int, ClassSet] = field(default_factory=dict)
    stored: int = 0
    queries: int = 0
    d_values: F64 = field(default_factory=lambda: np.zeros(0))
    d_classes: I32 = field(default_factory=lambda: np.zeros(0, np.int32))
    d_count: int = 0
    d_next: int = 0
    last_w: float = math.nan
    flagged: bool = False

    @classmethod
    def new(cls, params: Prada) -> PradaState:
        return cls(window=params.window, d_values=np.zeros(params.window),
                   d_classes=np.zeros(params.window, np.int32))

    # -- the distances window
    def distances(self) -> tuple[F64, I32]:
        """The window's distances and their classes, oldest first."""
        if self.d_count < self.window:
            return self.d_values[: self.d_count], self.d_classes[: self.d_count]
        order = np.r_[self.d_next:self.window, 0:self.d_next]
        return self.d_values[order], self.d_classes[order]

    def _record(self, d: float, c: int) -> None:
        self.d_values[self.d_next] = d
        self.d_classes[self.d_next] = c
        self.d_next = (self.d_next + 1) % self.window
        self.d_count = min(self.d_count + 1, self.window)

    def memory_bytes(self) -> int:
        """Bytes held by the arrays (capacity included)."""
        total = self.d_values.nbytes + self.d_classes.nbytes
        for cs in self.classes.values():
            total += cs.rows.nbytes + cs.sqnorms.nbytes + cs.gdists.nbytes + cs.ages.nbytes
        return total

    # -- serialisation
    def to_bytes(self) -> bytes:
        keys = sorted(self.classes)
        parts = [self.classes[k] for k in keys]
        n = sum(cs.n for cs in parts)
        rows = np.concatenate([cs.rows[: cs.n] for cs in parts]) if parts else np.zeros((0, self.dim), np.float32)
        arrays: dict[str, npt.NDArray[Any]] = {
            "class_ids": np.asarray(keys, np.int32),
            "class_sizes": np.asarray([cs.n for cs in parts], np.int32),
            "thresholds": np.asarray([cs.threshold for cs in parts], np.float64),
            "rows": rows.reshape(n, self.dim),
            "gdists": np.concatenate([cs.gdists[: cs.n] for cs in parts]) if parts else np.zeros(0, np.float32),
            "ages": np.concatenate([cs.ages[: cs.n] for cs in parts]) if parts else np.zeros(0, np.int64),
        }
        d_values, d_classes = self.distances()
        arrays["d_values"], arrays["d_classes"] = d_values, d_classes
        fields = {"window": self.window, "dim": self.dim, "queries": self.queries,
                  "last_w": None if math.isnan(self.last_w) else self.last_w, "flagged": self.flagged}
        return _blob.pack(_MAGIC, _VERSION, fields, arrays)

    @classmethod
    def from_bytes(cls, blob: bytes, params: Prada) -> PradaState:
        """The state of :meth:`to_bytes`, checked against the policy's caps."""
        what = "PRADA state"
        fields, arrays = _blob.unpack(blob, _MAGIC, _VERSION, what)
        return cls._load(fields, arrays, params)

    @classmethod
    def _load(cls, fields: dict[str, object], arrays: dict[str, npt.NDArray[np.generic]], params: Prada) -> PradaState:
        what = "PRADA state"
        window = _blob.get_int(fields, "window", 1, MAX_SW_WINDOW, what)
        if window != params.window:
            raise _blob.damaged(what, "its window differs from the policy's")
        dim = _blob.get_int(fields, "dim", 0, MAX_INPUT_SIZE, what)
        queries = _blob.get_int(fields, "queries", 0, 1 << 62, what)
        last_w = _blob.get_float(fields, "last_w", what, optional=True)
        flagged = _blob.get_bool(fields, "flagged", what)
        ids = arrays.get("class_ids")
        if ids is None or ids.ndim != 1 or ids.size > MAX_CLASSES:
            raise _blob.damaged(what, "bad class list")
        k = ids.size
        ids = _blob.get_array(arrays, "class_ids", "<i4", (k,), what)
        sizes = _blob.get_array(arrays, "class_sizes", "<i4", (k,), what)
        thresholds = _blob.get_array(arrays, "thresholds", "<f8", (k,), what)
        if k and (ids.min() < 0 or ids.max() >= MAX_CLASSES or np.unique(ids).size != k or sizes.min() < 0
                  or not np.isfinite(thresholds).all() or thresholds.min() < 0):
            raise _blob.damaged(what, "bad class list")
        n = int(sizes.sum()) if k else 0
        if n > min(params.max_queries, MAX_PRADA_QUERIES) or queries < n:
            raise _blob.damaged(what, "more stored queries than the policy's cap")
        rows = _blob.get_array(arrays, "rows", "<f4", (n, dim), what)
        gdists = _blob.get_array(arrays, "gdists", "<f4", (n,), what)
        ages = _blob.get_array(arrays, "ages", "<i8", (n,), what)
        d_values = arrays.get("d_values")
        m = d_values.size if d_values is not None else -1
        if not 0 <= m <= window:
            raise _blob.damaged(what, "more distances than the window")
        d_values = _blob.get_array(arrays, "d_values", "<f8", (m,), what)
        d_classes = _blob.get_array(arrays, "d_classes", "<i4", (m,), what)
        if (n and (not np.isfinite(rows).all() or not np.isfinite(gdists).all() or ages.min() < 0)) or \
                (m and (not np.isfinite(d_values).all() or d_values.min() < 0 or d_classes.min() < 0
                        or d_classes.max() >= MAX_CLASSES)):
            raise _blob.damaged(what, "values out of range")
        state = cls.new(params)
        state.dim, state.queries, state.last_w, state.flagged, state.stored = dim, queries, last_w, flagged, n
        state.d_values[:m] = d_values
        state.d_classes[:m] = d_classes
        state.d_count, state.d_next = m, m % window
        start = 0
        for cid, size, thr in zip(ids.tolist(), sizes.tolist(), thresholds.tolist(), strict=True):
            cs = ClassSet.empty(dim, max(_INITIAL_ROWS, 1 << max(size - 1, 0).bit_length()))
            part = rows[start:start + size]
            cs.rows[:size] = part
            cs.sqnorms[:size] = np.einsum("ij,ij->i", part, part)
            cs.gdists[:size] = gdists[start:start + size]
            cs.ages[:size] = ages[start:start + size]
            cs.n, cs.threshold = size, thr
            state.classes[cid] = cs
            start += size
        return state


def _clean(query: npt.ArrayLike) -> F32:
    x = np.asarray(query, dtype=np.float32).reshape(-1)
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(x, -INPUT_CLIP, INPUT_CLIP)


def window_statistic(state: PradaState, min_dists: int) -> tuple[float, int]:
    """W of the window's distances after the class and outlier filters, and how many were tested.

    W is NaN when there are not more than ``min_dists`` distances to test.
    """
    values, classes = state.d_values[: state.d_count], state.d_classes[: state.d_count]
    if values.size <= min_dists:
        return math.nan, 0
    counts = np.bincount(classes)
    sample = values[counts[classes] >= MIN_CLASS_DISTS]
    if sample.size <= min_dists:
        return math.nan, 0
    mean, std = float(sample.mean()), float(sample.std())
    sample = sample[np.abs(sample - mean) < OUTLIER_SIGMAS * std]
    if sample.size <= min_dists:
        return math.nan, 0
    return shapiro_w(sample), int(sample.size)


def _store(params: Prada, state: PradaState, cs: ClassSet, x: F32, sqnorm: float, gdist: float) -> bool:
    cap = params.max_queries
    age = state.queries - 1
    if state.stored < cap:
        cs.append(x, sqnorm, gdist, age, cap)
        state.stored += 1
        return True
    if cs.n:
        cs.put(cs.oldest(), x, sqnorm, gdist, age)
        return True
    donor = max(state.classes.values(), key=lambda s: s.n)
    if donor.n < 2:
        return False
    donor.remove(donor.oldest())
    cs.append(x, sqnorm, gdist, age, cap)
    return True


def step(params: Prada, state: PradaState, query: npt.ArrayLike,
         predicted_class: int) -> tuple[PradaState, PradaVerdict]:
    """Process one query of the client's stream (``query`` is the model input, any shape)."""
    x = _clean(query)
    if state.dim == 0:
        if not 0 < x.size <= MAX_INPUT_SIZE:
            raise DefenseSpecError(f"prada: a query must have 1 to {MAX_INPUT_SIZE} values, not {x.size}")
        state.dim = x.size
    elif x.size != state.dim:
        raise DefenseSpecError(f"prada: a query has {x.size} values where the earlier ones had {state.dim}",
                               hint="prada needs a model with a fixed input size")
    c = int(predicted_class)
    if not 0 <= c < MAX_CLASSES:
        raise DefenseSpecError(f"prada: predicted class {c} out of range")
    state.queries += 1
    sqnorm = float(np.dot(x, x))
    cs = state.classes.get(c)
    stored = False
    if cs is None or cs.n == 0:
        if cs is None:
            cs = state.classes[c] = ClassSet.empty(state.dim)
        stored = _store(params, state, cs, x, sqnorm, 0.0)
    else:
        n = cs.n
        d2 = cs.sqnorms[:n] + np.float32(sqnorm) - 2.0 * (cs.rows[:n] @ x)
        nearest = int(np.argmin(d2))
        diff = cs.rows[nearest].astype(np.float64) - x
        d_min = math.sqrt(float(np.dot(diff, diff)))
        state._record(d_min, c)
        if d_min > cs.threshold:
            stored = _store(params, state, cs, x, sqnorm, d_min)
            g = cs.gdists[: cs.n].astype(np.float64)
            cs.threshold = max(cs.threshold, float(g.mean() - g.std()))
    w, size = window_statistic(state, params.min_dists)
    state.last_w = w
    state.flagged = bool(size > 0 and w < params.delta)
    return state, PradaVerdict(statistic=w, n=size, flagged=state.flagged, stored=stored)
