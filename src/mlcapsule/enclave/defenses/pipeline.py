"""The defense pipeline: input detectors -> (the model's outputs) -> output transforms -> answer.

One pure entry, :func:`apply`, given the policy, the client's :class:`DefenseState`, a batch of
model inputs and the model's outputs for them (and the kennen-io detector's scores and the OOD
statistics when the policy has those detectors). It returns a :class:`PipelineResult`: the
answer to release (``None`` when refused), the new state, the alarms raised, and the refusal to
raise, if any. The caller persists the state and records the alarms in the receipt chain
*before* it raises the refusal, the way the ledger's ``Refuse`` effect comes after the effects
before it, so a refused query still moves the detectors and its alarm is never lost.

Rules:

* **Detectors** run on every row, in order (kennen, prada, ood), each with a per-row verdict.
  The predicted class PRADA uses is the argmax of the model's own output.
* **Alarms** are edges: a detector raises an :class:`Alarm` when its verdict goes from clear to
  flagged (at most one per detector per batch). The state counts every flagged query per
  detector, so the provider sees how long an episode lasted.
* **Actions**, per detector:
  ``record`` answers as usual; ``degrade`` makes every later answer label-only (sticky, in the
  state; the whole batch that raised it is answered with labels only); ``refuse`` refuses every
  batch in which the detector is flagged on some row (not sticky: when the stream looks benign
  again, answers resume); ``lock`` sets the state's lock: this batch and every later one is
  refused, without running the detectors, until :func:`unlock` with the provider's next unlock
  voucher. A batch is answered whole or refused whole, as the budget charges it.
* **Refused queries are charged**: the budget is charged before inference, and a refusal does
  not give the charge back (otherwise refusals would be free probes). :func:`precheck` tells,
  before inference, whether a batch will be refused for a lock, so the worker need not run
  the model.
* The answer is :func:`.outputs.transform` of the model's outputs, with label-only forced by
  ``degrade``. Nothing undefended leaves this module: errors carry no output values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import RollbackError
from . import _blob, ood as _ood, prada as _prada
from .errors import DefenseError, DefenseLockedError, DefenseSpecError
from .outputs import transform
from .policy import DefensePolicy

_MAGIC = b"MLCS"
_VERSION = 1
_MAX_COUNTER = 1 << 62
DETECTORS = ("kennen", "prada", "ood")


@dataclass(frozen=True)
class Alarm:
    """A detector's verdict going from clear to flagged, for the receipt chain."""

    detector: str  # "kennen", "prada" or "ood"
    query: int  # the index of the query in the client's stream (0-based, all queries the pipeline saw)
    statistic: float  # kennen: the score; prada: Shapiro-Wilk W; ood: hits in the window
    threshold: float  # kennen: the threshold; prada: delta; ood: the critical count
    action: str  # record, degrade, refuse or lock

    def to_dict(self) -> dict[str, Any]:
        return {"detector": self.detector, "query": self.query, "statistic": _finite(self.statistic),
                "threshold": _finite(self.threshold), "action": self.action}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alarm:
        try:
            alarm = cls(str(data["detector"]), int(data["query"]), float(data["statistic"]),
                        float(data["threshold"]), str(data["action"]))
        except (KeyError, TypeError, ValueError):
            raise DefenseSpecError("a malformed alarm record") from None
        return alarm


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass
class DefenseState:
    """Everything the defenses remember about one client, sealed with the license state."""

    queries: int = 0  # rows seen by the pipeline (answered or refused)
    refused: int = 0  # rows refused
    locked: bool = False
    degraded: bool = False
    unlock_seq: int = 0  # the last unlock voucher applied (the next must be unlock_seq + 1)
    flagged: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(DETECTORS, False))
    alarms: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DETECTORS, 0))
    flagged_queries: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DETECTORS, 0))
    prada: _prada.PradaState | None = None
    ood: _ood.OodState | None = None

    @classmethod
    def new(cls, policy: DefensePolicy) -> DefenseState:
        state = cls()
        state._fit(policy)
        return state

    def _fit(self, policy: DefensePolicy) -> None:
        """Create the detector states the policy needs (a grant may add detectors)."""
        if policy.prada is not None and self.prada is None:
            self.prada = _prada.PradaState.new(policy.prada)
        if policy.ood is not None and self.ood is None:
            self.ood = _ood.OodState.new(policy.ood)

    def summary(self) -> dict[str, Any]:
        """JSON-able counters for ``status`` and the receipts (no stored queries)."""
        return {"queries": self.queries, "refused": self.refused, "locked": self.locked, "degraded": self.degraded,
                "unlock_seq": self.unlock_seq, "alarms": dict(self.alarms),
                "flagged_queries": dict(self.flagged_queries), "flagged": dict(self.flagged),
                "prada_stored": self.prada.stored if self.prada is not None else 0}

    def to_bytes(self) -> bytes:
        fields = {"queries": self.queries, "refused": self.refused, "locked": self.locked,
                  "degraded": self.degraded, "unlock_seq": self.unlock_seq, "flagged": self.flagged,
                  "alarms": self.alarms, "flagged_queries": self.flagged_queries}
        arrays = {}
        if self.prada is not None:
            arrays["prada"] = np.frombuffer(self.prada.to_bytes(), np.uint8)
        if self.ood is not None:
            arrays["ood"] = np.frombuffer(self.ood.to_bytes(), np.uint8)
        return _blob.pack(_MAGIC, _VERSION, fields, arrays)

    @classmethod
    def from_bytes(cls, blob: bytes, policy: DefensePolicy) -> DefenseState:
        """The state of :meth:`to_bytes`, checked against the policy (its caps, its detectors)."""
        what = "defense state"
        fields, arrays = _blob.unpack(blob, _MAGIC, _VERSION, what, max_dims=1)
        if set(arrays) - {"prada", "ood"}:
            raise _blob.damaged(what, "unknown parts")
        state = cls()
        state.queries = _blob.get_int(fields, "queries", 0, _MAX_COUNTER, what)
        state.refused = _blob.get_int(fields, "refused", 0, state.queries, what)
        state.locked = _blob.get_bool(fields, "locked", what)
        state.degraded = _blob.get_bool(fields, "degraded", what)
        state.unlock_seq = _blob.get_int(fields, "unlock_seq", 0, _MAX_COUNTER, what)
        for name in ("flagged", "alarms", "flagged_queries"):
            table = fields.get(name)
            if not isinstance(table, dict) or set(table) != set(DETECTORS):
                raise _blob.damaged(what, f"bad {name}")
            if name == "flagged":
                state.flagged = {k: _blob.get_bool(table, k, what) for k in DETECTORS}
            else:
                setattr(state, name, {k: _blob.get_int(table, k, 0, state.queries, what) for k in DETECTORS})
        if "prada" in arrays:
            if policy.prada is None:
                raise _blob.damaged(what, "it has PRADA state but the policy has no PRADA")
            state.prada = _prada.PradaState.from_bytes(arrays["prada"].tobytes(), policy.prada)
        if "ood" in arrays:
            if policy.ood is None:
                raise _blob.damaged(what, "it has ood state but the policy has no ood detector")
            state.ood = _ood.OodState.from_bytes(arrays["ood"].tobytes(), policy.ood)
        state._fit(policy)
        return state


