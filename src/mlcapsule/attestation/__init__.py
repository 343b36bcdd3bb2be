"""Attestation: does this evidence come from an enclave the provider trusts? Pure code, no I/O.

The trust decision follows python-tuf's rule: functions take parsed evidence and either return
what they vouch for or raise :class:`~mlcapsule.errors.AttestationError`. Anything malformed is
a refusal too. Evidence is dispatched on its ``"type"`` field through a registry, so verifiers
for SGX/TDX/SNP reports can be added with :func:`register_verifier`. ``software`` and ``tpm``
(:mod:`.tpm`, imported at the end of this module) are registered on import.

    >>> verified = verify_evidence(evidence, expected_report_data=report_data(nonce, hpke_pub, receipt_pub),
    ...                            policy=AttestationPolicy(allow_software=True, measurements={"ab12..."}))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from ..errors import AttestationError
from .policy import SOFTWARE_OPTION, AttestationPolicy, VerifiedEvidence, normalize_measurement
from .software import verify_software

__all__ = ["AttestationPolicy", "VerifiedEvidence", "Verifier", "verify_evidence", "register_verifier",
           "verifier_types", "normalize_measurement", "SOFTWARE_OPTION"]

MAX_TYPE_LEN = 64


class Verifier(Protocol):
    def __call__(self, evidence: Mapping[str, Any], *, expected_report_data: bytes,
                 policy: AttestationPolicy) -> VerifiedEvidence: ...


_VERIFIERS: dict[str, Verifier] = {"software": verify_software}


def register_verifier(evidence_type: str, verifier: Verifier, *, replace: bool = False) -> None:
    """Add a verifier for evidence whose ``"type"`` is ``evidence_type``."""
    if evidence_type in _VERIFIERS and not replace:
        raise ValueError(f"a verifier for {evidence_type!r} evidence is already registered")
    _VERIFIERS[evidence_type] = verifier


def verifier_types() -> tuple[str, ...]:
    return tuple(sorted(_VERIFIERS))


def verify_evidence(evidence: Any, *, expected_report_data: bytes, policy: AttestationPolicy) -> VerifiedEvidence:
    """Check ``evidence`` against ``policy`` and the report_data the server expects.

    Raises AttestationError on every failure, malformed input included. The returned
    measurement is on the policy's allow-list (checked again here, whatever the verifier did).
    """
    if not isinstance(policy, AttestationPolicy):
        raise TypeError("policy must be an AttestationPolicy")
    if not isinstance(expected_report_data, bytes) or len(expected_report_data) != 32:
        raise TypeError("expected_report_data must be 32 bytes")
    if not isinstance(evidence, Mapping) or not all(isinstance(k, str) for k in evidence):
        raise AttestationError("evidence must be a JSON object")
    kind = evidence.get("type")
    if not isinstance(kind, str) or len(kind) > MAX_TYPE_LEN:
        raise AttestationError("evidence has no valid 'type'")
    verifier = _VERIFIERS.get(kind)
    if verifier is None:
        raise AttestationError(f"evidence of type {kind!r} is not supported by this server",
                               hint=f"supported types: {', '.join(verifier_types())}")
    verified = verifier(evidence, expected_report_data=expected_report_data, policy=policy)
    if not isinstance(verified, VerifiedEvidence) or verified.type != kind:
        raise AttestationError(f"the {kind!r} verifier returned no verdict")  # a bug in a verifier: refuse
    policy.check_measurement(verified.measurement)
    return verified


from . import tpm as _tpm  # noqa: E402,F401  (registers the "tpm" verifier: TPM 2.0 quotes, EK chain)
