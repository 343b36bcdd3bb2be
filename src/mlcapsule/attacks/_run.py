"""Shared plumbing of the attacks: spending queries until a budget ends them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import UsageError
from .oracle import Oracle, QueryBudgetExhausted
from .results import STOP_ATTACK_BUDGET, STOP_CAPSULE_BUDGET, STOP_DONE

#: Draws ``n`` query rows from a generator.
Sampler = Callable[[np.random.Generator, int], np.ndarray]


def stop_reason(e: QueryBudgetExhausted) -> str:
    return STOP_CAPSULE_BUDGET if e.source == "capsule" else STOP_ATTACK_BUDGET


def spend(oracle: Oracle, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Query ``x``; returns the rows answered, their answers, and why it stopped.

    Never raises for a budget: a budget that runs out mid-batch gives the answered prefix and
    ``stopped`` set to the budget's name."""
    try:
        y = oracle.query(x)
        return np.asarray(x), y, STOP_DONE
    except QueryBudgetExhausted as e:
        ax = e.answered_x if e.answered_x is not None and e.answered_y is not None else np.asarray(x)[:0]
        ay = e.answered_y if e.answered_y is not None else np.empty((0,), dtype=np.float32)
        return np.asarray(ax), np.asarray(ay), stop_reason(e)


def uniform_sampler(shape: tuple[int, ...], low: float, high: float) -> Sampler:
    """Rows drawn uniformly from the box [low, high]^shape."""
    if not high > low:
        raise UsageError(f"the query domain needs low < high, got [{low}, {high}]")

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.uniform(low, high, size=(n, *shape)).astype(np.float32)

    return draw


def check_posteriors(y: np.ndarray, attack: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 1 and y.dtype.kind in "iu":
        raise UsageError(f"{attack} needs confidence scores, but the oracle answers labels only",
                         hint="use a label-only attack (retraining) against this oracle")
    return np.asarray(y, dtype=np.float64)
