"""A capsule as an ART ``BlackBoxClassifier`` (adversarial-robustness-toolbox >= 1.17).

:func:`art_classifier` wraps a capsule opened with :func:`mlcapsule.open_capsule` (with the dev
key, or set up with a license), any :mod:`mlcapsule.attacks` oracle, or a plain ``fn(x) ->
answers``, so that ART's black-box attacks (KnockoffNets, CopycatCNN, MembershipInferenceBlackBox,
HopSkipJump, ...) run against it::

    from mlcapsule.integrations.art import art_classifier

    with mlcapsule.open_capsule(path, trust=..., unsafe_dev_key=path + ".key") as cap:
        victim = art_classifier(cap, clip_values=(0.0, 16.0))
        thief = KnockoffNets(victim, nb_stolen=500, use_probability=True).extract(x, thieved_classifier=...)
        print(victim.queries_spent, victim.stopped)

Every row ART sends goes through an :class:`~mlcapsule.attacks.CapsuleOracle`: it is charged to
the license (if any) and to the wrapper's own ``budget``, and logged (``victim.oracle.log``).
Label-only answers (a ``label-only`` or degrading defense) reach ART as one-hot rows.

**Refusals surface as mlcapsule errors**, never as zeros that ART would silently train on:

* a budget that runs out (the wrapper's or the license's) raises
  :class:`~mlcapsule.attacks.QueryBudgetExhausted` (a ``BudgetExhaustedError``, exit code 6);
* a defense that refuses a query raises :class:`~mlcapsule.errors.DefenseError` (exit code 12;
  ``DefenseLockedError`` when the license is locked).

The message says the ART attack stopped and after how many queries; ``victim.stopped`` says why
(``"attack budget"``, ``"capsule budget"`` or ``"refused by the defenses"``) and
``victim.queries_spent`` how many rows were answered. ART's own progress is lost: run ART's
attacks with a ``nb_stolen`` (or candidate count) that fits the budget.

ART is imported when :func:`art_classifier` is called, not when this module is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..attacks.oracle import CallableOracle, CapsuleOracle, QueryBudgetExhausted, is_label_output
from ..errors import DefenseError, DefenseLockedError, UsageError

__all__ = ["art_classifier", "STOP_REFUSED"]

#: ``victim.stopped`` after a defense refused a query.
STOP_REFUSED = "refused by the defenses"

_CLASS: Any = None


def _art_class() -> Any:
    """The ``BlackBoxClassifier`` subclass, built once, when ART is first needed."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    try:
        from art.estimators.classification import BlackBoxClassifier
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UsageError(f"the ART interop needs adversarial-robustness-toolbox ({e})",
                         hint="pip install 'mlcapsule[attacks]'") from e

    class CapsuleClassifier(BlackBoxClassifier):
        """An ART black-box classifier whose predictions are a capsule's (or an oracle's) answers."""

        oracle: Any
        stopped: str | None
        refusal: Exception | None

        @property
        def queries_spent(self) -> int:
            return int(self.oracle.queries_spent)

    _CLASS = CapsuleClassifier
    return _CLASS


def _as_oracle(victim: Any, budget: int | None, max_batch: int) -> Any:
    if hasattr(victim, "query") and hasattr(victim, "log") and hasattr(victim, "queries_spent"):
        if budget is not None:
            raise UsageError("budget= goes with a capsule or a callable; an oracle carries its own budget")
        return victim
    if hasattr(victim, "predict") and hasattr(victim, "manifest"):
        return CapsuleOracle(victim, budget=budget, max_batch=max_batch)
    if callable(victim):
        return CallableOracle(victim, budget=budget)
    raise UsageError(f"cannot wrap {type(victim).__name__} as an ART classifier",
                     hint="pass a capsule from mlcapsule.open_capsule, an mlcapsule.attacks oracle or a callable")


def _manifest_shapes(victim: Any) -> tuple[tuple[int, ...] | None, int | None]:
    m = getattr(victim, "manifest", None) or getattr(getattr(victim, "capsule", None), "manifest", None)
    if m is None or not m.inputs or not m.outputs:
        return None, None
    dims = m.inputs[0].shape[1:]
    shape = tuple(int(d) for d in dims) if all(isinstance(d, int) and d > 0 for d in dims) else None
    last = m.outputs[0].shape[-1] if m.outputs[0].shape else None
    return shape, int(last) if isinstance(last, int) and last > 0 else None


def art_classifier(victim: Any, *, input_shape: Sequence[int] | None = None, nb_classes: int | None = None,
                   clip_values: tuple[float, float] | None = None, budget: int | None = None,
                   max_batch: int = 1024, **kwargs: Any) -> Any:
    """Wrap ``victim`` (a capsule, an oracle, or ``fn(x) -> answers``) as an ART ``BlackBoxClassifier``.

    ``input_shape`` (one query, without the batch axis) and ``nb_classes`` default to the
    capsule's manifest. ``budget``: the wrapper's own query budget (``None``: unlimited; the
    license's budget applies anyway). ``clip_values`` and the other keyword arguments go to
    ART (``preprocessing``, ``postprocessing_defences``, ...).

    The result is an ART classifier with three more attributes: ``oracle`` (its budget and
    log), ``queries_spent`` and ``stopped`` (``None`` while it answers)."""
    oracle = _as_oracle(victim, budget, max_batch)
    m_shape, m_classes = _manifest_shapes(victim)
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else m_shape
    n_classes = nb_classes if nb_classes is not None else m_classes
    if shape is None or n_classes is None:
        raise UsageError("pass input_shape= and nb_classes= (they cannot be read from a manifest here)")
    cls = _art_class()
    holder: dict[str, Any] = {}

    def predict_fn(x: np.ndarray) -> np.ndarray:
        clf = holder["clf"]
        try:
            y = np.asarray(oracle.query(np.asarray(x, dtype=np.float32)))
        except QueryBudgetExhausted as e:
            clf.stopped = "capsule budget" if e.source == "capsule" else "attack budget"
            clf.refusal = e
            raise QueryBudgetExhausted(f"the ART attack stopped: {e.message}", source=e.source, spent=e.spent,
                                       budget=e.budget, answered_x=e.answered_x, answered_y=e.answered_y) from e
        except DefenseError as e:
            clf.stopped = STOP_REFUSED
            clf.refusal = e
            kind = DefenseLockedError if isinstance(e, DefenseLockedError) else DefenseError
            raise kind(f"the ART attack stopped: the capsule's defenses refused a batch after "
                       f"{oracle.queries_spent} answered queries ({e.message})", hint=e.hint) from e
        return _to_matrix(y, n_classes)

    clf = cls(predict_fn=predict_fn, input_shape=shape, nb_classes=int(n_classes), clip_values=clip_values,
              **kwargs)
    clf.oracle = oracle
    clf.stopped = None
    clf.refusal = None
    holder["clf"] = clf
    return clf


def _to_matrix(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Answers as ART wants them: ``[n, classes]`` (labels become one-hot rows)."""
    if is_label_output(y):
        out = np.zeros((len(y), n_classes), dtype=np.float32)
        out[np.arange(len(y)), y.astype(np.int64)] = 1.0
        return out
    y = np.asarray(y, dtype=np.float32).reshape(len(y), -1)
    if y.shape[1] != n_classes:
        raise UsageError(f"the victim answered {y.shape[1]} values per row; the classifier has {n_classes} classes")
    return y


#: What :func:`art_classifier` accepts besides a capsule or an oracle.
Answerer = Callable[[np.ndarray], np.ndarray]
