"""Metrics, in numpy only: fidelity and accuracy for extraction, ROC metrics for membership.

* :func:`agreement` — the fraction of rows on which two label vectors agree (fidelity when
  one is the victim's, accuracy when one is the ground truth).
* :func:`roc_curve`, :func:`roc_auc` — exact ROC and its area, ties counted half (the
  Mann-Whitney statistic), so a score that takes few values (the label-only gap attack's 0/1)
  gets its true AUC.
* :func:`best_auc` — max(AUC, 1 - AUC): an inverted score leaks as much as a straight one.
* :func:`tpr_at_fpr` — the true-positive rate at a false-positive rate of at most ``fpr``
  (1 % by default, Carlini et al.'s "low-FPR" figure).
* :func:`jensen_shannon` — JSD between rows of two posterior matrices (natural log).
"""

from __future__ import annotations

import numpy as np

__all__ = ["agreement", "roc_curve", "roc_auc", "best_auc", "tpr_at_fpr", "jensen_shannon", "entropy"]


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of equal entries of two label vectors (1.0 for two empty vectors)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"label vectors differ in length: {a.shape[0]} and {b.shape[0]}")
    return float(np.mean(a == b)) if a.size else 1.0


def _split(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.shape[0]} scores for {y.shape[0]} labels")
    if not y.any() or y.all():
        raise ValueError("ROC metrics need both positive and negative examples")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s, y


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): predicting positive when ``score >= threshold``, for every
    distinct score from the highest down; starts at (0, 0) with threshold +inf."""
    s, y = _split(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last index of each tie group
    tps = np.cumsum(y)[last_of_run]
    fps = (last_of_run + 1) - tps
    tpr = np.r_[0.0, tps / y.sum()]
    fpr = np.r_[0.0, fps / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[last_of_run]]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random
    negative, ties counting one half (computed from ranks, O(n log n))."""
    s, y = _split(scores, labels)
    # Average ranks (1-based) with ties sharing the mean of their positions.
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0  # mean of positions start+1 .. end
    ranks[order] = np.repeat(avg, ends - starts)
    n_pos = float(y.sum())
    n_neg = float(y.size - n_pos)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def best_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """max(AUC, 1 - AUC): a score that ranks members *below* non-members still leaks."""
    auc = roc_auc(scores, labels)
    return max(auc, 1.0 - auc)


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float = 0.01) -> float:
    """The highest TPR among the thresholds whose FPR is at most ``fpr``."""
    f, t, _ = roc_curve(scores, labels)
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (natural log) of each distribution along ``axis``; 0·log 0 = 0."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.asarray(-terms.sum(axis=axis))


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (natural log, in [0, log 2]) between matching rows."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    m = (p + q) / 2.0
    return np.asarray(entropy(m) - (entropy(p) + entropy(q)) / 2.0)
