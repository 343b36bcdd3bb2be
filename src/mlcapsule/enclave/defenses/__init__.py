"""Defenses inside the enclave (issue 12): pure, typed numpy code with explicit state.

- :mod:`.policy`: :class:`DefensePolicy`, parsed from ``--defense`` specs, signed into the
  manifest as :meth:`DefensePolicy.to_dict`, tightened by license grants (:func:`tighten`);
- :mod:`.outputs`: the paper's Algorithm 1 (membership-inference noise), top-k, rounding,
  label-only;
- :mod:`.prada`: PRADA (Juuti et al.), with :mod:`.shapiro` (Shapiro-Wilk W, AS R94);
- :mod:`.ood`: the out-of-distribution rate detector and its pack-time statistics;
- :mod:`.pipeline`: :func:`apply`, the one entry the worker calls per batch, the actions, the
  sealed :class:`DefenseState` and :func:`unlock`.

docs/defenses.md describes each defense, its assumptions and its weaknesses.
"""

from .errors import DefenseError, DefenseGrantError, DefenseLockedError, DefenseSpecError
from .ood import OodStats, fit_ood_stats
from .outputs import transform
from .pipeline import Alarm, DefenseState, PipelineResult, apply, precheck, unlock
from .policy import ACTIONS, DefensePolicy, parse_spec, tighten

__all__ = [
    "ACTIONS",
    "Alarm",
    "DefenseError",
    "DefenseGrantError",
    "DefenseLockedError",
    "DefensePolicy",
    "DefenseSpecError",
    "DefenseState",
    "OodStats",
    "PipelineResult",
    "apply",
    "fit_ood_stats",
    "parse_spec",
    "precheck",
    "tighten",
    "transform",
    "unlock",
]
