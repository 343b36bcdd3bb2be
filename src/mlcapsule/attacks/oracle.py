"""Oracles: whatever answers a batch of queries, with a query budget and a log of every query.

An attack sees its victim only through :class:`Oracle`: ``query(x)`` takes a batch (the first
axis is the batch) and returns the victim's answers, posteriors ``[n, classes]`` or labels
``[n]``. Every row sent counts as one query, whatever happens to the answer, the way a capsule
charges its budget. Adapters:

* :class:`OnnxOracle`: a plain ONNX model run by ONNX Runtime (no capsule, no budget but the
  attack's own);
* :class:`CapsuleOracle`: a capsule opened with :func:`mlcapsule.open_capsule` (with the dev
  key, or set up with a license, in which case each row is charged to the license budget);
* :class:`CallableOracle`: any ``fn(x) -> answers``.

Two budgets can end an attack, and both end it the same way, with
:class:`QueryBudgetExhausted` (a :class:`mlcapsule.errors.BudgetExhaustedError`):

* the attack's own ``budget`` (``None``: unlimited), checked before anything is sent;
* the capsule's license budget: a :class:`~mlcapsule.errors.BudgetExhaustedError` from the
  enclave. A capsule refuses a whole batch that does not fit the remaining budget, so
  :class:`CapsuleOracle` then asks the capsule how many queries remain and spends exactly those.

In both cases the rows that were answered before the end are in the log and on the exception
(``answered_x``, ``answered_y``), so an attack can still train on everything it paid for. The
oracle's :attr:`~Oracle.log` keeps every query and answer (:class:`QueryLog`).

An optional ``postprocess`` maps the victim's answers before the attack sees them (and before
they are logged): :func:`rounding` and :func:`labels_only` simulate output countermeasures on the
client side, for research; a capsule's own defenses run inside the enclave instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import BudgetExhaustedError, UsageError

__all__ = [
    "Oracle",
    "BaseOracle",
    "OnnxOracle",
    "CapsuleOracle",
    "CallableOracle",
    "QueryLog",
    "QueryRecord",
    "QueryBudgetExhausted",
    "Postprocess",
    "rounding",
    "labels_only",
    "top_k",
    "as_labels",
    "is_label_output",
]

#: Maps a batch of answers to what the attacker is shown.
Postprocess = Callable[[np.ndarray], np.ndarray]


class QueryBudgetExhausted(BudgetExhaustedError):
    """No query left: the attack's own budget, or the capsule's license budget, is spent.

    ``source`` is ``"attack"`` or ``"capsule"``; ``spent`` the queries spent on this oracle when
    it stopped; ``answered_x`` and ``answered_y`` the leading rows of the refused batch that were
    still answered (possibly none).
    """

    default_hint = "the attack stopped at its query budget; raise the budget or buy more queries"

    def __init__(self, message: str, *, source: str, spent: int, budget: int | None,
                 answered_x: np.ndarray | None = None, answered_y: np.ndarray | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.spent = spent
        self.budget = budget
        self.answered_x = answered_x
        self.answered_y = answered_y


@dataclass(frozen=True)
class QueryRecord:
    """One batch sent to the victim: ``x`` [n, ...] and the answers ``y`` the attacker saw."""

    first: int  # the index of its first row among all queries spent (0-based)
    x: np.ndarray
    y: np.ndarray
    seconds: float  # wall time of the call

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


@dataclass
class QueryLog:
    """Every query an oracle answered, in order (``keep_inputs=False`` keeps only the counts)."""

    keep_inputs: bool = True
    records: list[QueryRecord] = field(default_factory=list)
    spent: int = 0

    def append(self, x: np.ndarray, y: np.ndarray, seconds: float) -> None:
        if self.keep_inputs:
            self.records.append(QueryRecord(self.spent, x, y, seconds))
        else:
            self.records.append(QueryRecord(self.spent, x[:0], y[:0], seconds))
        self.spent += int(x.shape[0])

    def __len__(self) -> int:
        return self.spent

    def inputs(self) -> np.ndarray:
        """All queried rows, concatenated (``keep_inputs`` must be on)."""
        return _concat([r.x for r in self.records])

    def outputs(self) -> np.ndarray:
        """All answers, concatenated, aligned with :meth:`inputs`."""
        return _concat([r.y for r in self.records])

    def batch_sizes(self) -> list[int]:
        return [r.n if self.keep_inputs else 0 for r in self.records]


def _concat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    if not arrays:
        return np.empty((0,), dtype=np.float32)
    return np.concatenate(arrays, axis=0)


@runtime_checkable
class Oracle(Protocol):
    """What an attack needs from its victim."""

    @property
    def queries_spent(self) -> int: ...

    @property
    def budget(self) -> int | None: ...

    @property
    def log(self) -> QueryLog: ...

    def query(self, x: np.ndarray) -> np.ndarray:
        """Answer the batch ``x`` (first axis = rows); each row is one query."""
        ...


class BaseOracle:
    """Budget, log and postprocessing around :meth:`_answer`, which subclasses implement.

    ``budget``: the attack's own query budget (``None``: unlimited). ``dtype``: what the
    queries are cast to before they are sent (float32 for ONNX models).
    """

    def __init__(self, *, budget: int | None = None, postprocess: Postprocess | None = None,
                 keep_inputs: bool = True, dtype: Any = np.float32) -> None:
        if budget is not None and (isinstance(budget, bool) or budget < 0):
            raise UsageError(f"budget must be a non-negative integer or None, got {budget!r}")
        self._budget = budget
        self.postprocess = postprocess
        self.dtype = np.dtype(dtype)
        self._log = QueryLog(keep_inputs=keep_inputs)

    @property
    def queries_spent(self) -> int:
        return self._log.spent

    @property
    def budget(self) -> int | None:
        return self._budget

    @property
    def remaining(self) -> int | None:
        """Queries left in the attack's own budget (``None``: unlimited)."""
        return None if self._budget is None else self._budget - self._log.spent

    @property
    def log(self) -> QueryLog:
        return self._log

    def _answer(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _exhausted(self, source: str, x: np.ndarray, y: np.ndarray | None, cause: str) -> QueryBudgetExhausted:
        return QueryBudgetExhausted(f"{cause} after {self.queries_spent} queries", source=source,
                                    spent=self.queries_spent, budget=self._budget, answered_x=x,
                                    answered_y=y)

    def _send(self, x: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        y = np.asarray(self._answer(x))
        if self.postprocess is not None:
            y = np.asarray(self.postprocess(y))
        if y.shape[:1] != x.shape[:1]:
            raise UsageError(f"the oracle answered {y.shape[0] if y.ndim else 0} rows for {x.shape[0]} queries")
        self._log.append(x, y, time.perf_counter() - t0)
        return y

    def query(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if x.ndim == 0:
            raise UsageError("a query batch needs a first (batch) axis")
        n = int(x.shape[0])
        left = self.remaining
        if left is not None and n > left:
            head = x[:left]
            y = self._send(head) if left > 0 else None
            raise self._exhausted("attack", head, y, f"the attack's budget of {self._budget} queries ran out")
        return self._send(x)


# -- postprocessing (client-side simulations of output countermeasures) ---------------------------
def rounding(decimals: int) -> Postprocess:
    """Round posteriors to ``decimals`` decimals (Tramèr et al.'s countermeasure, Section 8)."""
    if decimals < 0:
        raise UsageError(f"decimals must be >= 0, got {decimals}")

    def apply(y: np.ndarray) -> np.ndarray:
        return np.round(np.asarray(y, dtype=np.float64), decimals).astype(np.asarray(y).dtype)

    return apply


def labels_only(y: np.ndarray) -> np.ndarray:
    """Answers reduced to the predicted label (the strongest output countermeasure)."""
    return as_labels(y)


def top_k(k: int) -> Postprocess:
    """Keep the ``k`` largest posteriors of each row, zero the others (not renormalised)."""

    def apply(y: np.ndarray) -> np.ndarray:
        y = np.asarray(y)
        out = np.zeros_like(y)
        idx = np.argsort(-y, axis=1)[:, :k]
        np.put_along_axis(out, idx, np.take_along_axis(y, idx, axis=1), axis=1)
        return out

    return apply


def is_label_output(y: np.ndarray) -> bool:
    """True when answers are labels (one integer per row), false for posteriors."""
    y = np.asarray(y)
    return y.ndim == 1 and (y.dtype.kind in "iu" or y.size == 0)


def as_labels(y: np.ndarray) -> np.ndarray:
    """Labels from answers that are labels already, or posteriors (their argmax)."""
    y = np.asarray(y)
    if y.ndim == 1:
        return y.astype(np.int64)
    if y.ndim == 2 and y.shape[1] == 1:  # one probability column: binary
        return (y[:, 0] > 0.5).astype(np.int64)
    return np.argmax(y.reshape(y.shape[0], -1), axis=1).astype(np.int64)


# -- adapters --------------------------------------------------------------------------------------
class CallableOracle(BaseOracle):
    """``fn(x) -> answers``; ``fn`` may raise :class:`~mlcapsule.errors.BudgetExhaustedError`
    to end the attack as a capsule would."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fn = fn

    def _answer(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.fn(x))

    def query(self, x: np.ndarray) -> np.ndarray:
        try:
            return super().query(x)
        except QueryBudgetExhausted:
            raise
        except BudgetExhaustedError as e:
            raise self._exhausted("capsule", np.asarray(x)[:0], None, f"the victim refused: {e.message}") from e


class OnnxOracle(BaseOracle):
    """A plain ONNX model (a path, serialized bytes or a ``ModelProto``) run with ONNX Runtime.

    The first input is fed; ``output`` names the output returned (default: the first).
    """

    def __init__(self, model: str | os.PathLike[str] | bytes | Any, *, output: str | None = None,
                 threads: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import onnxruntime as ort

        if isinstance(model, (str, os.PathLike)):
            data = Path(model).read_bytes()
        elif isinstance(model, bytes):
            data = model
        else:
            data = model.SerializeToString()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_name = self._session.get_inputs()[0].name
        self.output_name = output or self._session.get_outputs()[0].name

    def _answer(self, x: np.ndarray) -> np.ndarray:
        (y,) = self._session.run([self.output_name], {self.input_name: x})
        return np.asarray(y)


class CapsuleOracle(BaseOracle):
    """A capsule opened with :func:`mlcapsule.open_capsule`; answers are ``capsule.predict(x)``.

    With a license, every row is charged to the license budget. When the enclave refuses a batch
    for lack of budget, the oracle reads the remaining budget from ``capsule.status()``, spends
    it on the batch's leading rows, then raises :class:`QueryBudgetExhausted` (``source``
    ``"capsule"``). ``max_batch`` splits large batches into calls of at most that many rows.
    """

    def __init__(self, capsule: Any, *, max_batch: int = 1024, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.capsule = capsule
        self.max_batch = max_batch

    def capsule_remaining(self) -> int | None:
        """The license's remaining queries (``None``: no license, or no budget)."""
        try:
            status: Mapping[str, Any] = self.capsule.status().get("license_status") or {}
        except Exception:  # a dev-key session, or a capsule that cannot say
            return None
        remaining = status.get("remaining")
        return None if remaining is None else max(0, int(remaining))

    def _answer(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.capsule.predict(x))

    def query(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if x.ndim == 0:
            raise UsageError("a query batch needs a first (batch) axis")
        answers_x: list[np.ndarray] = []
        answers: list[np.ndarray] = []
        for start in range(0, max(1, x.shape[0]), self.max_batch):
            part = x[start:start + self.max_batch]
            try:
                answers.append(BaseOracle.query(self, part))
                answers_x.append(part)
            except QueryBudgetExhausted as e:
                if e.answered_y is not None and e.answered_x is not None:
                    answers.append(e.answered_y)
                    answers_x.append(e.answered_x)
                raise self._stop(e.source, answers_x, answers, e.message) from e
            except BudgetExhaustedError as e:
                left = self.capsule_remaining()
                if left and left < part.shape[0]:
                    try:
                        answers.append(self._send(part[:left]))
                        answers_x.append(part[:left])
                    except BudgetExhaustedError:
                        pass
                raise self._stop("capsule", answers_x, answers, f"the capsule's budget ran out ({e.message})") from e
        return answers[0] if len(answers) == 1 else np.concatenate(answers, axis=0)

    def _stop(self, source: str, xs: list[np.ndarray], ys: list[np.ndarray], cause: str) -> QueryBudgetExhausted:
        x = np.concatenate(xs, axis=0) if xs else None
        y = np.concatenate(ys, axis=0) if ys else None
        return self._exhausted(source, x if x is not None else np.empty((0,)), y, cause)
