"""Membership inference: is ``x`` in the victim's training set? Scores and attacks.

Every score is "higher means more likely a member":

* ``"entropy"`` — Salem et al. (NDSS 2019), the MLCapsule paper's attack: ``-H(P(x))``; a
  model is more confident on what it was trained on;
* ``"max_posterior"`` — ``max_k P_k(x)`` (Salem et al.'s other threshold attack);
* ``"modified_entropy"`` — Song & Mittal (USENIX Security 2021): ``-Mentr(P(x), y)`` with
  ``Mentr = -(1 - P_y) log P_y - Σ_{k≠y} P_k log(1 - P_k)``; needs the true label ``y`` and is
  monotone in the correctness of the prediction, unlike the entropy;
* ``"loss"`` — ``log P_y(x)`` (Yeom et al.'s loss attack), needs ``y``;
* ``"gap"`` — the label-only gap attack (Yeom et al.; Choquette-Choo et al.): 1 when the
  predicted label is right, 0 otherwise. It needs only labels, so no confidence masking stops
  it; its AUC is ``(1 + train accuracy - test accuracy) / 2``.

:func:`membership_report` turns member and non-member scores into AUC, max(AUC, 1 - AUC),
TPR at 1 % FPR and the best threshold accuracy; :class:`ThresholdAttack` picks a threshold on
data the attacker labelled itself (e.g. a shadow model's) and applies it;
:func:`membership_inference` queries an oracle and reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UsageError
from ._run import spend
from .metrics import best_auc, entropy, roc_auc, roc_curve, tpr_at_fpr
from .oracle import Oracle, as_labels, is_label_output
from .results import STOP_DONE, AttackResult

__all__ = ["SCORES", "membership_scores", "membership_report", "MembershipReport", "ThresholdAttack",
           "membership_inference"]

#: Score names; those in ``NEEDS_LABELS`` need the true labels.
SCORES = ("entropy", "max_posterior", "modified_entropy", "loss", "gap")
NEEDS_LABELS = frozenset({"modified_entropy", "loss", "gap"})
_EPS = 1e-30


def membership_scores(answers: np.ndarray, kind: str = "entropy", labels: np.ndarray | None = None) -> np.ndarray:
    """Membership scores (higher: more likely a member) from the victim's answers."""
    if kind not in SCORES:
        raise UsageError(f"unknown membership score {kind!r}; choose from {', '.join(SCORES)}")
    if kind in NEEDS_LABELS and labels is None:
        raise UsageError(f"the {kind!r} score needs the true labels")
    y = np.asarray(answers)
    if kind == "gap":
        assert labels is not None
        return (as_labels(y) == np.asarray(labels).ravel()).astype(np.float64)
    if is_label_output(y):
        raise UsageError(f"the {kind!r} score needs posteriors; the oracle answers labels only",
                         hint="use the label-only 'gap' score")
    p = np.clip(np.asarray(y, dtype=np.float64).reshape(len(y), -1), 0.0, 1.0)
    if kind == "entropy":
        return np.asarray(-entropy(p))
    if kind == "max_posterior":
        return np.asarray(p.max(axis=1))
    assert labels is not None
    idx = np.asarray(labels, dtype=np.int64).ravel()
    py = p[np.arange(len(p)), idx]
    if kind == "loss":
        return np.asarray(np.log(np.maximum(py, _EPS)))
    # Song & Mittal's modified entropy.
    others = -(p * np.log(np.maximum(1.0 - p, _EPS)))
    others[np.arange(len(p)), idx] = 0.0
    mentr = -(1.0 - py) * np.log(np.maximum(py, _EPS)) + others.sum(axis=1)
    return np.asarray(-mentr)


@dataclass(frozen=True)
class MembershipReport:
    auc: float
    best_auc: float  # max(AUC, 1 - AUC)
    tpr_at_1pct_fpr: float
    best_accuracy: float  # the best balanced accuracy of any threshold (an optimistic figure)
    best_threshold: float
    members: int
    non_members: int

    def as_dict(self) -> dict[str, float]:
        return {"auc": self.auc, "best_auc": self.best_auc, "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
                "best_accuracy": self.best_accuracy, "best_threshold": self.best_threshold,
                "members": float(self.members), "non_members": float(self.non_members)}


