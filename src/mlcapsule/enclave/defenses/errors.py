"""The defenses' errors, on the project's one exception tree (:mod:`mlcapsule.enclave.errors`).

They live here until they are merged into ``enclave/errors.py``; the names, bases and exit codes
are the ones to keep when they move.

* :class:`DefenseSpecError` (a :class:`UsageError`, exit 2): a defense spec or a policy dict that
  is not a valid defense policy (an unknown defense, a bad parameter). Raised at pack time on the
  provider's command line, and again at load if a signed manifest carries one (the loader may
  wrap it in a ``FormatError``).
* :class:`DefenseGrantError` (a :class:`PolicyError`, exit 6): a license grant that would loosen
  the capsule's defenses.
* :class:`DefenseError` (exit 12): a query refused by a defense (action ``refuse``), and its
  subclass :class:`DefenseLockedError`: the license is locked by a defense (action ``lock``)
  until the provider's unlock voucher is applied.
"""

from __future__ import annotations

from ..errors import MlcapsuleError, PolicyError, UsageError

#: The exit code of :class:`DefenseError` (to add to ``EXIT_CODES``).
DEFENSE_EXIT_CODE = 12


class DefenseSpecError(UsageError):
    """A defense spec or policy that is not valid: unknown defense, bad or missing parameter."""

    default_hint = "see docs/defenses.md for the defenses and their parameters, e.g. --defense prada:delta=0.9"


class DefenseGrantError(PolicyError):
    """A license grant that would loosen the capsule's defense policy."""

    default_hint = "a grant may only tighten the capsule's defenses; ask the provider for a corrected license"


class DefenseError(MlcapsuleError):
    """A defense refused the query (the query was charged: the budget is charged before inference)."""

    exit_code = DEFENSE_EXIT_CODE
    default_hint = ("the capsule's defenses flagged this query stream as an attack; "
                    "the provider sees the alarm after the next `mlcapsule sync`")


class DefenseLockedError(DefenseError):
    """A defense locked the license: every query is refused until the provider's unlock voucher."""

    default_hint = "ask the provider for an unlock voucher and apply it with `mlcapsule topup`"
