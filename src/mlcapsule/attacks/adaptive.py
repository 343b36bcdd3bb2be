"""An adaptive attacker who knows the MLCapsule paper's Algorithm 1 and inverts it.

Algorithm 1 (``mi-noise``, :func:`mlcapsule.enclave.defenses.outputs.mi_noise`) answers
``P' = (1 - c*alpha(P)) P + c*alpha(P) T`` with ``alpha(P) = 1 - H(P)/log|P|``. The policy (``c``
and ``T``) is shown to the client, so the map is public and deterministic. Write ``w = c*alpha(P)``:
then ``P = (P' - w T) / (1 - w)``, a point on the line through ``P'`` and ``T``, and the true ``w``
is a root of the one-dimensional function

    f(w) = c * alpha((P' - w T) / (1 - w)) - w,   w in [0, w_max],

where ``w_max = min(c, min_k P'_k / T_k)`` keeps the candidate a distribution. :func:`invert_mi_noise`
scans ``f`` on a grid, refines every sign change by bisection, and returns every root's
posterior. ``f(0) = c*alpha(P') >= 0``, so there is at least one root when ``f(w_max) <= 0``; a
posterior with a zero entry sits exactly at ``w_max``. When several roots fit (more likely at
large ``c``), the answer is ambiguous; ``choose`` picks one (the most confident reading by
default, which is the member-like one). Membership scores computed on the recovered posteriors
undo the noise wherever the root is unique.

Client-side research code, numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import UsageError
from .metrics import entropy

__all__ = ["InversionResult", "invert_mi_noise", "mi_noise_alpha"]

F64 = npt.NDArray[np.float64]


def mi_noise_alpha(p: npt.ArrayLike) -> F64:
    """Algorithm 1's alpha per row, ``1 - H(P)/log|P|``, clipped to [0, 1]."""
    q = np.asarray(p, dtype=np.float64)
    k = q.shape[-1]
    if k < 2:
        return np.ones(q.shape[:-1])
    return np.asarray(np.clip(1.0 - entropy(q) / np.log(k), 0.0, 1.0))


@dataclass(frozen=True)
class InversionResult:
    """The posteriors an Algorithm-1 inverter reads from noised answers."""

    posteriors: F64  # [n, classes]: the chosen candidate per row (the answer itself when no root)
    roots: npt.NDArray[np.int64]  # [n]: how many candidates fit each answer (0: none found)
    weight: F64  # [n]: the chosen w = c * alpha(P)

    @property
    def unique(self) -> npt.NDArray[np.bool_]:
        """Rows whose answer has exactly one consistent posterior."""
        return np.asarray(self.roots == 1)

    def recovered(self, truth: npt.ArrayLike, tol: float = 1e-3) -> npt.NDArray[np.bool_]:
        """Rows whose chosen posterior is within ``tol`` (max abs) of the true one."""
        t = np.asarray(truth, dtype=np.float64)
        return np.asarray(np.abs(self.posteriors - t).max(axis=1) <= tol)


def _candidates(answers: F64, prior: F64, w: F64) -> F64:
    """P(w) = (P' - w T)/(1 - w) for every row and every w: [n, g, classes]."""
    return (answers[:, None, :] - w[..., None] * prior[None, None, :]) / (1.0 - w[..., None])


def invert_mi_noise(answers: npt.ArrayLike, c: float, prior: npt.ArrayLike | None = None, *, grid: int = 400,
                    iters: int = 50, choose: str = "confident", boundary_tol: float = 1e-6) -> InversionResult:
    """Invert Algorithm 1 row by row (see the module docstring).

    ``answers`` [n, classes] are the defended posteriors, ``c`` and ``prior`` (T; uniform when
    None) the policy's parameters. ``choose``: ``"confident"`` (the largest root, the lowest
    entropy reading), ``"smallest"`` (the root closest to the answer itself)."""
    if not 0.0 <= c <= 1.0:
        raise UsageError(f"c must be in [0, 1], not {c}")
    if choose not in ("confident", "smallest"):
        raise UsageError(f"choose must be 'confident' or 'smallest', not {choose!r}")
    a = np.asarray(answers, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] < 2:
        raise UsageError(f"answers must be a (rows, classes) matrix of posteriors, not of shape {a.shape}")
    a = np.clip(a, 0.0, None)
    a = a / np.maximum(a.sum(axis=1, keepdims=True), 1e-300)
    n, k = a.shape
    t = np.full(k, 1.0 / k) if prior is None else np.asarray(prior, dtype=np.float64)
    if t.shape != (k,):
        raise UsageError(f"the prior has {t.size} classes, the answers {k}")
    if c == 0.0 or n == 0:
        return InversionResult(a.copy(), np.ones(n, np.int64), np.zeros(n))
    pos = t > 0
    ratio = np.where(pos[None, :], a / np.where(pos, t, 1.0)[None, :], np.inf)
    w_max = np.minimum(np.minimum(c, ratio.min(axis=1)), 1.0 - 1e-12)  # [n]

    def f(rows_a: F64, w: F64) -> F64:
        cand = np.clip(_candidates(rows_a, t, w), 0.0, None)
        return np.asarray(c * mi_noise_alpha(cand) - w)

    frac = np.linspace(0.0, 1.0, grid + 1)
    ws = w_max[:, None] * frac[None, :]  # [n, g]
    fs = f(a, ws)
    sign = np.sign(fs)
    change = (sign[:, :-1] > 0) & (sign[:, 1:] < 0) | (sign[:, :-1] < 0) & (sign[:, 1:] > 0)
    rows, cols = np.nonzero(change)
    lo, hi = ws[rows, cols], ws[rows, cols + 1]
    flo = fs[rows, cols]
    for _ in range(iters):
        mid = (lo + hi) / 2.0
        fm = f(a[rows], mid[:, None])[:, 0] if len(mid) else mid
        left = np.sign(fm) == np.sign(flo)
        lo = np.where(left, mid, lo)
        flo = np.where(left, fm, flo)
        hi = np.where(left, hi, mid)
    roots_w: list[list[float]] = [[] for _ in range(n)]
    for r, w in zip(rows.tolist(), ((lo + hi) / 2.0).tolist(), strict=True):
        roots_w[r].append(w)
    exact = np.abs(fs) <= boundary_tol  # grid points that are roots (P' = T, posteriors with zeros at w_max)
    for r, g in zip(*np.nonzero(exact), strict=True):
        w = float(ws[r, g])
        if all(abs(w - x) > 2.0 * w_max[r] / grid for x in roots_w[r]):  # not the root of a sign change beside it
            roots_w[r].append(w)
    chosen = np.zeros(n)
    counts = np.zeros(n, np.int64)
    for r in range(n):
        if roots_w[r]:
            counts[r] = len(roots_w[r])
            chosen[r] = max(roots_w[r]) if choose == "confident" else min(roots_w[r])
    post = np.clip(_candidates(a, t, chosen[:, None])[:, 0, :], 0.0, None)
    post = post / np.maximum(post.sum(axis=1, keepdims=True), 1e-300)
    post[counts == 0] = a[counts == 0]
    return InversionResult(post, counts, chosen)
