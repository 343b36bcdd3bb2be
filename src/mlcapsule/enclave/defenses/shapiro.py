"""The Shapiro-Wilk W statistic in numpy: Royston's algorithm AS R94 (1995), as scipy computes it.

W = (sum_i a_i x_(i))^2 / sum_i (x_i - mean)^2 over the sorted sample, with Royston's (1992)
approximation of the coefficients a_i (valid for 3 <= n <= 5000): the expected normal order
statistics m_i = Phi^-1((i - 3/8) / (n + 1/4)) from Beasley and Springer's AS 111 (the ``PPND``
that AS R94 calls), normalised, with the two outermost coefficients corrected by polynomials in
1/sqrt(n). W is computed as AS R94 does, as one minus the squared correlation's complement,
which stays accurate when W is close to 1.

The coefficients depend on n only; :func:`coefficients` caches the most recent ones. Only W is
computed (PRADA compares W with its threshold delta; no p-value is needed).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]

MIN_N = 3
MAX_N = 5000

# Royston (1992) polynomials in 1/sqrt(n) for the two largest coefficients (c0 + c1 x + ... + c5 x^5).
_C1 = (0.0, 0.221157, -0.147981, -2.071190, 4.434685, -2.706056)
_C2 = (0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633)

# Beasley and Springer (1977), AS 111: the normal quantile, about 7 significant digits.
_A = (2.50662823884, -18.61500062529, 41.39119773534, -25.44106049637)
_B = (-8.47351093090, 23.08336743743, -21.06224101826, 3.13082909833)
_C = (-2.78718931138, -2.29796479134, 4.85014127135, 2.32121276858)
_D = (3.54388924762, 1.63706781897)
_SPLIT = 0.42

_CACHE: OrderedDict[int, F64] = OrderedDict()
_CACHE_SIZE = 16


def _poly(c: tuple[float, ...], x: float) -> float:
    out = 0.0
    for coef in reversed(c):
        out = out * x + coef
    return out


def ppnd(p: npt.ArrayLike) -> F64:
    """Phi^-1(p) for p in (0, 1), vectorised (AS 111)."""
    p = np.asarray(p, dtype=np.float64)
    q = p - 0.5
    out = np.empty_like(p)
    central = np.abs(q) <= _SPLIT
    qc = q[central]
    r = qc * qc
    out[central] = qc * (((_A[3] * r + _A[2]) * r + _A[1]) * r + _A[0]) / (
        (((_B[3] * r + _B[2]) * r + _B[1]) * r + _B[0]) * r + 1.0)
    tail = ~central
    if tail.any():
        pt = p[tail]
        rt = np.where(q[tail] > 0, 1.0 - pt, pt)
        rt = np.sqrt(-np.log(rt))
        val = (((_C[3] * rt + _C[2]) * rt + _C[1]) * rt + _C[0]) / ((_D[1] * rt + _D[0]) * rt + 1.0)
        out[tail] = np.where(q[tail] < 0, -val, val)
    return out


def coefficients(n: int) -> F64:
    """The n antisymmetric coefficients a_1 <= ... <= a_n of AS R94 (sum 0), cached per n."""
    cached = _CACHE.get(n)
    if cached is not None:
        _CACHE.move_to_end(n)
        return cached
    if not MIN_N <= n <= MAX_N:
        raise ValueError(f"Shapiro-Wilk needs 3 to {MAX_N} values, not {n}")
    half = n // 2
    if n == 3:
        upper = np.array([math.sqrt(0.5)])
    else:
        m = ppnd((np.arange(1, half + 1) - 0.375) / (n + 0.25))  # negative: the lower order statistics
        summ2 = 2.0 * float(np.dot(m, m))
        ssumm2 = math.sqrt(summ2)
        rsn = 1.0 / math.sqrt(n)
        a1 = _poly(_C1, rsn) - m[0] / ssumm2
        if n > 5:
            a2 = -m[1] / ssumm2 + _poly(_C2, rsn)
            fac = math.sqrt((summ2 - 2.0 * m[0] ** 2 - 2.0 * m[1] ** 2) / (1.0 - 2.0 * a1 ** 2 - 2.0 * a2 ** 2))
            upper = -m / fac
            upper[1] = a2
        else:
            fac = math.sqrt((summ2 - 2.0 * m[0] ** 2) / (1.0 - 2.0 * a1 ** 2))
            upper = -m / fac
        upper[0] = a1
    full = np.zeros(n)
    full[:half] = -upper
    full[n - half:] = upper[::-1]
    full.setflags(write=False)
    _CACHE[n] = full
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return full


def shapiro_w(x: npt.ArrayLike, *, presorted: bool = False) -> float:
    """The Shapiro-Wilk W of a sample of 3 to 5000 values (1.0 for a sample with zero range)."""
    y = np.asarray(x, dtype=np.float64).ravel()
    n = y.size
    if not MIN_N <= n <= MAX_N:
        raise ValueError(f"Shapiro-Wilk needs 3 to {MAX_N} values, not {n}")
    if not presorted:
        y = np.sort(y)
    spread = float(y[-1] - y[0])
    if not spread > 1e-19 * max(1.0, abs(float(y[-1]))):
        return 1.0
    a = coefficients(n)
    xs = (y - y[n // 2]) / spread
    xs -= xs.mean()
    ac = a - a.mean()
    ssa = float(np.dot(ac, ac))
    ssx = float(np.dot(xs, xs))
    sax = float(np.dot(ac, xs))
    root = math.sqrt(ssa * ssx)
    w = 1.0 - (root - sax) * (root + sax) / (ssa * ssx)
    if n == 3 and w < 0.75:
        return 0.75
    return w