def membership_report(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> MembershipReport:
    m = np.asarray(member_scores, dtype=np.float64).ravel()
    n = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    s = np.concatenate([m, n])
    lab = np.concatenate([np.ones(len(m), bool), np.zeros(len(n), bool)])
    fpr, tpr, thr = roc_curve(s, lab)
    balanced = (tpr + 1.0 - fpr) / 2.0
    i = int(np.argmax(balanced))
    return MembershipReport(auc=roc_auc(s, lab), best_auc=best_auc(s, lab), tpr_at_1pct_fpr=tpr_at_fpr(s, lab, 0.01),
                            best_accuracy=float(balanced[i]), best_threshold=float(thr[i]), members=len(m),
                            non_members=len(n))


@dataclass
class ThresholdAttack:
    """Salem et al.'s threshold attack: member iff ``score >= threshold_``.

    :meth:`fit` chooses the threshold that maximises balanced accuracy on scores whose
    membership the attacker knows (a shadow model's members and non-members, or a held-out
    guess); :meth:`fit_percentile` puts it at a percentile of non-member scores (Salem's
    data-free variant: e.g. the 90th percentile gives a 10 % FPR on that distribution)."""

    kind: str = "entropy"
    threshold_: float | None = None

    def fit(self, member_scores: np.ndarray, nonmember_scores: np.ndarray) -> ThresholdAttack:
        self.threshold_ = membership_report(member_scores, nonmember_scores).best_threshold
        return self

    def fit_percentile(self, nonmember_scores: np.ndarray, percentile: float = 90.0) -> ThresholdAttack:
        self.threshold_ = float(np.percentile(np.asarray(nonmember_scores, np.float64), percentile))
        return self

    def predict(self, scores: np.ndarray) -> np.ndarray:
        if self.threshold_ is None:
            raise UsageError("fit the threshold first")
        return np.asarray(scores) >= self.threshold_


def membership_inference(oracle: Oracle, members: np.ndarray, non_members: np.ndarray, *,
                         kinds: tuple[str, ...] = ("entropy", "max_posterior"),
                         member_labels: np.ndarray | None = None,
                         non_member_labels: np.ndarray | None = None, batch_size: int = 100) -> AttackResult:
    """Query the oracle on candidate members and non-members (each row is charged), in batches
    of ``batch_size``, score them with each of ``kinds`` and report. Labels are needed for
    ``modified_entropy``, ``loss`` and ``gap``. If a budget ends the queries, the candidates
    answered so far are scored."""
    x = np.concatenate([np.asarray(members), np.asarray(non_members)])
    truth = np.concatenate([np.ones(len(members), bool), np.zeros(len(non_members), bool)])
    labels: np.ndarray | None = None
    if member_labels is not None and non_member_labels is not None:
        labels = np.concatenate([np.asarray(member_labels), np.asarray(non_member_labels)])
    # Interleave members and non-members so that a budget that runs out leaves both kinds.
    order = np.random.default_rng(0).permutation(len(x))
    answers: list[np.ndarray] = []
    stopped = STOP_DONE
    for start in range(0, len(order), max(1, batch_size)):
        _, ay, stopped = spend(oracle, x[order[start:start + batch_size]])
        if len(ay):
            answers.append(np.asarray(ay))
        if stopped != STOP_DONE:
            break
    k = sum(len(a) for a in answers)
    ay = np.concatenate(answers) if answers else np.empty((0,))
    idx, truth_k = order[:k], truth[order[:k]]
    metrics: dict[str, float] = {}
    scores: dict[str, Any] = {}
    for kind in kinds if k else ():
        s = membership_scores(ay, kind, None if labels is None else labels[idx])
        scores[kind] = s
        if truth_k.any() and not truth_k.all():
            rep = membership_report(s[truth_k], s[~truth_k])
            for name, value in rep.as_dict().items():
                if name not in ("members", "non_members"):
                    metrics[f"{kind}.{name}"] = value
    return AttackResult("membership-inference", queries_spent=oracle.queries_spent, stopped=stopped,
                        params={"kinds": list(kinds), "members": len(members), "non_members": len(non_members)},
                        metrics=metrics, extra={"scores": scores, "is_member": truth_k, "indices": idx})
