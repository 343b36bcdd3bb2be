"""Shokri et al.'s shadow-model membership inference (IEEE S&P 2017).

**Threat model.** The attacker has data from the victim's distribution (disjoint from the
victim's training set) and knows, or imitates, the victim's training procedure. It trains
``k`` *shadow models*, each on its own random "in" set, keeping an equally large "out" set
that the shadow never saw. The shadows' posteriors on their in and out records, labelled
in/out, train an *attack model*; the attack model is then applied to the victim's answers on
the candidate records. Everything but the final queries is offline: the attack costs one query
per candidate.

Attack models (``mode``):

* ``"per_class"`` (Shokri et al.): one binary classifier per class, on the full posterior
  vector of the records of that class. The candidate's true label selects the model (its
  predicted label when the label is unknown); a class without both in and out shadow records
  falls back to one model trained on all classes;
* ``"sorted"`` (Salem et al.'s ML-Leaks simplification): one classifier on the ``top`` largest
  posteriors, sorted, so that it does not depend on the class.

The attack models are small torch MLPs (``hidden=(64,)``) on the posteriors (``log=True``
uses log-posteriors, floored at 1e-12, which separates saturated answers better). A shadow is
trained by ``trainer(x, y, seed)``, which returns anything with ``predict_proba``; by default a
torch MLP with ``hidden=(128,)`` trained without regularisation, which overfits like an
unregularised victim. Pass the victim's recipe when it is known (Shokri et al.'s "same
platform" setting).

The scores are the attack model's probability of "in"; :func:`shadow_membership` reports them
with :func:`mlcapsule.attacks.membership_report` (AUC, max(AUC, 1 - AUC), TPR at 1 % FPR).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UsageError
from ._run import check_posteriors, spend
from .membership import membership_report, membership_scores
from .oracle import Oracle
from .results import STOP_DONE, AttackResult, Predictor

__all__ = ["ShadowModel", "ShadowAttack", "ShadowTrainer", "train_shadow_models", "fit_shadow_attack",
           "shadow_membership", "shadow_model_attack", "torch_trainer"]

#: Trains one shadow model: ``(x, y, seed) -> model`` with ``predict_proba``.
ShadowTrainer = Callable[[np.ndarray, np.ndarray, int], Any]
_FLOOR = 1e-12


@dataclass
class ShadowModel:
    """One shadow: the trained model and the attacker's data indices it was (not) trained on."""

    model: Any
    in_idx: np.ndarray
    out_idx: np.ndarray
    train_accuracy: float
    test_accuracy: float


def torch_trainer(hidden: Sequence[int] = (128,), *, epochs: int = 200, lr: float = 1e-3, batch_size: int = 32,
                  weight_decay: float = 0.0) -> ShadowTrainer:
    """A shadow trainer: a torch MLP on the labels (no regularisation by default)."""

    def fit(x: np.ndarray, y: np.ndarray, seed: int) -> Predictor:
        from .substitute import mlp, train

        n_classes = int(np.max(y)) + 1
        module = mlp(int(np.prod(x.shape[1:])), hidden, n_classes, seed=seed)
        return train(module, x.reshape(len(x), -1), np.asarray(y, np.int64), epochs=epochs, lr=lr,
                     batch_size=batch_size, weight_decay=weight_decay, seed=seed)

    return fit


