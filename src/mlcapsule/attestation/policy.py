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


def hex_allow_list(values: Iterable[str], length: int, what: str) -> frozenset[str]:
    """Lower-case hex strings of ``length`` bytes (a single string counts as one value);
    AttestationError naming ``what`` for anything else."""
    if isinstance(values, str):  # a single string would otherwise iterate over its characters
        values = [values]
    out = set()
    for v in values:
        m = v.strip().lower() if isinstance(v, str) else ""
        if len(m) != 2 * length or any(c not in "0123456789abcdef" for c in m):
            raise AttestationError(f"{str(v)[:100]!r} is not {what} ({2 * length} hex digits)")
        out.add(m)
    return frozenset(out)


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
    ``sgx``, ``tdx``, ``snp``, ``nitro``
        The per-type hardware policies (:class:`~mlcapsule.attestation.dcap.SgxPolicy`,
        :class:`~mlcapsule.attestation.dcap.TdxPolicy`, :class:`~mlcapsule.attestation.snp.SnpPolicy`,
        :class:`~mlcapsule.attestation.nitro.NitroPolicy`): the hardware measurements, minimum TCB,
        debug. None refuses that type.
    ``dcap_collateral``, ``snp_certificates``
        What the server holds for clients that send no collateral or certificates
        (:class:`~mlcapsule.attestation.hardware.DcapCollateral`, ``SnpCertificates``).
    ``snp_roots``, ``nitro_root_der``
        Trust anchors: SHA-256 of each AMD ARK by product, the AWS Nitro root (DER). None means
        the vendors' real, pinned roots; tests inject their own.
    ``accept``
        The evidence types accepted, or None for every type configured above (``software`` only
        with ``allow_software``, ``tpm`` only with a ``tpm`` policy, and so on).
    """

    allow_software: bool = False
    measurements: frozenset[str] = field(default_factory=frozenset)
    tpm: Any = None
    sgx: Any = None
    tdx: Any = None
    snp: Any = None
    nitro: Any = None
    dcap_collateral: Any = None
    snp_certificates: Any = None
    snp_roots: Any = None
    nitro_root_der: bytes | None = None
    accept: frozenset[str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "measurements", _measurements(self.measurements))
        if self.snp_roots is None:
            from .snp import PINNED_ARKS

            object.__setattr__(self, "snp_roots", PINNED_ARKS)
        if self.accept is not None:
            if isinstance(self.accept, str):
                raise TypeError("accept must be a collection of evidence type names")
            object.__setattr__(self, "accept", frozenset(self.accept))

    def configured(self) -> frozenset[str]:
        """The evidence types this policy can accept at all (before ``accept`` narrows them)."""
        have = {"software": self.allow_software, "tpm": self.tpm is not None, "sgx": self.sgx is not None,
                "tdx": self.tdx is not None, "snp": self.snp is not None, "nitro": self.nitro is not None}
        return frozenset(k for k, v in have.items() if v)

    def accepted(self) -> frozenset[str]:
        """The evidence types accepted: ``accept`` if given, else every configured type."""
        return self.configured() if self.accept is None else self.accept & self.configured()

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
    measurement: str  # lower-case hex: the mlcapsule code measurement
    platform_id: str  # stable per platform: hex SHA-256 of the key that signed the evidence
    #: Type-specific facts for logs and the provider's records (hardware measurement, TCB status,
    #: advisories). Not used in the trust decision, which is already made.
    details: Mapping[str, Any] = field(default_factory=dict, compare=False)