@dataclass(frozen=True)
class PipelineResult:
    """The outcome of :func:`apply`. Persist ``state`` and record ``alarms``, then raise ``refusal``."""

    answer: npt.NDArray[np.floating] | None
    state: DefenseState
    alarms: list[Alarm]
    refusal: DefenseError | None = None

    def raise_if_refused(self) -> npt.NDArray[np.floating]:
        """The answer, or raise the refusal (call after persisting the state and the alarms)."""
        if self.refusal is not None:
            raise self.refusal
        assert self.answer is not None
        return self.answer


def _locked_error() -> DefenseLockedError:
    return DefenseLockedError("the license is locked by the capsule's defenses; no query is answered")


def precheck(policy: DefensePolicy, state: DefenseState) -> DefenseError | None:
    """The refusal a batch gets before inference (a lock), or None. The batch is still charged."""
    return _locked_error() if state.locked else None


def unlock(state: DefenseState, voucher_seq: int, *, reset_detectors: bool = False) -> DefenseState:
    """Apply the provider's unlock voucher number ``voucher_seq`` (already verified by the caller).

    Only ``unlock_seq + 1`` is accepted: a replayed or out-of-order voucher raises
    :class:`RollbackError` and changes nothing. The lock and the degradation are lifted. The
    detectors keep their state (so an attack that goes on is not restarted from zero) and their
    verdicts (so a detector still flagged raises no new alarm until it clears), unless
    ``reset_detectors``, which empties PRADA's sets and the OOD window. A voucher applied while
    unlocked only advances the sequence.
    """
    if isinstance(voucher_seq, bool) or not isinstance(voucher_seq, int):
        raise DefenseSpecError("an unlock voucher number must be an integer")
    if voucher_seq <= state.unlock_seq:
        raise RollbackError(f"unlock voucher {voucher_seq} was already applied on this device",
                            hint="each unlock voucher works once; ask the provider for a new one")
    if voucher_seq != state.unlock_seq + 1:
        raise RollbackError(f"unlock voucher {voucher_seq} is out of order: the next one must be number "
                            f"{state.unlock_seq + 1}", hint="apply the provider's unlock vouchers in order")
    state.unlock_seq = voucher_seq
    state.locked = False
    state.degraded = False
    if reset_detectors:
        if state.prada is not None:
            state.prada = _prada.PradaState(window=state.prada.window, d_values=np.zeros(state.prada.window),
                                           d_classes=np.zeros(state.prada.window, np.int32))
        if state.ood is not None:
            state.ood = _ood.OodState(window=state.ood.window, hits=np.zeros(state.ood.window, np.uint8))
        state.flagged = dict.fromkeys(DETECTORS, False)
    return state