def _posteriors(model: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    p = np.asarray(model.predict_proba(np.asarray(x, np.float32)), dtype=np.float64)
    if p.shape[1] != n_classes:  # a shadow that never saw some class: scikit-learn drops its column
        classes = np.asarray(getattr(model, "classes_", np.arange(p.shape[1])), dtype=np.int64)
        full = np.zeros((len(p), n_classes))
        full[:, classes] = p
        p = full
    return p


def train_shadow_models(x: np.ndarray, y: np.ndarray, *, k: int = 4, train_size: int | None = None,
                        n_classes: int | None = None, trainer: ShadowTrainer | None = None,
                        seed: int = 0) -> list[ShadowModel]:
    """Train ``k`` shadows on the attacker's data ``(x, y)``: each on ``train_size`` random
    records ("in"; default a third of the data), with as many others held out ("out").
    Different shadows draw independently, so their sets overlap, as in Shokri et al."""
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int64).ravel()
    if len(x) != len(y):
        raise UsageError(f"{len(x)} records but {len(y)} labels")
    size = train_size if train_size is not None else len(x) // 3
    if k < 1 or size < 1 or 2 * size > len(x):
        raise UsageError(f"k = {k} shadows of {size} in + {size} out records need k >= 1 and at most "
                         f"{len(x)} // 2 per set")
    n_classes = n_classes if n_classes is not None else int(y.max()) + 1
    fit = trainer or torch_trainer()
    rng = np.random.default_rng(seed)
    shadows = []
    for i in range(k):
        order = rng.permutation(len(x))
        inn, out = order[:size], order[size:2 * size]
        model = fit(x[inn], y[inn], seed + i)
        acc_in = float(np.mean(_posteriors(model, x[inn], n_classes).argmax(1) == y[inn]))
        acc_out = float(np.mean(_posteriors(model, x[out], n_classes).argmax(1) == y[out]))
        shadows.append(ShadowModel(model, inn, out, acc_in, acc_out))
    return shadows


def _features(p: np.ndarray, mode: str, top: int, log: bool) -> np.ndarray:
    f = np.sort(p, axis=1)[:, ::-1][:, :top] if mode == "sorted" else p
    return np.log(np.maximum(f, _FLOOR)) if log else f


@dataclass
class ShadowAttack:
    """The trained attack models; :meth:`scores` gives P(member) per answer."""

    mode: str
    n_classes: int
    top: int
    log: bool
    pooled: Any  # the model over all classes (the only one in "sorted" mode)
    per_class: dict[int, Any] = field(default_factory=dict)
    training: dict[str, float] = field(default_factory=dict)

    def scores(self, posteriors: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        p = np.asarray(posteriors, np.float64).reshape(len(posteriors), -1)
        f = _features(p, self.mode, self.top, self.log).astype(np.float32)
        out = self.pooled.predict_proba(f)[:, 1] if len(f) else np.empty((0,))
        if self.mode == "per_class":
            lab = p.argmax(axis=1) if labels is None else np.asarray(labels, np.int64).ravel()
            for c, model in self.per_class.items():
                rows = lab == c
                if rows.any():
                    out[rows] = model.predict_proba(f[rows])[:, 1]
        return np.asarray(out, np.float64)


def fit_shadow_attack(shadows: Sequence[ShadowModel], x: np.ndarray, y: np.ndarray, *, mode: str = "per_class",
                      top: int = 3, log: bool = False, hidden: Sequence[int] = (64,), epochs: int = 100,
                      lr: float = 1e-3, seed: int = 0, n_classes: int | None = None) -> ShadowAttack:
    """Train the attack model(s) on the shadows' posteriors on their in (label 1) and out
    (label 0) records; ``(x, y)`` is the attacker's data the shadows were drawn from."""
    from .substitute import mlp, train

    if mode not in ("per_class", "sorted"):
        raise UsageError(f"mode must be 'per_class' or 'sorted', got {mode!r}")
    if not shadows:
        raise UsageError("no shadow models")
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int64).ravel()
    n_classes = n_classes if n_classes is not None else int(y.max()) + 1
    posts, member, cls = [], [], []
    for s in shadows:
        for idx, flag in ((s.in_idx, 1), (s.out_idx, 0)):
            posts.append(_posteriors(s.model, x[idx], n_classes))
            member.append(np.full(len(idx), flag, np.int64))
            cls.append(y[idx])
    p = np.concatenate(posts)
    f = _features(p, mode, top, log).astype(np.float32)
    m, c = np.concatenate(member), np.concatenate(cls)

    def fit(rows: np.ndarray, s: int) -> Any:
        module = mlp(f.shape[1], hidden, 2, seed=s)
        return train(module, f[rows], m[rows], epochs=epochs, lr=lr, batch_size=64, seed=s)

    pooled = fit(np.ones(len(f), bool), seed)
    per_class: dict[int, Any] = {}
    if mode == "per_class":
        for k in range(n_classes):
            rows = c == k
            if rows.sum() >= 4 and 0 < m[rows].sum() < rows.sum():
                per_class[k] = fit(rows, seed + 1 + k)
    attack = ShadowAttack(mode, n_classes, top, log, pooled, per_class)
    s_train = attack.scores(p, c)
    rep = membership_report(s_train[m == 1], s_train[m == 0])
    attack.training = {"records": float(len(f)), "auc": rep.auc,
                       "shadow_train_accuracy": float(np.mean([s.train_accuracy for s in shadows])),
                       "shadow_test_accuracy": float(np.mean([s.test_accuracy for s in shadows]))}
    return attack


