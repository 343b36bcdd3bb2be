"""What an attack reports: its metric as a function of the queries spent.

* :class:`Trace` — points ``(queries, {metric: value})`` in the order they were measured.
* :class:`AttackResult` — the attack's name and parameters, the queries it spent, why it
  stopped, its trace, and what it produced (an extracted model, membership scores, ...).
* :class:`Predictor` — what an extracted model offers: ``predict_proba(x)`` and ``predict(x)``.
* :class:`FidelityEvaluator` — measures an extracted model against a *reference* copy of the
  victim (a research-side ground truth that is never charged: the plain ONNX model, say) on
  held-out inputs and on uniform inputs, plus accuracy on labelled data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .metrics import agreement
from .oracle import as_labels

__all__ = ["Trace", "TracePoint", "AttackResult", "Predictor", "FidelityEvaluator", "STOP_DONE",
           "STOP_ATTACK_BUDGET", "STOP_CAPSULE_BUDGET"]

#: Why an attack stopped.
STOP_DONE = "done"
STOP_ATTACK_BUDGET = "attack budget"
STOP_CAPSULE_BUDGET = "capsule budget"


@dataclass(frozen=True)
class TracePoint:
    queries: int
    metrics: dict[str, float]


@dataclass
class Trace:
    """Metric values against the queries spent when they were measured."""

    points: list[TracePoint] = field(default_factory=list)

    def add(self, queries: int, **metrics: float) -> None:
        self.points.append(TracePoint(int(queries), {k: float(v) for k, v in metrics.items()}))

    def __len__(self) -> int:
        return len(self.points)

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        """(queries, values) of the points that measured ``metric``."""
        pts = [p for p in self.points if metric in p.metrics]
        return [p.queries for p in pts], [p.metrics[metric] for p in pts]

    def last(self, metric: str) -> float | None:
        _, values = self.series(metric)
        return values[-1] if values else None

    def first_reaching(self, metric: str, value: float) -> int | None:
        """The fewest queries at which ``metric`` was measured at ``value`` or more (or None):
        e.g. how many queries copy the model to 90 % fidelity."""
        for q, v in zip(*self.series(metric), strict=True):
            if v >= value:
                return q
        return None

    def to_list(self) -> list[dict[str, Any]]:
        return [{"queries": p.queries, **p.metrics} for p in self.points]


@runtime_checkable
class Predictor(Protocol):
    """An extracted (or substitute) model."""

    def predict_proba(self, x: np.ndarray) -> np.ndarray: ...

    def predict(self, x: np.ndarray) -> np.ndarray: ...


@dataclass
class AttackResult:
    """The outcome of one attack run."""

    attack: str
    queries_spent: int
    stopped: str = STOP_DONE  # STOP_DONE, STOP_ATTACK_BUDGET or STOP_CAPSULE_BUDGET
    trace: Trace = field(default_factory=Trace)
    params: dict[str, Any] = field(default_factory=dict)
    model: Predictor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exhausted(self) -> bool:
        """True when a budget ended the attack before it finished."""
        return self.stopped != STOP_DONE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the model and the extra arrays are left out)."""
        return {"attack": self.attack, "queries_spent": self.queries_spent, "stopped": self.stopped,
                "params": _jsonable(self.params), "metrics": dict(self.metrics), "trace": self.trace.to_list()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "__dataclass_fields__"):
        return _jsonable(asdict(obj))
    return repr(obj)


@dataclass
class FidelityEvaluator:
    """Fidelity and accuracy of an extracted model, measured against a reference of the victim.

    ``reference(x)`` returns the victim's answers (posteriors or labels) *without* charging any
    budget: it is the researcher's ground truth, not the attacker's oracle. ``x_heldout`` are
    natural inputs the attacker never queried; ``x_uniform`` inputs drawn uniformly from the
    input domain (Tramèr et al.'s two fidelity measures, 1 - R_test and 1 - R_unif).
    ``y_heldout`` (true labels) adds the stolen model's accuracy.
    """

    reference: Callable[[np.ndarray], np.ndarray] | Any  # a callable, or an oracle (its query())
    x_heldout: np.ndarray
    x_uniform: np.ndarray | None = None
    y_heldout: np.ndarray | None = None

    def __post_init__(self) -> None:
        ref = self.reference.query if hasattr(self.reference, "query") else self.reference
        self._ref_heldout = as_labels(ref(np.asarray(self.x_heldout, dtype=np.float32)))
        self._ref_uniform = (None if self.x_uniform is None
                             else as_labels(ref(np.asarray(self.x_uniform, dtype=np.float32))))

    @classmethod
    def uniform_inputs(cls, n: int, shape: tuple[int, ...], low: float, high: float, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).uniform(low, high, size=(n, *shape)).astype(np.float32)

    def __call__(self, model: Predictor) -> dict[str, float]:
        out = {"fidelity": agreement(self._ref_heldout, model.predict(self.x_heldout))}
        if self.x_uniform is not None and self._ref_uniform is not None:
            out["fidelity_uniform"] = agreement(self._ref_uniform, model.predict(self.x_uniform))
        if self.y_heldout is not None:
            out["accuracy"] = agreement(np.asarray(self.y_heldout), model.predict(self.x_heldout))
            out["victim_accuracy"] = agreement(np.asarray(self.y_heldout), self._ref_heldout)
        return out