def _rows(inputs: npt.ArrayLike, n: int) -> npt.NDArray[np.float32]:
    x = np.asarray(inputs, dtype=np.float32)
    if x.ndim == 0 or x.shape[0] != n:
        raise DefenseSpecError(f"the defenses got {x.shape[0] if x.ndim else 0} inputs for {n} outputs")
    return x.reshape(n, int(np.prod(x.shape[1:])))


def apply(policy: DefensePolicy, state: DefenseState, inputs: npt.ArrayLike, posteriors: npt.ArrayLike, *,
          kennen_scores: npt.ArrayLike | None = None, ood_stats: _ood.OodStats | None = None) -> PipelineResult:
    """Run the policy on one batch: ``inputs`` (n, ...) and the model's ``posteriors`` (n, classes).

    ``kennen_scores`` (n,) are the kennen-io detector's probabilities that each query is a probe
    (required when the policy has ``kennen``); ``ood_stats`` the capsule's statistics (required
    when it has ``ood``). The state is updated in place and returned in the result.
    """
    outputs = np.asarray(posteriors)
    if outputs.ndim != 2:
        raise DefenseSpecError(f"the defenses need the model's outputs as (queries, classes), not {outputs.shape}")
    n = outputs.shape[0]
    state._fit(policy)
    if state.locked:
        state.queries += n
        state.refused += n
        return PipelineResult(None, state, [], _locked_error())
    if not policy.detectors:
        state.queries += n
        return PipelineResult(transform(policy, outputs, labels_only=state.degraded), state, [])

    x = _rows(inputs, n)
    scores = None
    if policy.kennen is not None:
        if kennen_scores is None:
            raise DefenseSpecError("the policy has the kennen detector but no kennen scores were given")
        scores = np.asarray(kennen_scores, dtype=np.float64).reshape(-1)
        if scores.size != n:
            raise DefenseSpecError(f"{scores.size} kennen scores for {n} queries")
    ood_scores = None
    if policy.ood is not None:
        if ood_stats is None:
            raise DefenseSpecError("the policy has the ood detector but the capsule has no ood statistics")
        ood_scores = ood_stats.scores(x) if n else np.zeros(0)
    predicted = np.argmax(outputs, axis=1) if n and outputs.shape[1] else np.zeros(n, np.int64)

    alarms: list[Alarm] = []
    raised: set[str] = set()
    flagged_in_batch: set[str] = set()

    def verdict(name: str, flagged: bool, index: int, statistic: float, threshold: float, action: str) -> None:
        if flagged:
            state.flagged_queries[name] += 1
            flagged_in_batch.add(name)
            if not state.flagged[name] and name not in raised:
                raised.add(name)
                alarms.append(Alarm(name, index, statistic, threshold, action))
        state.flagged[name] = flagged

    for i in range(n):
        index = state.queries
        state.queries += 1
        if policy.kennen is not None and scores is not None:
            s = float(scores[i])
            hit = not s < policy.kennen.threshold  # NaN counts as a probe
            verdict("kennen", hit, index, s, policy.kennen.threshold, policy.kennen.action)
        if policy.prada is not None and state.prada is not None:
            _, pv = _prada.step(policy.prada, state.prada, x[i], int(predicted[i]))
            verdict("prada", pv.flagged, index, pv.statistic, policy.prada.delta, policy.prada.action)
        if policy.ood is not None and state.ood is not None and ood_stats is not None and ood_scores is not None:
            _, ov = _ood.step(policy.ood, ood_stats, state.ood, x[i], float(ood_scores[i]))
            verdict("ood", ov.flagged, index, ov.statistic, ov.threshold, policy.ood.action)

    for alarm in alarms:
        state.alarms[alarm.detector] += 1
    actions = {d.NAME: d.action for d in policy.detectors}
    if any(a.action == "lock" for a in alarms):
        state.locked = True
        state.refused += n
        return PipelineResult(None, state, alarms, _locked_error())
    if any(actions[name] == "refuse" for name in flagged_in_batch):
        state.refused += n
        names = ", ".join(sorted(name for name in flagged_in_batch if actions[name] == "refuse"))
        return PipelineResult(None, state, alarms,
                              DefenseError(f"the capsule's defenses refused this query ({names} detector)"))
    if any(a.action == "degrade" for a in alarms):
        state.degraded = True
    return PipelineResult(transform(policy, outputs, labels_only=state.degraded), state, alarms)
