"""Query streams through the enclave's defense pipeline, run as pure code.

:func:`first_alarms` feeds a stream, one query per batch, to
:func:`mlcapsule.enclave.defenses.pipeline.apply` (the function the enclave worker calls on every
batch) with the detectors' action set to ``record``, and returns the query at which each
detector first raised its alarm. The capsule runs are in the sections; this is the same code
without the worker, for the many streams of the stronger evaluations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["StreamResult", "first_alarms", "ood_stats_for"]


@dataclass
class StreamResult:
    queries: int
    first_alarm: dict[str, int | None] = field(default_factory=dict)  # 1-based query of the first alarm
    flagged_queries: dict[str, int] = field(default_factory=dict)
    min_w: float | None = None  # PRADA's smallest Shapiro-Wilk W over the stream (None: never tested)


def ood_stats_for(x_train: np.ndarray) -> Any:
    """The ood detector's statistics, as ``pack(defense_data=...)`` computes them."""
    from ..enclave.defenses.ood import fit_ood_stats

    return fit_ood_stats(np.asarray(x_train, np.float32).reshape(len(x_train), -1))


def first_alarms(specs: Sequence[str], x: np.ndarray, posteriors: np.ndarray, *, ood_stats: Any = None) -> StreamResult:
    """Run ``x`` (with the model's ``posteriors``) one query at a time through the policy ``specs``."""
    from ..enclave.defenses import prada as _prada
    from ..enclave.defenses.pipeline import DefenseState
    from ..enclave.defenses.policy import DefensePolicy

    policy = DefensePolicy.from_specs(list(specs))
    state = DefenseState.new(policy)
    res = StreamResult(queries=len(x))
    names = [d.NAME for d in policy.detectors]
    res.first_alarm = dict.fromkeys(names)
    flat = np.ascontiguousarray(np.asarray(x, np.float32).reshape(len(x), -1))
    post = np.asarray(posteriors)
    ood_scores = ood_stats.scores(flat) if ood_stats is not None and policy.ood is not None else None
    min_w = np.inf
    from ..enclave.defenses import ood as _ood

    for i in range(len(flat)):
        state.queries += 1
        if policy.prada is not None and state.prada is not None:
            _, pv = _prada.step(policy.prada, state.prada, flat[i], int(np.argmax(post[i])))
            if np.isfinite(pv.statistic):
                min_w = min(min_w, pv.statistic)
            if pv.flagged:
                state.flagged_queries["prada"] += 1
                if res.first_alarm["prada"] is None:
                    res.first_alarm["prada"] = i + 1
        if policy.ood is not None and state.ood is not None and ood_scores is not None:
            _, ov = _ood.step(policy.ood, ood_stats, state.ood, flat[i], float(ood_scores[i]))
            if ov.flagged:
                state.flagged_queries["ood"] += 1
                if res.first_alarm["ood"] is None:
                    res.first_alarm["ood"] = i + 1
    res.flagged_queries = {k: state.flagged_queries[k] for k in names}
    res.min_w = None if not np.isfinite(min_w) else float(min_w)
    return res
