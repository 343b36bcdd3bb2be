"""Attestation: does this evidence come from an enclave the provider trusts? Pure code, no I/O.

The trust decision follows python-tuf's rule: functions take parsed evidence and either return
what they vouch for or raise :class:`~mlcapsule.enclave.errors.AttestationError`. Anything malformed is
a refusal too. Evidence is dispatched on its ``"type"`` field by an :class:`EvidenceVerifier`,
an object that holds the provider's :class:`AttestationPolicy` and its table of verifiers
(``software``, ``tpm``, ``sgx``, ``tdx``, ``snp`` and ``nitro`` by default; each refuses unless
the policy configures it). There is
no process-wide registry or configuration: the server builds its verifier from its settings in
``create_app``, so two servers in one process decide independently.

    >>> verifier = EvidenceVerifier(AttestationPolicy(allow_software=True, measurements={"ab12..."}))
    >>> verified = verifier.verify(evidence, expected_report_data=report_data(nonce, hpke_pub, receipt_pub))
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Protocol

from ..enclave.errors import AttestationError
from .hardware import verify_nitro_evidence, verify_sgx_evidence, verify_snp_evidence, verify_tdx_evidence
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
    """(evidence, binding, policy, time) -> verified claims, or AttestationError naming the failed check."""

    def __call__(self, evidence: Mapping[str, Any], *, expected_report_data: bytes,
                 policy: AttestationPolicy, now: dt.datetime | None = None) -> VerifiedEvidence: ...


#: The verifiers an :class:`EvidenceVerifier` has unless given others (read-only).
DEFAULT_VERIFIERS: Mapping[str, Verifier] = MappingProxyType({
    "software": verify_software, "tpm": verify_tpm, "sgx": verify_sgx_evidence, "tdx": verify_tdx_evidence,
    "snp": verify_snp_evidence, "nitro": verify_nitro_evidence})


class EvidenceVerifier:
    """Verifies enclave evidence under one policy with one table of verifiers. Immutable.

    ``verifiers`` maps an evidence ``"type"`` to its verifier (default :data:`DEFAULT_VERIFIERS`);
    the TPM verifier takes its EK roots and PCR policy from ``policy.tpm``, the hardware verifiers
    theirs from ``policy.sgx`` and so on. ``capsules`` maps a capsule ID to the policy that
    replaces ``policy`` for setups of that capsule (a provider's policy file may narrow or widen
    what one capsule accepts).
    """

    def __init__(self, policy: AttestationPolicy, *, verifiers: Mapping[str, Verifier] | None = None,
                 capsules: Mapping[str, AttestationPolicy] | None = None) -> None:
        if not isinstance(policy, AttestationPolicy):
            raise TypeError("policy must be an AttestationPolicy")
        capsules = dict(capsules or {})
        if not all(isinstance(k, str) and isinstance(v, AttestationPolicy) for k, v in capsules.items()):
            raise TypeError("capsules must map capsule IDs to AttestationPolicy objects")
        self._capsules: Mapping[str, AttestationPolicy] = MappingProxyType(
            {k.lower(): v for k, v in capsules.items()})
        table = dict(DEFAULT_VERIFIERS if verifiers is None else verifiers)
        if not all(isinstance(k, str) and 0 < len(k) <= MAX_TYPE_LEN and callable(v) for k, v in table.items()):
            raise TypeError("verifiers must map evidence type names to verifier functions")
        self._policy = policy
        self._verifiers: Mapping[str, Verifier] = MappingProxyType(table)

    @property
    def policy(self) -> AttestationPolicy:
        return self._policy

    def policy_for(self, capsule_id: str | None) -> AttestationPolicy:
        """The policy that decides setups of ``capsule_id`` (the server-wide one unless overridden)."""
        if capsule_id is None:
            return self._policy
        return self._capsules.get(capsule_id.lower(), self._policy)

    def types(self, capsule_id: str | None = None) -> tuple[str, ...]:
        """The evidence types accepted (for ``capsule_id``, if given): configured by the policy and
        narrowed by its ``accept`` list; types of verifiers passed in are counted as configured."""
        policy = self.policy_for(capsule_id)
        custom = set(self._verifiers) - set(DEFAULT_VERIFIERS)
        kinds = (policy.configured() | custom) & set(self._verifiers)
        return tuple(sorted(kinds if policy.accept is None else kinds & policy.accept))

    def verify(self, evidence: Any, *, expected_report_data: bytes, now: dt.datetime | None = None,
               capsule_id: str | None = None) -> VerifiedEvidence:
        """Check ``evidence`` against the policy and the report_data the server expects.

        ``now`` is the verification time (certificate and collateral validity; default the
        current time); ``capsule_id`` picks a per-capsule policy. Raises AttestationError on
        every failure, malformed input included. The returned measurement is on the policy's
        allow-list (checked again here, whatever the verifier did).
        """
        policy = self.policy_for(capsule_id)
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
                                   hint=f"accepted types: {', '.join(self.types(capsule_id)) or 'none'}")
        if policy.accept is not None and kind not in policy.accept:
            where = " for this capsule" if policy is not self._policy else ""
            raise AttestationError(f"evidence of type {kind!r} is not accepted by this server{where}",
                                   hint=f"accepted types: {', '.join(self.types(capsule_id)) or 'none'}")
        # Without an explicit accept list, each verifier refuses what the policy does not configure,
        # naming what is missing (software evidence: the unsafe server option).
        verified = verifier(evidence, expected_report_data=expected_report_data, policy=policy, now=now)
        if not isinstance(verified, VerifiedEvidence) or verified.type != kind:
            raise AttestationError(f"the {kind!r} verifier returned no verdict")  # a bug in a verifier: refuse
        policy.check_measurement(verified.measurement)
        return verified


def verify_evidence(evidence: Any, *, expected_report_data: bytes, policy: AttestationPolicy,
                    verifiers: Mapping[str, Verifier] | None = None, now: dt.datetime | None = None
                    ) -> VerifiedEvidence:
    """``EvidenceVerifier(policy, verifiers=verifiers).verify(...)``, for one-off checks."""
    return EvidenceVerifier(policy, verifiers=verifiers).verify(evidence, expected_report_data=expected_report_data,
                                                               now=now)
