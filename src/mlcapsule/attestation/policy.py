"""What the provider accepts: the attestation policy, and what a verifier returns.

Pure data, no I/O. There is deliberately no permissive default: an :class:`AttestationPolicy`
built with no arguments refuses everything (no backend that only vouches for itself, and an
empty measurement allow-list).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..enclave.errors import AttestationError

#: The server option that turns on ``allow_software``, named in refusals so an operator knows it.
SOFTWARE_OPTION = "--UNSAFE-allow-software-evidence (MLCAPSULE_SERVER_ALLOW_SOFTWARE_EVIDENCE=1)"
MEASUREMENT_HEX_LEN = 64


def normalize_measurement(value: str) -> str:
    """Lower-case hex of a 32-byte measurement; raises AttestationError on anything else."""
    if not isinstance(value, str):
        raise AttestationError("a measurement must be a hex string")
    v = value.strip().lower()
    if len(v) != MEASUREMENT_HEX_LEN or any(c not in "0123456789abcdef" for c in v):
        raise AttestationError(f"{value[:80]!r} is not a measurement (64 hex digits)",
                               hint="copy the measurement from `mlcapsule status` on the client")
    return v


def _measurements(values: Iterable[str]) -> frozenset[str]:
    if isinstance(values, str):  # a single string would otherwise iterate over its characters
        values = [values]
    return frozenset(normalize_measurement(v) for v in values)


@dataclass(frozen=True)
class AttestationPolicy:
    """The provider's rules for evidence.

    ``allow_software``
        Accept evidence from the ``software`` backend. That backend signs its own evidence with
        a key on the client's disk: it proves nothing against the machine's owner. Off unless
        the operator asks for it loudly (see :data:`SOFTWARE_OPTION`).
    ``measurements``
        Allow-list of enclave measurements (hex, 32 bytes). Empty refuses every enclave.
    ``tpm``
        A :class:`mlcapsule.attestation.tpm.TpmPolicy` (EK CA roots, PCR policy). None refuses
        ``tpm`` evidence: there is no default set of trusted TPM manufacturers.
    """

    allow_software: bool = False
    measurements: frozenset[str] = field(default_factory=frozenset)
    tpm: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "measurements", _measurements(self.measurements))

    def check_measurement(self, measurement: str) -> None:
        """Raise AttestationError unless ``measurement`` is on the allow-list."""
        if not self.measurements:
            raise AttestationError("the server accepts no enclave measurements yet",
                                   hint="the provider must add one with --allow-measurement")
        if measurement not in self.measurements:
            raise AttestationError(f"enclave measurement {measurement[:16]}... is not on the server's allow-list",
                                   hint="upgrade mlcapsule to a release the provider accepts, or ask the provider "
                                        "to allow this measurement (`mlcapsule status` shows it)")


def check_evidence_header(evidence: Any, *, evidence_type: str, fields: Iterable[str], version: int) -> None:
    """The checks every verifier starts with: exactly ``fields``, this ``type``, this ``version``."""
    if not isinstance(evidence, Mapping) or set(evidence) != set(fields):
        raise AttestationError(f"{evidence_type} evidence has missing or unknown fields")
    got = evidence["version"]
    if evidence["type"] != evidence_type or type(got) is not int:
        raise AttestationError(f"not {evidence_type} evidence")
    if got != version:
        raise AttestationError(f"{evidence_type} evidence version {got} is not supported (this server reads {version})",
                               hint="client and server mlcapsule versions may not match")


@dataclass(frozen=True)
class VerifiedEvidence:
    """What a verifier vouches for once evidence has passed every check."""

    type: str
    measurement: str  # lower-case hex
    platform_id: str  # stable per platform: hex SHA-256 of the key that signed the evidence
