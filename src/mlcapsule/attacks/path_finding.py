"""Tramèr et al. (USENIX Security 2016), Section 4.2: the path-finding attack on decision trees.

The victim answers with confidences that identify the leaf an input reaches (a tree's leaves
have distinct class distributions, or an API names the leaf). A leaf's region is an
axis-aligned box, so moving one feature of an input, the others fixed, keeps the leaf until a
split threshold is crossed. For each new leaf the attack line-searches every feature: it probes
a grid of ``grid`` values over ``[low, high]``, and between two probes with different leaves it
bisects down to ``eps``. The interval around the input's value is the leaf's extent on that
feature; every other leaf met on the way is queued and explored in turn.

The extracted model is the list of boxes and their answers. Leaves with equal answers are the
same leaf to the attacker (the paper's limitation too), and a leaf region narrower than the grid
step between two probes of the same leaf can be missed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UsageError
from ._run import check_posteriors
from .oracle import Oracle, QueryBudgetExhausted
from .results import STOP_DONE, AttackResult, Trace

__all__ = ["extract_tree", "BoxTree"]


def _leaf_id(answer: np.ndarray, decimals: int) -> tuple[float, ...]:
    return tuple(np.round(np.asarray(answer, np.float64).ravel(), decimals).tolist())


@dataclass
class BoxTree:
    """Leaves as boxes ``lo < x <= hi`` (per feature) with the answer the victim gave there."""

    lows: list[np.ndarray] = field(default_factory=list)
    highs: list[np.ndarray] = field(default_factory=list)
    answers: list[np.ndarray] = field(default_factory=list)

    def _leaf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        lo, hi = np.stack(self.lows), np.stack(self.highs)  # [leaves, d]
        inside = ((x[:, None, :] > lo[None]) & (x[:, None, :] <= hi[None])).sum(axis=2)  # features inside
        return np.asarray(np.argmax(inside, axis=1))  # the box containing x, else the closest by count

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.stack(self.answers)[self._leaf(x)]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.predict_proba(x), axis=1)


class _Budgeted:
    """Single queries with a cache; QueryBudgetExhausted propagates."""

    def __init__(self, oracle: Oracle, decimals: int) -> None:
        self.oracle = oracle
        self.decimals = decimals
        self.answers: dict[tuple[float, ...], np.ndarray] = {}

    def __call__(self, x: np.ndarray) -> tuple[float, ...]:
        y = check_posteriors(self.oracle.query(x[None, :].astype(np.float32)), "path finding")[0]
        leaf = _leaf_id(y, self.decimals)
        self.answers.setdefault(leaf, y)
        return leaf


def extract_tree(oracle: Oracle, n_features: int, *, low: float | np.ndarray, high: float | np.ndarray,
                 grid: int = 9, eps: float = 1e-3, decimals: int = 6, start: np.ndarray | None = None,
                 seed: int = 0, evaluator: Any = None) -> AttackResult:
    """Path finding from ``start`` (default: a uniform random input) over the box [low, high]."""
    if grid < 2:
        raise UsageError(f"grid must be at least 2, got {grid}")
    lo = np.broadcast_to(np.asarray(low, np.float64), (n_features,)).copy()
    hi = np.broadcast_to(np.asarray(high, np.float64), (n_features,)).copy()
    rng = np.random.default_rng(seed)
    ask = _Budgeted(oracle, decimals)
    model = BoxTree()
    seen: set[tuple[float, ...]] = set()
    stopped = STOP_DONE
    x0 = rng.uniform(lo, hi) if start is None else np.asarray(start, np.float64).copy()
    queue: deque[np.ndarray] = deque([x0])
    try:
        while queue:
            x = queue.popleft()
            leaf = ask(x)
            if leaf in seen:
                continue
            seen.add(leaf)
            box_lo, box_hi = lo.copy() - eps, hi.copy()
            for i in range(n_features):
                a_lo, a_hi, others = _line_search(ask, x, i, lo[i], hi[i], grid, eps, leaf)
                box_lo[i], box_hi[i] = a_lo, a_hi
                for point in others:
                    queue.append(point)
            model.lows.append(box_lo)
            model.highs.append(box_hi)
            model.answers.append(ask.answers[leaf])
    except QueryBudgetExhausted as e:
        stopped = "capsule budget" if e.source == "capsule" else "attack budget"
    trace = Trace()
    if evaluator is not None and model.answers:
        trace.add(oracle.queries_spent, **evaluator(model))
    return AttackResult("tramer-path-finding", queries_spent=oracle.queries_spent, stopped=stopped, trace=trace,
                        model=model if model.answers else None,
                        params={"n_features": n_features, "grid": grid, "eps": eps, "seed": seed},
                        metrics={**({} if not trace.points else trace.points[-1].metrics),
                                 "leaves": float(len(model.answers))})


def _line_search(ask: _Budgeted, x: np.ndarray, i: int, lo: float, hi: float, grid: int, eps: float,
                 leaf: tuple[float, ...]) -> tuple[float, float, list[np.ndarray]]:
    """The extent (a, b] of ``leaf`` along feature ``i`` around ``x[i]``, and one input in each
    other leaf met along the line."""

    def at(v: float) -> np.ndarray:
        p = x.copy()
        p[i] = v
        return p

    points = sorted({float(v) for v in np.linspace(lo, hi, grid)} | {float(x[i])})
    ids = [leaf if v == x[i] else ask(at(v)) for v in points]
    # Refine every change between neighbouring probes to a bracket of width <= eps.
    cuts: list[tuple[float, float]] = []  # (last value of the left leaf, first value of the right leaf)
    values: list[tuple[float, tuple[float, ...]]] = [(points[0], ids[0])]
    for k in range(len(points) - 1):
        stack = [(points[k], ids[k], points[k + 1], ids[k + 1])]
        while stack:
            a1, i1, b1, i2 = stack.pop()
            if i1 == i2:
                continue
            if b1 - a1 <= eps:
                cuts.append((a1, b1))
                values.append((b1, i2))
                continue
            m = (a1 + b1) / 2
            im = ask(at(m))
            stack += [(m, im, b1, i2), (a1, i1, m, im)]
    cuts.sort()
    others = [at(v) for v, ident in values if ident != leaf]
    # A threshold is known to lie in its bracket (a, b]; the box takes the bracket's left end.
    a_lo = max([c[0] for c in cuts if c[1] <= x[i]], default=lo - eps)
    a_hi = min([c[0] for c in cuts if c[0] >= x[i]], default=hi)
    return a_lo, a_hi, others
