"""Attestation: does this evidence come from an enclave the provider trusts? Pure code, no I/O.

The trust decision follows python-tuf's rule: functions take parsed evidence and either return
what they vouch for or raise :class:`~mlcapsule.enclave.errors.AttestationError`. Anything malformed is
a refusal too. Evidence is dispatched on its ``"type"`` field by an :class:`EvidenceVerifier`,
an object that holds the provider's :class:`AttestationPolicy` and its table of verifiers
(``software`` and ``tpm`` by default; verifiers for SGX/TDX/SNP reports are passed in). There is
no process-wide registry or configuration: the server builds its verifier from its settings in
``create_app``, so two servers in one process decide independently.

    >>> verifier = EvidenceVerifier(AttestationPolicy(allow_software=True, measurements={"ab12..."}))
    >>> verified = verifier.verify(evidence, expected_report_data=report_data(nonce, hpke_pub, receipt_pub))
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Protocol

from ..enclave.errors import AttestationError
from .policy import (
    SOFTWARE_OPTION,
    AttestationPolicy,
    VerifiedEvidence,
    normalize_measurement,
)
from .software import verify_software
from .tpm import verify_tpm

__all__ = [
    "DEFAULT_VERIFIERS",
    "SOFTWARE_OPTION",
    "AttestationPolicy",
    "EvidenceVerifier",
    "VerifiedEvidence",
    "Verifier",
    "normalize_measurement",
    "verify_evidence",
]

MAX_TYPE_LEN = 64


class Verifier(Protocol):
    def __call__(self, evidence: Mapping[str, Any], *, expected_report_data: bytes,
                 policy: AttestationPolicy) -> VerifiedEvidence: ...


#: The verifiers an :class:`EvidenceVerifier` has unless given others (read-only).
DEFAULT_VERIFIERS: Mapping[str, Verifier] = MappingProxyType({"software": verify_software, "tpm": verify_tpm})


class EvidenceVerifier:
    """Verifies enclave evidence under one policy with one table of verifiers. Immutable.

    ``verifiers`` maps an evidence ``"type"`` to its verifier (default :data:`DEFAULT_VERIFIERS`);
    the TPM verifier takes its EK roots and PCR policy from ``policy.tpm``.
    """

    def __init__(self, policy: AttestationPolicy, *, verifiers: Mapping[str, Verifier] | None = None) -> None:
        if not isinstance(policy, AttestationPolicy):
            raise TypeError("policy must be an AttestationPolicy")
        table = dict(DEFAULT_VERIFIERS if verifiers is None else verifiers)
        if not all(isinstance(k, str) and 0 < len(k) <= MAX_TYPE_LEN and callable(v) for k, v in table.items()):
            raise TypeError("verifiers must map evidence type names to verifier functions")
        self._policy = policy
        self._verifiers: Mapping[str, Verifier] = MappingProxyType(table)

    @property
    def policy(self) -> AttestationPolicy:
        return self._policy

    def types(self) -> tuple[str, ...]:
        return tuple(sorted(self._verifiers))

    def verify(self, evidence: Any, *, expected_report_data: bytes) -> VerifiedEvidence:
        """Check ``evidence`` against the policy and the report_data the server expects.

        Raises AttestationError on every failure, malformed input included. The returned
        measurement is on the policy's allow-list (checked again here, whatever the verifier did).
        """
        policy = self._policy
        if not isinstance(expected_report_data, bytes) or len(expected_report_data) != 32:
            raise TypeError("expected_report_data must be 32 bytes")
        if not isinstance(evidence, Mapping) or not all(isinstance(k, str) for k in evidence):
            raise AttestationError("evidence must be a JSON object")
        kind = evidence.get("type")
        if not isinstance(kind, str) or len(kind) > MAX_TYPE_LEN:
            raise AttestationError("evidence has no valid 'type'")
        verifier = self._verifiers.get(kind)
        if verifier is None:
            raise AttestationError(f"evidence of type {kind!r} is not supported by this server",
                                   hint=f"supported types: {', '.join(self.types())}")
        verified = verifier(evidence, expected_report_data=expected_report_data, policy=policy)
        if not isinstance(verified, VerifiedEvidence) or verified.type != kind:
            raise AttestationError(f"the {kind!r} verifier returned no verdict")  # a bug in a verifier: refuse
        policy.check_measurement(verified.measurement)
        return verified


def verify_evidence(evidence: Any, *, expected_report_data: bytes, policy: AttestationPolicy,
                    verifiers: Mapping[str, Verifier] | None = None) -> VerifiedEvidence:
    """``EvidenceVerifier(policy, verifiers=verifiers).verify(...)``, for one-off checks."""
    return EvidenceVerifier(policy, verifiers=verifiers).verify(evidence, expected_report_data=expected_report_data)
