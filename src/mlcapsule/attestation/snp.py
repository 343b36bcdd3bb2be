"""The pure verifier for AMD SEV-SNP attestation reports (versions 2 and 3). pyca only, no I/O.

A report is the 1184-byte ``ATTESTATION_REPORT`` structure of the AMD SEV-SNP firmware ABI
specification (publication 56860, table "ATTESTATION_REPORT Structure"), as the guest gets it
from ``/dev/sev-guest`` or configfs-tsm. It is signed with ECDSA P-384 / SHA-384 by a key the
AMD secure processor derives: the VCEK (per chip and TCB) or the VLEK (per cloud provider,
loaded by it). That key's certificate is signed by the ASK (or the ASVK for VLEKs) and that by the
ARK, the AMD root key of one product line (Milan, Genoa, Turin); both with RSASSA-PSS/SHA-384.

:func:`verify_snp` checks, in this order, each failure an :class:`AttestationError` naming it:

1. the report parses (size, version 2 or 3, signature algorithm 1 = ECDSA P-384 with SHA-384);
2. the chain: ``chain_pem`` holds the ASK and the ARK; the ARK's DER SHA-256 is one of the pinned
   roots (which names the product), the ARK is self-signed and the ASK is signed by it, the
   VCEK/VLEK by the ASK (RSA-PSS, SHA-384, salt 48), all valid at ``now``; the leaf kind (VCEK or
   VLEK, by its CN and the ASK's) is the signing key the report names;
3. the leaf matches the report: its hardware-ID extension is the report's chip ID (VCEK), its
   TCB extensions are the report's REPORTED_TCB, a v3 report's CPUID names the same product;
4. the report signature over bytes ``[0, 0x2A0)``;
5. the provider's :class:`SnpPolicy`: the DEBUG bit of the guest policy, the VMPL, the
   measurement allow-list, the minimum TCB; and the report_data binding.

Pinned ARKs: SHA-256 of the DER of AMD's ARK-Milan, ARK-Genoa and ARK-Turin, computed from
``ask_ark_{milan,genoa,turin_vcek}.pem`` of google/go-sev-guest ``verify/trust/`` (copied in the
shared attestation vectors, whose README gives the same prefixes). AMD serves the same
certificates at ``https://kdsintf.amd.com/vcek/v1/{Milan,Genoa,Turin}/cert_chain``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import struct
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from ..enclave.errors import AttestationError
from .policy import hex_allow_list

__all__ = ["PINNED_ARKS", "REPORT_SIZE", "SnpClaims", "SnpPolicy", "SnpReport", "SnpTcb", "parse_snp_report",
           "verify_snp"]

REPORT_SIZE = 0x4A0  # 1184
SIGNED_SIZE = 0x2A0  # the signature covers bytes [0, 0x2A0)
SUPPORTED_VERSIONS = frozenset({2, 3})
SIG_ALGO_ECDSA_P384_SHA384 = 1
MEASUREMENT_HEX_LEN = 96  # 48 bytes
MAX_PEM = 64 * 1024
MAX_DER = 16 * 1024

#: SHA-256 of the DER of each product's ARK (see the module docstring for provenance).
PINNED_ARKS: Mapping[str, bytes] = MappingProxyType({
    "Milan": bytes.fromhex("69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd"),
    "Genoa": bytes.fromhex("4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1"),
    "Turin": bytes.fromhex("1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a"),
})

# Guest policy bits (ABI spec, table "Guest Policy Structure").
POLICY_SMT = 1 << 16
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20

# AMD's VCEK/VLEK certificate extensions (VCEK specification, publication 57230).
_OID_BL = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.1")
_OID_TEE = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.2")
_OID_SNP = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.3")
_OID_UCODE = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.8")
_OID_FMC = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.3.9")
_OID_HWID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_CERT_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion,
                                             x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


@dataclass(frozen=True, order=True)
class SnpTcb:
    """A TCB version: the security version numbers of the firmware components.

    ``fmc`` exists on Turin and later only (None before). Comparison for a minimum is
    component-wise (:meth:`at_least`), not the dataclass ordering.
    """

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def from_raw(cls, raw: int, product: str) -> SnpTcb:
        b = raw.to_bytes(8, "little")
        if product == "Turin":  # FMC, BL, TEE, SNP, 3 reserved, microcode
            return cls(bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7], fmc=b[0])
        return cls(bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])  # BL, TEE, 4 reserved, SNP, microcode

    def at_least(self, minimum: SnpTcb) -> bool:
        pairs = [(self.bootloader, minimum.bootloader), (self.tee, minimum.tee), (self.snp, minimum.snp),
                 (self.microcode, minimum.microcode)]
        if minimum.fmc is not None:
            pairs.append((self.fmc if self.fmc is not None else -1, minimum.fmc))
        return all(have >= need for have, need in pairs)


@dataclass(frozen=True)
class SnpReport:
    """The fields of an ATTESTATION_REPORT (offsets from the ABI spec). Parsing checks nothing signed."""

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    key_info: int  # bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY, bits 4:2 SIGNING_KEY (0 VCEK, 1 VLEK)
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid: tuple[int, int, int]  # family, model, stepping (v3; zero in v2)
    chip_id: bytes
    committed_tcb: int
    launch_tcb: int
    signature_r: int
    signature_s: int
    signed: bytes

    @property
    def signing_key(self) -> str:
        return {0: "vcek", 1: "vlek"}.get((self.key_info >> 2) & 7, "none")

    @property
    def author_key_en(self) -> bool:
        return bool(self.key_info & 1)

    @property
    def mask_chip_id(self) -> bool:
        return bool(self.key_info & 2)


def parse_snp_report(report: bytes) -> SnpReport:
    """Parse the 1184-byte report; AttestationError if it is not a v2/v3 ECDSA-P384 report."""
    if not isinstance(report, bytes | bytearray) or len(report) != REPORT_SIZE:
        raise AttestationError(f"an SEV-SNP report is {REPORT_SIZE} bytes")
    r = bytes(report)
    version, guest_svn, policy = struct.unpack_from("<IIQ", r, 0x00)
    if version not in SUPPORTED_VERSIONS:
        raise AttestationError(f"SEV-SNP report version {version} is not supported (this server reads 2 and 3)")
    vmpl, sig_algo, current_tcb, platform_info, key_info = struct.unpack_from("<IIQQI", r, 0x30)
    if sig_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise AttestationError(f"SEV-SNP report signature algorithm {sig_algo} is not ECDSA P-384 with SHA-384")
    (reported_tcb,) = struct.unpack_from("<Q", r, 0x180)
    (committed_tcb,) = struct.unpack_from("<Q", r, 0x1E0)
    (launch_tcb,) = struct.unpack_from("<Q", r, 0x1F0)
    cpuid = (r[0x188], r[0x189], r[0x18A]) if version >= 3 else (0, 0, 0)
    return SnpReport(
        version=version, guest_svn=guest_svn, policy=policy, family_id=r[0x10:0x20], image_id=r[0x20:0x30],
        vmpl=vmpl, signature_algo=sig_algo, current_tcb=current_tcb, platform_info=platform_info,
        key_info=key_info, report_data=r[0x50:0x90], measurement=r[0x90:0xC0], host_data=r[0xC0:0xE0],
        id_key_digest=r[0xE0:0x110], author_key_digest=r[0x110:0x140], report_id=r[0x140:0x160],
        report_id_ma=r[0x160:0x180], reported_tcb=reported_tcb, cpuid=cpuid, chip_id=r[0x1A0:0x1E0],
        committed_tcb=committed_tcb, launch_tcb=launch_tcb,
        signature_r=int.from_bytes(r[0x2A0:0x2E8], "little"), signature_s=int.from_bytes(r[0x2E8:0x330], "little"),
        signed=r[:SIGNED_SIZE])


def _measurements(values: Iterable[str]) -> frozenset[str]:
    return hex_allow_list(values, MEASUREMENT_HEX_LEN // 2, "an SEV-SNP measurement")


@dataclass(frozen=True)
class SnpPolicy:
    """What the provider accepts from SEV-SNP guests. The default refuses everything.

    ``measurements``: allow-list of launch measurements (96 hex digits); empty refuses all.
    ``allow_debug``: accept guests whose policy has DEBUG set (the host can read their memory).
    ``min_tcb``: the lowest REPORTED_TCB accepted, component-wise (None: no minimum).
    ``max_vmpl``: the highest (least privileged) VMPL whose reports are accepted.
    """

    measurements: frozenset[str] = field(default_factory=frozenset)
    allow_debug: bool = False
    min_tcb: SnpTcb | None = None
    max_vmpl: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "measurements", _measurements(self.measurements))


@dataclass(frozen=True)
class SnpClaims:
    """What :func:`verify_snp` vouches for."""

    product: str  # "Milan", "Genoa" or "Turin": the pinned ARK the chain ends in
    signer: str  # "vcek" or "vlek"
    version: int
    measurement: str  # hex, 48 bytes
    report_data: bytes  # 64 bytes
    host_data: bytes
    policy: int  # the guest policy word
    debug: bool
    migrate_ma: bool
    smt: bool
    vmpl: int
    guest_svn: int
    reported_tcb: SnpTcb
    current_tcb: SnpTcb
    committed_tcb: SnpTcb
    launch_tcb: SnpTcb
    platform_info: int
    chip_id: str  # hex, 64 bytes (zero for VLEK-signed or chip-masked reports)
    id_key_digest: str
    author_key_digest: str
    report_id: str
    signer_key_sha256: str  # hex SHA-256 of the VCEK/VLEK's DER: stable per chip and TCB (VCEK)


def _load_leaf(der: bytes) -> x509.Certificate:
    if not isinstance(der, bytes | bytearray) or not 0 < len(der) <= MAX_DER:
        raise AttestationError("the SEV-SNP VCEK/VLEK certificate is missing or too large")
    try:
        with warnings.catch_warnings():  # AMD issues VCEKs with serial number 0, which pyca warns about
            warnings.simplefilter("ignore")
            return x509.load_der_x509_certificate(bytes(der))
    except _CERT_ERRORS as e:
        raise AttestationError("the SEV-SNP VCEK/VLEK certificate is malformed") from e


def _load_chain(pem: bytes) -> list[x509.Certificate]:
    if not isinstance(pem, bytes | bytearray) or not 0 < len(pem) <= MAX_PEM:
        raise AttestationError("the SEV-SNP certificate chain (ASK, ARK) is missing or too large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            certs = x509.load_pem_x509_certificates(bytes(pem))
    except _CERT_ERRORS as e:
        raise AttestationError("the SEV-SNP certificate chain (ASK, ARK) is malformed") from e
    if len(certs) != 2:
        raise AttestationError("the SEV-SNP certificate chain must hold exactly the ASK and the ARK")
    return certs


def _cn(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if len(attrs) == 1 else ""


def _pss_signed_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    """``cert`` is signed by ``issuer``'s RSA key with RSASSA-PSS/SHA-384 (AMD's only algorithm here)."""
    key = issuer.public_key()
    if cert.issuer != issuer.subject or not isinstance(key, rsa.RSAPublicKey):
        raise AttestationError(f"SEV-SNP certificate chain: the {what} is not issued by the expected AMD key")
    if cert.signature_algorithm_oid != x509.SignatureAlgorithmOID.RSASSA_PSS or \
            not isinstance(cert.signature_hash_algorithm, hashes.SHA384):
        raise AttestationError(f"SEV-SNP certificate chain: the {what} is not signed with RSA-PSS/SHA-384")
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())
    except InvalidSignature as e:
        raise AttestationError(f"SEV-SNP certificate chain: the {what}'s signature does not verify") from e


def _valid_at(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AttestationError(f"SEV-SNP certificate chain: the {what} is not valid at {now.isoformat()} "
                               f"(valid {cert.not_valid_before_utc.isoformat()} to "
                               f"{cert.not_valid_after_utc.isoformat()})")


def _ext_int(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> int | None:
    """An AMD TCB extension: a DER INTEGER (02 len value), small and non-negative."""
    try:
        raw = cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None
    data = raw.value if isinstance(raw, x509.UnrecognizedExtension) else b""
    if len(data) < 3 or data[0] != 0x02 or data[1] != len(data) - 2 or data[1] > 8 or data[2] & 0x80:
        raise AttestationError("the SEV-SNP VCEK/VLEK has a malformed TCB extension")
    return int.from_bytes(data[2:], "big")


def _hwid(cert: x509.Certificate) -> bytes | None:
    try:
        raw = cert.extensions.get_extension_for_oid(_OID_HWID).value
    except x509.ExtensionNotFound:
        return None
    return raw.value if isinstance(raw, x509.UnrecognizedExtension) else None


def _product_of_cpuid(family: int, model: int) -> str | None:
    if family == 0x19 and model <= 0x0F:
        return "Milan"
    if family == 0x19 and (0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF):
        return "Genoa"
    if family == 0x1A and model <= 0x1F:
        return "Turin"
    return None


def _check_chain(leaf: x509.Certificate, chain: list[x509.Certificate], roots: Mapping[str, bytes],
                 now: dt.datetime, signer: str) -> str:
    """Return the product whose pinned ARK ``chain`` ends in; AttestationError naming the failed link."""
    if not roots:
        raise AttestationError("the server trusts no AMD root keys (ARK)")
    by_hash = {bytes(v): k for k, v in roots.items()}
    arks = [(c, by_hash.get(hashlib.sha256(c.public_bytes(Encoding.DER)).digest())) for c in chain]
    found = [(c, p) for c, p in arks if p is not None]
    if len(found) != 1:
        raise AttestationError("SEV-SNP certificate chain: the ARK is not one of the pinned AMD roots",
                               hint="the chain must be AMD's ASK and ARK for the processor generation")
    ark, product = found[0]
    assert product is not None
    ask = chain[1] if chain[0] is ark else chain[0]
    _pss_signed_by(ark, ark, f"ARK-{product}")
    _pss_signed_by(ask, ark, "ASK")
    want_ask_cn = f"SEV-VLEK-{product}" if signer == "vlek" else f"SEV-{product}"
    if _cn(ask) != want_ask_cn:
        raise AttestationError(f"SEV-SNP certificate chain: the ASK is {_cn(ask)[:40]!r}, not {want_ask_cn!r} "
                               f"for a {signer.upper()}-signed report")
    want_leaf_cn = "SEV-VLEK" if signer == "vlek" else "SEV-VCEK"
    if _cn(leaf) != want_leaf_cn:
        raise AttestationError(f"SEV-SNP certificate chain: the leaf is {_cn(leaf)[:40]!r}, not {want_leaf_cn!r}")
    _pss_signed_by(leaf, ask, signer.upper())
    for cert, what in ((ark, "ARK"), (ask, "ASK"), (leaf, signer.upper())):
        _valid_at(cert, now, what)
    return product


def _check_leaf_matches(leaf: x509.Certificate, rep: SnpReport, product: str) -> SnpTcb:
    reported = SnpTcb.from_raw(rep.reported_tcb, product)
    cert_tcb = (_ext_int(leaf, _OID_BL), _ext_int(leaf, _OID_TEE), _ext_int(leaf, _OID_SNP),
                _ext_int(leaf, _OID_UCODE))
    want = (reported.bootloader, reported.tee, reported.snp, reported.microcode)
    if cert_tcb != want or (product == "Turin" and _ext_int(leaf, _OID_FMC) != reported.fmc):
        raise AttestationError(f"the SEV-SNP {rep.signing_key.upper()} is for another TCB than the report's "
                               "REPORTED_TCB", hint="fetch the VCEK for the reported TCB")
    if rep.signing_key == "vcek" and not rep.mask_chip_id:
        hwid = _hwid(leaf)
        n = 8 if product == "Turin" else 64  # Turin VCEKs carry the first 8 bytes of the chip ID
        if hwid is None or len(hwid) != n or not hmac.compare_digest(hwid, rep.chip_id[:n]):
            raise AttestationError("the SEV-SNP VCEK is for another chip than the report's CHIP_ID")
    if rep.version >= 3 and any(rep.cpuid):
        named = _product_of_cpuid(rep.cpuid[0], rep.cpuid[1])
        if named != product:
            raise AttestationError(f"the SEV-SNP report's CPUID ({rep.cpuid[0]:#x}/{rep.cpuid[1]:#x}) is not a "
                                   f"{product} processor: the chain is for another product")
    return reported


def _check_signature(leaf: x509.Certificate, rep: SnpReport) -> None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise AttestationError("the SEV-SNP VCEK/VLEK is not an ECDSA P-384 key")
    try:
        key.verify(encode_dss_signature(rep.signature_r, rep.signature_s), rep.signed, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError) as e:
        raise AttestationError("the SEV-SNP report signature does not verify with the "
                               f"{rep.signing_key.upper()}") from e


def verify_snp(report: bytes, vcek_der: bytes, chain_pem: bytes, *, policy: SnpPolicy,
               expected_report_data: bytes | None, roots: Mapping[str, bytes] = PINNED_ARKS,
               now: dt.datetime | None = None) -> SnpClaims:
    """Verify an SEV-SNP report with its VCEK/VLEK (DER) and AMD's ASK+ARK (PEM); see the module docstring.

    ``expected_report_data``: the report's REPORT_DATA must start with these bytes (at most 64);
    None skips the binding check (only for recorded evidence: it then proves no freshness).
    ``roots``: product name → SHA-256 of the ARK's DER (tests inject their own).
    ``now``: when the certificates must be valid (default: the current time).
    """
    if not isinstance(policy, SnpPolicy):
        raise TypeError("policy must be an SnpPolicy")
    if expected_report_data is not None and (not isinstance(expected_report_data, bytes)
                                             or not 0 < len(expected_report_data) <= 64):
        raise TypeError("expected_report_data must be 1 to 64 bytes, or None")
    when = dt.datetime.now(dt.UTC) if now is None else (now if now.tzinfo else now.replace(tzinfo=dt.UTC))
    rep = parse_snp_report(report)
    if rep.signing_key == "none":
        raise AttestationError("the SEV-SNP report is not signed by a VCEK or a VLEK")
    leaf = _load_leaf(vcek_der)
    chain = _load_chain(chain_pem)
    try:
        product = _check_chain(leaf, chain, roots, when, rep.signing_key)
        reported = _check_leaf_matches(leaf, rep, product)
        _check_signature(leaf, rep)
    except _CERT_ERRORS as e:  # a mutated certificate whose key or extensions pyca cannot load
        raise AttestationError("an SEV-SNP certificate is malformed") from e
    # Signed and chained: now the provider's policy.
    debug = bool(rep.policy & POLICY_DEBUG)
    if debug and not policy.allow_debug:
        raise AttestationError("the SEV-SNP guest policy allows debugging (DEBUG bit set): the host can read "
                               "and write its memory", hint="launch the guest without debug")
    if rep.vmpl > policy.max_vmpl:
        raise AttestationError(f"the SEV-SNP report comes from VMPL {rep.vmpl}; the policy accepts up to "
                               f"{policy.max_vmpl}")
    measurement = rep.measurement.hex()
    if measurement not in policy.measurements:
        raise AttestationError(f"SEV-SNP measurement {measurement[:16]}... is not on the server's allow-list")
    if policy.min_tcb is not None and not reported.at_least(policy.min_tcb):
        raise AttestationError(f"the SEV-SNP reported TCB {reported} is below the policy's minimum {policy.min_tcb}",
                               hint="update the host's firmware and microcode")
    if expected_report_data is not None and not hmac.compare_digest(
            rep.report_data[:len(expected_report_data)], expected_report_data):
        raise AttestationError("the SEV-SNP report_data is not bound to this setup")
    return SnpClaims(
        product=product, signer=rep.signing_key, version=rep.version, measurement=measurement,
        report_data=rep.report_data, host_data=rep.host_data, policy=rep.policy, debug=debug,
        migrate_ma=bool(rep.policy & POLICY_MIGRATE_MA), smt=bool(rep.policy & POLICY_SMT), vmpl=rep.vmpl,
        guest_svn=rep.guest_svn, reported_tcb=reported,
        current_tcb=SnpTcb.from_raw(rep.current_tcb, product),
        committed_tcb=SnpTcb.from_raw(rep.committed_tcb, product),
        launch_tcb=SnpTcb.from_raw(rep.launch_tcb, product), platform_info=rep.platform_info,
        chip_id=rep.chip_id.hex(), id_key_digest=rep.id_key_digest.hex(),
        author_key_digest=rep.author_key_digest.hex(), report_id=rep.report_id.hex(),
        signer_key_sha256=hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest())
