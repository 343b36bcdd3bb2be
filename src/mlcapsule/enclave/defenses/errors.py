"""The defenses' errors: they live in the project's one exception tree, :mod:`mlcapsule.enclave.errors`
(``DefenseSpecError`` exit 2, ``DefenseGrantError`` exit 6, ``DefenseError`` and
``DefenseLockedError`` exit 12); re-exported here for the defense modules."""

from __future__ import annotations

from ..errors import DefenseError, DefenseGrantError, DefenseLockedError, DefenseSpecError

#: The exit code of :class:`DefenseError`.
DEFENSE_EXIT_CODE = DefenseError.exit_code

__all__ = ["DEFENSE_EXIT_CODE", "DefenseError", "DefenseGrantError", "DefenseLockedError", "DefenseSpecError"]