def shadow_membership(oracle: Oracle, attack: ShadowAttack, members: np.ndarray, non_members: np.ndarray, *,
                      member_labels: np.ndarray | None = None, non_member_labels: np.ndarray | None = None,
                      batch_size: int = 100, compare: Sequence[str] = ("entropy",)) -> AttackResult:
    """Query the candidates (each row charged, members and non-members interleaved, in batches
    of ``batch_size``), score the answers with the shadow attack and report; ``compare`` adds
    the same report for threshold scores of :func:`membership_scores`. A budget that ends the
    queries leaves the candidates answered so far."""
    x = np.concatenate([np.asarray(members, np.float32), np.asarray(non_members, np.float32)])
    truth = np.concatenate([np.ones(len(members), bool), np.zeros(len(non_members), bool)])
    labels = None
    if member_labels is not None and non_member_labels is not None:
        labels = np.concatenate([np.asarray(member_labels), np.asarray(non_member_labels)]).astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    answers: list[np.ndarray] = []
    stopped = STOP_DONE
    for start in range(0, len(order), max(1, batch_size)):
        _, ay, stopped = spend(oracle, x[order[start:start + batch_size]])
        if len(ay):
            answers.append(check_posteriors(np.asarray(ay), "the shadow-model attack"))
        if stopped != STOP_DONE:
            break
    n = sum(len(a) for a in answers)
    idx = order[:n]
    truth_n = truth[idx]
    metrics: dict[str, float] = {}
    scores: dict[str, np.ndarray] = {}
    if n:
        p = np.concatenate(answers)
        lab = None if labels is None else labels[idx]
        scores["shadow"] = attack.scores(p, lab)
        for kind in compare:
            scores[kind] = membership_scores(p, kind, lab)
        if truth_n.any() and not truth_n.all():
            for kind, s in scores.items():
                for name, value in membership_report(s[truth_n], s[~truth_n]).as_dict().items():
                    if name not in ("members", "non_members"):
                        metrics[f"{kind}.{name}"] = value
    return AttackResult("shokri-shadow-models", queries_spent=oracle.queries_spent, stopped=stopped,
                        params={"mode": attack.mode, "members": len(members), "non_members": len(non_members),
                                "attack_training": dict(attack.training)},
                        metrics=metrics, extra={"scores": scores, "is_member": truth_n, "indices": idx,
                                                "attack": attack})


def shadow_model_attack(oracle: Oracle, shadow_x: np.ndarray, shadow_y: np.ndarray, members: np.ndarray,
                        non_members: np.ndarray, *, k: int = 4, train_size: int | None = None,
                        trainer: ShadowTrainer | None = None, mode: str = "per_class", log: bool = False,
                        member_labels: np.ndarray | None = None, non_member_labels: np.ndarray | None = None,
                        n_classes: int | None = None, seed: int = 0, **attack_kwargs: Any) -> AttackResult:
    """The whole attack: :func:`train_shadow_models` on ``(shadow_x, shadow_y)``,
    :func:`fit_shadow_attack`, then :func:`shadow_membership` against the oracle."""
    shadows = train_shadow_models(shadow_x, shadow_y, k=k, train_size=train_size, n_classes=n_classes,
                                  trainer=trainer, seed=seed)
    attack = fit_shadow_attack(shadows, shadow_x, shadow_y, mode=mode, log=log, seed=seed, n_classes=n_classes,
                               **attack_kwargs)
    res = shadow_membership(oracle, attack, members, non_members, member_labels=member_labels,
                            non_member_labels=non_member_labels)
    res.params.update({"k": k, "train_size": train_size if train_size is not None else len(shadow_x) // 3,
                       "seed": seed})
    res.extra["shadows"] = shadows
    return res
