"""The public name of mlcapsule's exception tree.

The classes live in the trusted package, :mod:`mlcapsule.enclave.errors` (the enclave raises
them, so they are measured code); this module re-exports them so that users write
``from mlcapsule.errors import BudgetExhausted`` without reaching into the enclave package.
The classes are the same objects under both names.
"""

from .enclave.errors import *  # noqa: F403
