"""One exception tree for the whole project.

Every error the project raises on purpose derives from :class:`MlcapsuleError`. Each class has
an ``exit_code`` (documented in the README: the CLI exits with it) and each instance carries a
``hint`` telling the user what to do. The CLI catches :class:`MlcapsuleError` in exactly one
place and prints ``error: <message> (<hint>)`` on one line, with no traceback.

Integrity failures are deliberately opaque: a capsule chunk that fails to authenticate says
only *that* the capsule failed integrity checks, not which byte or which check, so an attacker
learns nothing from the error text (the same rule as pyca's ``InvalidTag``).
"""

from __future__ import annotations


class MlcapsuleError(Exception):
    """Base of every error mlcapsule raises on purpose."""

    exit_code: int = 1
    default_hint: str = "see `mlcapsule --help`"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def diagnostics(self) -> str:
        """One line for a user: what happened and what to do."""
        return f"{self.message} ({self.hint})" if self.hint else self.message


# -- usage -------------------------------------------------------------------------------------
class UsageError(MlcapsuleError):
    """The user asked for something malformed: a missing file, a bad option value."""

    exit_code = 2
    default_hint = "check the command line; `mlcapsule COMMAND --help` lists the options"


class InputError(UsageError):
    """An input file for predict/run cannot be read or does not fit the model."""

    default_hint = "check that the input matches the model's input description (`mlcapsule inspect`)"


# -- format and integrity ---------------------------------------------------------------------
class FormatError(MlcapsuleError):
    """Bytes that do not parse as the format they claim: truncated, absurd lengths, bad JSON."""

    exit_code = 3
    default_hint = "the file is not a valid mlcapsule file or is damaged; fetch it again from the provider"


class UnsupportedVersionError(FormatError):
    """A known magic with a major version this build does not read."""

    default_hint = "upgrade mlcapsule, or ask the provider for a capsule in a version this build reads"


class IntegrityError(MlcapsuleError):
    """Authentication failed: a signature, a hash or an AEAD tag did not verify."""

    exit_code = 4
    default_hint = "the file was modified or damaged; do not use it, fetch it again from the provider"


class SignatureError(IntegrityError):
    """A signature did not verify, or was made by a key that is not trusted."""


# -- keys --------------------------------------------------------------------------------------
class KeyFileError(MlcapsuleError):
    """A key file is missing, malformed, has unsafe permissions, or the passphrase is wrong."""

    exit_code = 5
    default_hint = "check the key file path and passphrase"


# -- policy (license terms) -------------------------------------------------------------------
class PolicyError(MlcapsuleError):
    """The license forbids the request."""

    exit_code = 6
    default_hint = "see `mlcapsule status` for the license terms"


class BudgetExhaustedError(PolicyError):
    default_hint = "buy more queries from the provider and redeem the voucher with `mlcapsule topup`"


class LicenseExpiredError(PolicyError):
    default_hint = "ask the provider to renew the license"


class RollbackError(PolicyError):
    """State older than what the enclave has already seen (sealed state, clock, voucher)."""

    default_hint = "restore the newest state; restoring old state never restores budget"


class NotProvisionedError(PolicyError):
    default_hint = "run `mlcapsule setup CAPSULE --server URL --token TOKEN` first"


# -- attestation and protocol ------------------------------------------------------------------
class AttestationError(MlcapsuleError):
    """Evidence that the verifier does not accept."""

    exit_code = 7
    default_hint = "the enclave's evidence was refused; check the backend and the server's policy"


class ProtocolError(MlcapsuleError):
    """A message between host and enclave, or client and server, broke the protocol."""

    exit_code = 8
    default_hint = "client and enclave or server versions may not match; upgrade mlcapsule"


class EnclaveError(MlcapsuleError):
    """The enclave worker could not start, died, or refused to run."""

    exit_code = 9
    default_hint = "run `mlcapsule status` to see the backend and its hardening"


class TransportError(MlcapsuleError):
    """The provider's server could not be reached or answered with an error."""

    exit_code = 10
    default_hint = "check the server URL and that the server is running"


class ServerError(MlcapsuleError):
    """The server refused a request (raised on the client side with the server's reason)."""

    exit_code = 11
    default_hint = "see the server's reason above"


# -- defenses (issue 12) -------------------------------------------------------------------------
class DefenseSpecError(UsageError):
    """A defense spec or policy that is not valid: unknown defense, bad or missing parameter.
    Raised at pack time on the provider's command line, and again at load if a signed manifest
    carries one."""

    default_hint = "see docs/defenses.md for the defenses and their parameters, e.g. --defense prada:delta=0.9"


class DefenseGrantError(PolicyError):
    """A license grant that would loosen the capsule's defense policy."""

    default_hint = "a grant may only tighten the capsule's defenses; ask the provider for a corrected license"


class DefenseError(MlcapsuleError):
    """A defense refused the query (the query was charged: the budget is charged before inference)."""

    exit_code = 12
    default_hint = ("the capsule's defenses flagged this query stream as an attack; "
                    "the provider sees the alarm after the next `mlcapsule sync`")


class DefenseLockedError(DefenseError):
    """A defense locked the license: every query is refused until the provider's unlock voucher."""

    default_hint = "ask the provider for an unlock voucher and apply it with `mlcapsule topup CAPSULE VOUCHER`"


#: Documented CLI exit codes, for the README and `mlcapsule --help`.
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected internal error (a bug: please report it)",
    2: "usage error: bad command line or input file",
    3: "format error: not a valid or supported mlcapsule file",
    4: "integrity error: a signature, hash or authentication tag failed",
    5: "key error: missing or malformed key, wrong passphrase",
    6: "policy: budget exhausted, license expired, rollback, not provisioned",
    7: "attestation refused",
    8: "protocol error between host, enclave and server",
    9: "enclave could not start or died",
    10: "server unreachable",
    11: "server refused the request",
    12: "defense: a query refused by the capsule's defenses, or the license locked by them",
}
