"""Output transforms against membership inference and model extraction (issue 12 item 4).

All functions take a batch of posteriors, one row per query, shape ``(n, classes)``, and are
vectorised over the rows. They compose in one fixed order (:func:`transform`):

1. **mi-noise**, the MLCapsule paper's Algorithm 1: ``alpha = 1 - H(P) / log|P|`` (natural
   logarithms; ``0 log 0 = 0``), then ``P' = (1 - c*alpha) P + c*alpha T``. ``T`` is the training
   class distribution supplied at pack time, uniform by default. Confident answers (low entropy,
   alpha near 1) are mixed the most. With ``c`` in [0, 1], ``P'`` is a distribution. With a
   uniform ``T`` the argmax never changes (every entry moves toward 1/|P| by the same factor);
   with a non-uniform ``T`` it can.
2. **top-k**: keep the k largest entries (ties: the lower class index), zero the rest, and
   renormalise so the answer is still a distribution. Renormalising hides the mass of the
   dropped classes, which would otherwise tell the client how confident the model was.
3. **round**: round every entry to d decimals (numpy's round half to even). Not renormalised
   afterwards (that would undo the rounding), so a rounded row may sum to 1 +- n*10^-d/2.
4. **label-only**: a one-hot row of the *model's* argmax (not the noised one: with labels only
   there is no confidence left to protect, and the model's label costs no accuracy). Label-only
   overrides 1-3. One-hot keeps the output's shape and dtype, so the capsule's output description
   is unchanged.

Rows must be probability vectors for mi-noise and top-k (:func:`as_distribution` checks them;
round and label-only work on any scores).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from .errors import DefenseSpecError
from .policy import DefensePolicy

F64 = npt.NDArray[np.float64]

#: How far a model's output row may be from a distribution (float32 softmax rounding).
SUM_TOLERANCE = 1e-3
_SMALL = 32


def as_distribution(posteriors: npt.ArrayLike) -> F64:
    """The rows as float64 distributions: negatives below 1e-6 clipped, rows renormalised.

    Raises :class:`DefenseSpecError` (without any value in the message: the host must learn
    nothing of an undefended output) when the rows are not probabilities, e.g. logits.
    """
    p = np.array(posteriors, dtype=np.float64, copy=True)
    if p.ndim != 2 or p.shape[1] < 1:
        raise DefenseSpecError(f"posteriors must be a (queries, classes) matrix, not of shape {p.shape}")
    if p.size == 0:
        return p
    sums = p.sum(axis=1)
    if (not np.isfinite(sums).all() or p.min() < -1e-6 or np.abs(sums - 1.0).max() > SUM_TOLERANCE):
        raise DefenseSpecError("the model's outputs are not probability vectors, which mi-noise and top-k need",
                               hint="pack a model whose output ends with a softmax, or drop mi-noise and top-k")
    np.maximum(p, 0.0, out=p)
    p /= p.sum(axis=1, keepdims=True)
    return p


def alpha(p: F64) -> F64:
    """Algorithm 1's alpha per row: 1 - H(P)/log|P| in [0, 1] (1: one-hot, 0: uniform)."""
    n_rows, n_classes = p.shape
    if n_classes < 2:
        return np.ones(n_rows)
    if n_rows == 1 and n_classes <= _SMALL:  # one small posterior: scalar math beats numpy's call overhead
        entropy = -math.fsum(v * math.log(v) for v in p[0].tolist() if v > 0.0)
        return np.array([min(max(1.0 - entropy / math.log(n_classes), 0.0), 1.0)])
    logs = np.log(np.where(p > 0, p, 1.0))
    a = 1.0 - np.einsum("ij,ij->i", p, logs) * (-1.0 / math.log(n_classes))
    np.minimum(a, 1.0, out=a)
    np.maximum(a, 0.0, out=a)
    return a


def mi_noise(p: F64, c: float, prior: npt.ArrayLike | None = None) -> F64:
    """The paper's Algorithm 1 on every row: ``(1 - c*alpha) P + c*alpha T`` (T uniform if None)."""
    if not 0.0 <= c <= 1.0:
        raise DefenseSpecError(f"mi-noise: c must be in [0, 1], not {c}")
    n_classes = p.shape[1]
    if c == 0.0 or n_classes < 2 or p.shape[0] == 0:
        return p.copy()
    w = c * alpha(p)[:, None]
    if prior is None:
        return p + w * (1.0 / n_classes - p)
    t = np.asarray(prior, dtype=np.float64)
    if t.shape != (n_classes,):
        raise DefenseSpecError(f"mi-noise: the prior has {t.size} classes, the model {n_classes}")
    return p + w * (t[None, :] - p)


def top_k(p: F64, k: int) -> F64:
    """Keep each row's k largest entries (ties: lower index first), zero the rest, renormalise."""
    if k < 1:
        raise DefenseSpecError(f"top-k: k must be at least 1, not {k}")
    if k >= p.shape[1] or p.shape[0] == 0:
        return p.copy()
    keep = np.argsort(-p, axis=1, kind="stable")[:, :k]
    out = np.zeros_like(p)
    np.put_along_axis(out, keep, np.take_along_axis(p, keep, axis=1), axis=1)
    sums = out.sum(axis=1, keepdims=True)
    np.divide(out, sums, out=out, where=sums > 0)
    return out


def round_to(p: F64, decimals: int) -> F64:
    """Every entry rounded to ``decimals`` decimals (half to even)."""
    return np.round(p, decimals)


def one_hot(p: npt.ArrayLike) -> F64:
    """A one-hot row of each row's argmax (ties: the lower index)."""
    q = np.asarray(p)
    out = np.zeros(q.shape, dtype=np.float64)
    if q.shape[0]:
        out[np.arange(q.shape[0]), np.argmax(q, axis=1)] = 1.0
    return out


def transform(policy: DefensePolicy, posteriors: npt.ArrayLike, *,
              labels_only: bool = False) -> npt.NDArray[np.floating]:
    """The answer to release: the policy's output transforms, in the module's order.

    ``labels_only`` forces label-only (the ``degrade`` action). The answer has the dtype of
    ``posteriors`` when that is floating point (float32 for most models), else float64.
    """
    raw = np.asarray(posteriors)
    if raw.ndim != 2:
        raise DefenseSpecError(f"posteriors must be a (queries, classes) matrix, not of shape {raw.shape}")
    dtype = raw.dtype if np.issubdtype(raw.dtype, np.floating) else np.dtype(np.float64)
    if labels_only or policy.label_only:
        return one_hot(raw).astype(dtype, copy=False)
    if policy.mi_noise is None and policy.top_k is None:
        out = raw.astype(np.float64)
    else:
        out = as_distribution(raw)
        if policy.mi_noise is not None:
            out = mi_noise(out, policy.mi_noise.c, policy.mi_noise.prior)
        if policy.top_k is not None:
            out = top_k(out, policy.top_k.k)
    if policy.round is not None:
        out = round_to(out, policy.round.decimals)
    return out.astype(dtype, copy=False)
