"""Intel SGX (DCAP quote v3) and TDX (quote v4/v5) verification. Pure functions, no I/O.

The cryptography is done by ``dcap-qvl`` (Phala Network's Rust verifier, PyPI ``dcap-qvl``),
called through :func:`dcap_qvl.verify_with_root_ca` with the root passed explicitly
(:data:`INTEL_SGX_ROOT_CA_DER` unless the policy injects a test root). Given the quote, the
collateral (PCS responses: TCB info, QE identity, CRLs and their issuer chains) and the time,
dcap-qvl checks:

* the PCK certificate chain in the quote up to the root, and the CRLs (root CA and PCK);
* the QE report's signature by the PCK key, and that the QE report binds the attestation key;
* the attestation key's signature over the quote header and report body;
* the QE identity and the TCB info (their signatures and issuer chains) and that every piece of
  collateral is valid at ``now``;
* the TCB level of the platform and QE, giving a TCB status and Intel advisory IDs.

This module then checks, from the report body it parses itself (and cross-checks with dcap-qvl's
parse): the quote type and version, the TCB status against the policy (only ``UpToDate`` unless
the policy lists more; ``Revoked`` never), rejected advisories, the debug attribute, the enclave
or TD identity against the policy's allow-lists and minimums, and that report_data starts with
the binding the server expects. Every failure is an :class:`AttestationError` naming the check.

Times are Unix seconds passed in by the caller: recorded collateral is valid for about a month,
so tests pin a time inside it, and the server passes its clock.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..enclave.errors import AttestationError

__all__ = [
    "INTEL_SGX_ROOT_CA_DER",
    "INTEL_SGX_ROOT_CA_SHA256",
    "TCB_STATUSES",
    "SgxClaims",
    "SgxPolicy",
    "SgxReportBody",
    "TdReportBody",
    "TdxClaims",
    "TdxPolicy",
    "check_sgx_body",
    "check_tdx_body",
    "parse_sgx_quote",
    "parse_tdx_quote",
    "verify_sgx",
    "verify_tdx",
]

#: The Intel SGX Root CA (CN=Intel SGX Root CA, valid 2018-05-21 to 2049-12-31). Both SGX and
#: TDX PCK chains end here. Public; the same certificate as Intel's IntelSGXRootCA.der.
INTEL_SGX_ROOT_CA_PEM = b"""-----BEGIN CERTIFICATE-----
MIICjzCCAjSgAwIBAgIUImUM1lqdNInzg7SVUr9QGzknBqwwCgYIKoZIzj0EAwIw
aDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENv
cnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJ
BgNVBAYTAlVTMB4XDTE4MDUyMTEwNDUxMFoXDTQ5MTIzMTIzNTk1OVowaDEaMBgG
A1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0
aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYT
AlVTMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC6nEwMDIYZOj/iPWsCzaEKi7
1OiOSLRFhWGjbnBVJfVnkY4u3IjkDYYL0MxO4mqsyYjlBalTVYxFP2sJBK5zlKOB
uzCBuDAfBgNVHSMEGDAWgBQiZQzWWp00ifODtJVSv1AbOScGrDBSBgNVHR8ESzBJ
MEegRaBDhkFodHRwczovL2NlcnRpZmljYXRlcy50cnVzdGVkc2VydmljZXMuaW50
ZWwuY29tL0ludGVsU0dYUm9vdENBLmRlcjAdBgNVHQ4EFgQUImUM1lqdNInzg7SV
Ur9QGzknBqwwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwCgYI
KoZIzj0EAwIDSQAwRgIhAOW/5QkR+S9CiSDcNoowLuPRLsWGf/Yi7GSX94BgwTwg
AiEA4J0lrHoMs+Xo5o/sX6O9QWxHRAvZUGOdRQ7cvqRXaqI=
-----END CERTIFICATE-----
"""
#: SHA-256 of the root's DER encoding, as published with the test vectors (checked at import).
INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
INTEL_SGX_ROOT_CA_DER = x509.load_pem_x509_certificate(INTEL_SGX_ROOT_CA_PEM).public_bytes(Encoding.DER)
if hashlib.sha256(INTEL_SGX_ROOT_CA_DER).hexdigest() != INTEL_SGX_ROOT_CA_SHA256:  # pragma: no cover
    raise RuntimeError("the pinned Intel SGX Root CA does not match its SHA-256")

#: TCB statuses a policy may accept besides ``UpToDate`` (``Revoked`` is never acceptable).
TCB_STATUSES = frozenset({"SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
                          "OutOfDate", "OutOfDateConfigurationNeeded"})
UP_TO_DATE = "UpToDate"

MAX_QUOTE_LEN = 64 * 1024
MAX_COLLATERAL_LEN = 1024 * 1024
HEADER_LEN = 48
TEE_SGX = 0x00000000
TEE_TDX = 0x00000081
ATT_KEY_ECDSA_P256 = 2
SGX_BODY_LEN = 384
TD10_BODY_LEN = 584
TD15_BODY_LEN = 648
V5_BODY_TD10, V5_BODY_TD15 = 2, 3  # quote v5 body types: TDX 1.0 and 1.5 TD reports
SGX_ATTR_DEBUG = 0x2  # SGX ATTRIBUTES.FLAGS bit 1
TD_ATTR_DEBUG = 0x1  # TD_ATTRIBUTES bit 0 (TUD.DEBUG)


# -- parsed report bodies --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SgxReportBody:
    cpu_svn: bytes
    misc_select: int
    attributes: bytes  # 16 bytes: FLAGS (u64 LE) then XFRM
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes  # 64 bytes

    @property
    def debug(self) -> bool:
        return bool(int.from_bytes(self.attributes[:8], "little") & SGX_ATTR_DEBUG)


@dataclass(frozen=True)
class TdReportBody:
    quote_version: int
    body_type: int  # 2 = TDX 1.0 TD report, 3 = TDX 1.5 (v5 quotes say so; v4 quotes are always 2)
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes  # 8 bytes, u64 LE
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes  # 64 bytes
    tee_tcb_svn2: bytes | None = None  # TDX 1.5 only
    mr_service_td: bytes | None = None  # TDX 1.5 only

    @property
    def debug(self) -> bool:
        return bool(int.from_bytes(self.td_attributes, "little") & TD_ATTR_DEBUG)


def _header(quote: Any, kind: str) -> tuple[int, int, int]:
    if not isinstance(quote, bytes):
        raise AttestationError(f"{kind} quote must be bytes")
    if len(quote) > MAX_QUOTE_LEN:
        raise AttestationError(f"{kind} quote format: longer than {MAX_QUOTE_LEN} bytes")
    if len(quote) < HEADER_LEN:
        raise AttestationError(f"{kind} quote format: shorter than its header")
    version, key_type, tee_type = struct.unpack_from("<HHI", quote, 0)
    return version, key_type, tee_type


def parse_sgx_quote(quote: bytes) -> SgxReportBody:
    """The ISV enclave report body of an SGX DCAP v3 quote (checks the header, not the signature)."""
    version, key_type, tee_type = _header(quote, "SGX")
    if tee_type != TEE_SGX:
        raise AttestationError("SGX quote format: not an SGX quote (TEE type)")
    if version != 3:
        raise AttestationError(f"SGX quote format: version {version} is not supported (DCAP v3 only)")
    if key_type != ATT_KEY_ECDSA_P256:
        raise AttestationError("SGX quote format: the attestation key is not ECDSA P-256")
    if len(quote) < HEADER_LEN + SGX_BODY_LEN + 4:
        raise AttestationError("SGX quote format: truncated report body")
    b = quote[HEADER_LEN:HEADER_LEN + SGX_BODY_LEN]
    return SgxReportBody(cpu_svn=b[0:16], misc_select=int.from_bytes(b[16:20], "little"), attributes=b[48:64],
                         mr_enclave=b[64:96], mr_signer=b[128:160],
                         isv_prod_id=int.from_bytes(b[256:258], "little"),
                         isv_svn=int.from_bytes(b[258:260], "little"), report_data=b[320:384])


def _td_body(version: int, body_type: int, b: bytes) -> TdReportBody:
    def at(off: int, n: int) -> bytes:
        return b[off:off + n]

    rtmrs = (at(328, 48), at(376, 48), at(424, 48), at(472, 48))
    return TdReportBody(
        quote_version=version, body_type=body_type, tee_tcb_svn=at(0, 16), mr_seam=at(16, 48),
        mr_signer_seam=at(64, 48), seam_attributes=at(112, 8), td_attributes=at(120, 8), xfam=at(128, 8),
        mr_td=at(136, 48), mr_config_id=at(184, 48), mr_owner=at(232, 48), mr_owner_config=at(280, 48),
        rtmrs=rtmrs, report_data=at(520, 64),
        tee_tcb_svn2=at(584, 16) if body_type == V5_BODY_TD15 else None,
        mr_service_td=at(600, 48) if body_type == V5_BODY_TD15 else None)


def parse_tdx_quote(quote: bytes) -> TdReportBody:
    """The TD report body of a TDX quote v4 or v5 (checks the header, not the signature)."""
    version, key_type, tee_type = _header(quote, "TDX")
    if tee_type != TEE_TDX:
        raise AttestationError("TDX quote format: not a TDX quote (TEE type)")
    if key_type != ATT_KEY_ECDSA_P256:
        raise AttestationError("TDX quote format: the attestation key is not ECDSA P-256")
    if version == 4:
        body_type, off, size = V5_BODY_TD10, HEADER_LEN, TD10_BODY_LEN
    elif version == 5:
        if len(quote) < HEADER_LEN + 6:
            raise AttestationError("TDX quote format: truncated body header")
        body_type, size = struct.unpack_from("<HI", quote, HEADER_LEN)
        off = HEADER_LEN + 6
        want = {V5_BODY_TD10: TD10_BODY_LEN, V5_BODY_TD15: TD15_BODY_LEN}.get(body_type)
        if want is None:
            raise AttestationError(f"TDX quote format: v5 body type {body_type} is not supported")
        if size != want:
            raise AttestationError("TDX quote format: body size does not match its type")
    else:
        raise AttestationError(f"TDX quote format: version {version} is not supported (v4 and v5 only)")
    if len(quote) < off + size + 4:
        raise AttestationError("TDX quote format: truncated report body")
    # Offsets below are from the 1.0 layout; 1.5 appends tee_tcb_svn2 and mr_service_td.
    return _td_body(version, body_type, quote[off:off + size])


# -- policies ------------------------------------------------------------------------------------------
def _digests(values: Iterable[bytes], length: int, name: str) -> frozenset[bytes]:
    if isinstance(values, (bytes, str)):
        raise TypeError(f"{name} must be a collection of {length}-byte values, not a single value")
    out = frozenset(values)
    if not all(isinstance(v, bytes) and len(v) == length for v in out):
        raise ValueError(f"every value in {name} must be {length} bytes")
    return out


def _statuses(values: Iterable[str]) -> frozenset[str]:
    if isinstance(values, str):
        raise TypeError("allow_tcb_statuses must be a collection of status names")
    out = frozenset(values)
    unknown = out - TCB_STATUSES
    if unknown:
        raise ValueError(f"unknown or never-acceptable TCB statuses: {sorted(unknown)} "
                         f"(UpToDate is always accepted; others: {sorted(TCB_STATUSES)})")
    return out


def _advisories(values: Iterable[str]) -> frozenset[str]:
    if isinstance(values, str):
        raise TypeError("reject_advisories must be a collection of advisory IDs")
    out = frozenset(values)
    if not all(isinstance(v, str) for v in out):
        raise ValueError("advisory IDs are strings such as 'INTEL-SA-00615'")
    return out


def _root(der: bytes) -> bytes:
    if not isinstance(der, bytes):
        raise TypeError("root_ca_der must be the DER bytes of a certificate")
    x509.load_der_x509_certificate(der)  # raises ValueError if it is not one
    return der


@dataclass(frozen=True)
class SgxPolicy:
    """What the provider accepts from an SGX enclave. No permissive default.

    ``mr_enclaves`` (32-byte values) is an allow-list of enclave measurements. Alternatively
    ``mr_signers`` with ``isv_prod_ids`` accepts any enclave of those products signed by those
    keys, at ``min_isv_svn`` or later. A policy with neither refuses every quote; when both are
    given, both must match. ``allow_tcb_statuses`` lists statuses accepted besides UpToDate (the
    advisories are returned in the claims either way); ``reject_advisories`` refuses quotes that
    carry any of those advisory IDs whatever their status. ``allow_debug`` accepts debug enclaves
    (whose memory the host can read: development only) in :func:`check_sgx_body`; dcap-qvl 0.7
    itself refuses debug quotes, so :func:`verify_sgx` refuses them whatever this says.
    ``root_ca_der`` is the trust anchor, Intel's SGX Root CA unless a test injects its own.
    """

    mr_enclaves: frozenset[bytes] = field(default_factory=frozenset)
    mr_signers: frozenset[bytes] = field(default_factory=frozenset)
    isv_prod_ids: frozenset[int] = field(default_factory=frozenset)
    min_isv_svn: int = 0
    allow_tcb_statuses: frozenset[str] = field(default_factory=frozenset)
    reject_advisories: frozenset[str] = field(default_factory=frozenset)
    allow_debug: bool = False
    root_ca_der: bytes = INTEL_SGX_ROOT_CA_DER

    def __post_init__(self) -> None:
        object.__setattr__(self, "mr_enclaves", _digests(self.mr_enclaves, 32, "mr_enclaves"))
        object.__setattr__(self, "mr_signers", _digests(self.mr_signers, 32, "mr_signers"))
        prods = frozenset(self.isv_prod_ids)
        if not all(type(p) is int and 0 <= p < 2**16 for p in prods):
            raise ValueError("isv_prod_ids must be 16-bit integers")
        object.__setattr__(self, "isv_prod_ids", prods)
        if type(self.min_isv_svn) is not int or not 0 <= self.min_isv_svn < 2**16:
            raise ValueError("min_isv_svn must be a 16-bit integer")
        object.__setattr__(self, "allow_tcb_statuses", _statuses(self.allow_tcb_statuses))
        object.__setattr__(self, "reject_advisories", _advisories(self.reject_advisories))
        if not isinstance(self.allow_debug, bool):
            raise TypeError("allow_debug must be a bool")
        _root(self.root_ca_der)


@dataclass(frozen=True)
class TdxPolicy:
    """What the provider accepts from a TDX trust domain. No permissive default.

    ``mr_tds`` (48-byte values) is the allow-list of initial TD measurements (the TD's firmware
    image); empty refuses every quote. ``rtmr0`` … ``rtmr3`` are allow-lists for the runtime
    measurement registers (firmware configuration, kernel and command line, application): an
    empty list leaves that register unchecked, so a provider that wants to pin the guest kernel
    and the mlcapsule worker must list them. ``td_attributes`` (8 bytes), when set, must equal
    the quote's TD_ATTRIBUTES exactly (pinning e.g. SEPT_VE_DISABLE). Status, advisory, debug and
    root options are as in :class:`SgxPolicy`.
    """

    mr_tds: frozenset[bytes] = field(default_factory=frozenset)
    rtmr0: frozenset[bytes] = field(default_factory=frozenset)
    rtmr1: frozenset[bytes] = field(default_factory=frozenset)
    rtmr2: frozenset[bytes] = field(default_factory=frozenset)
    rtmr3: frozenset[bytes] = field(default_factory=frozenset)
    td_attributes: bytes | None = None
    allow_tcb_statuses: frozenset[str] = field(default_factory=frozenset)
    reject_advisories: frozenset[str] = field(default_factory=frozenset)
    allow_debug: bool = False
    root_ca_der: bytes = INTEL_SGX_ROOT_CA_DER

    def __post_init__(self) -> None:
        for name in ("mr_tds", "rtmr0", "rtmr1", "rtmr2", "rtmr3"):
            object.__setattr__(self, name, _digests(getattr(self, name), 48, name))
        if self.td_attributes is not None and (not isinstance(self.td_attributes, bytes)
                                               or len(self.td_attributes) != 8):
            raise ValueError("td_attributes must be 8 bytes or None")
        object.__setattr__(self, "allow_tcb_statuses", _statuses(self.allow_tcb_statuses))
        object.__setattr__(self, "reject_advisories", _advisories(self.reject_advisories))
        if not isinstance(self.allow_debug, bool):
            raise TypeError("allow_debug must be a bool")
        _root(self.root_ca_der)

    def rtmr_allow_lists(self) -> tuple[frozenset[bytes], ...]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)


# -- claims --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SgxClaims:
    """What :func:`verify_sgx` vouches for. ``advisory_ids`` are for the server's log."""

    tcb_status: str
    advisory_ids: tuple[str, ...]
    body: SgxReportBody
    ppid: bytes  # the platform's PPID from the PCK certificate (stable per CPU package)

    @property
    def mr_enclave(self) -> bytes:
        return self.body.mr_enclave

    @property
    def report_data(self) -> bytes:
        return self.body.report_data


@dataclass(frozen=True)
class TdxClaims:
    """What :func:`verify_tdx` vouches for. ``advisory_ids`` are for the server's log."""

    tcb_status: str
    advisory_ids: tuple[str, ...]
    body: TdReportBody
    ppid: bytes

    @property
    def mr_td(self) -> bytes:
        return self.body.mr_td

    @property
    def report_data(self) -> bytes:
        return self.body.report_data


# -- the checks of this module, usable on parsed bodies ----------------------------------------------------
def _check_status(kind: str, status: str, advisories: tuple[str, ...], allowed: frozenset[str],
                  rejected: frozenset[str]) -> None:
    if status != UP_TO_DATE and status not in allowed:
        listed = f" (advisories: {', '.join(advisories)})" if advisories else ""
        raise AttestationError(f"{kind} TCB status check failed: the platform is {status}{listed}",
                               hint="update the platform's microcode/firmware, or ask the provider to accept "
                                    "this TCB status")
    bad = sorted(set(advisories) & rejected)
    if bad:
        raise AttestationError(f"{kind} advisory check failed: the platform is affected by {', '.join(bad)}",
                               hint="update the platform's microcode/firmware")


def _check_report_data(kind: str, report_data: bytes, expected: bytes | None) -> None:
    if expected is None:
        return
    if not hmac.compare_digest(report_data[:len(expected)], expected):
        raise AttestationError(f"{kind} report_data check failed: the quote does not bind this challenge "
                               "and these keys (report_data differs)",
                               hint="the evidence was made for another session; run setup again")


def check_sgx_body(body: SgxReportBody, policy: SgxPolicy, *, expected_report_data: bytes | None) -> None:
    """The identity, debug and binding checks on a (verified) SGX report body."""
    if body.debug and not policy.allow_debug:
        raise AttestationError("SGX debug check failed: the enclave runs in debug mode (its memory is readable "
                               "by the host)", hint="run a production-signed enclave")
    if not policy.mr_enclaves and not (policy.mr_signers and policy.isv_prod_ids):
        raise AttestationError("SGX identity check failed: the server accepts no SGX enclaves yet",
                               hint="the provider must allow an MRENCLAVE, or an MRSIGNER and ISVPRODID")
    if policy.mr_enclaves and body.mr_enclave not in policy.mr_enclaves:
        raise AttestationError(f"SGX MRENCLAVE check failed: {body.mr_enclave.hex()[:16]}... is not on the "
                               "server's allow-list")
    if policy.mr_signers and body.mr_signer not in policy.mr_signers:
        raise AttestationError(f"SGX MRSIGNER check failed: {body.mr_signer.hex()[:16]}... is not on the "
                               "server's allow-list")
    if policy.isv_prod_ids and body.isv_prod_id not in policy.isv_prod_ids:
        raise AttestationError(f"SGX ISVPRODID check failed: product {body.isv_prod_id} is not accepted")
    if body.isv_svn < policy.min_isv_svn:
        raise AttestationError(f"SGX ISVSVN check failed: {body.isv_svn} is below the minimum "
                               f"{policy.min_isv_svn}", hint="upgrade the enclave")
    _check_report_data("SGX", body.report_data, expected_report_data)


def check_tdx_body(body: TdReportBody, policy: TdxPolicy, *, expected_report_data: bytes | None) -> None:
    """The identity, debug and binding checks on a (verified) TD report body."""
    if body.debug and not policy.allow_debug:
        raise AttestationError("TDX debug check failed: the TD runs in debug mode (the host can read and "
                               "change its state)", hint="run a production TD")
    if policy.td_attributes is not None and body.td_attributes != policy.td_attributes:
        raise AttestationError(f"TDX TD_ATTRIBUTES check failed: {body.td_attributes.hex()} is not "
                               f"{policy.td_attributes.hex()}")
    if not policy.mr_tds:
        raise AttestationError("TDX MRTD check failed: the server accepts no TDX trust domains yet",
                               hint="the provider must allow an MRTD")
    if body.mr_td not in policy.mr_tds:
        raise AttestationError(f"TDX MRTD check failed: {body.mr_td.hex()[:16]}... is not on the server's "
                               "allow-list")
    for i, (value, allowed) in enumerate(zip(body.rtmrs, policy.rtmr_allow_lists(), strict=True)):
        if allowed and value not in allowed:
            raise AttestationError(f"TDX RTMR{i} check failed: {value.hex()[:16]}... is not on the server's "
                                   "allow-list")
    _check_report_data("TDX", body.report_data, expected_report_data)


# -- dcap-qvl ------------------------------------------------------------------------------------------
#: dcap-qvl error text (lower-case substrings, first match wins) -> the check that failed.
_CHECKS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("expired", "in the future", "not yet valid", "notvalidyet"), "collateral validity at the verification time"),
    (("tcb status is invalid",), "TCB status (Revoked is never accepted)"),
    (("debug mode",), "debug check (dcap-qvl refuses debug enclaves and TDs)"),
    (("sept_ve_disable", "td attributes", "td profiling", "servtd_ext", "td migration", "service td"),
     "TD attributes (dcap-qvl's TD policy)"),
    (("revoked",), "certificate revocation (CRL)"),
    (("for tcb_info",), "TCB info signature"),
    (("for qe_identity",), "QE identity signature"),
    (("isv enclave report signature",), "quote signature (attestation key over header and body)"),
    (("qe report hash",), "QE report (binding of the attestation key)"),
    (("qe_report", "qe report"), "QE report signature (PCK certificate)"),
    (("qe identity", "qeidentity", "qe vendor"), "QE identity"),
    (("root ca", "certificate chain", "pck cert", "pck certificate"), "PCK certificate chain to the Intel root"),
    (("tcb level", "tcbinfo", "tcb info"), "TCB level (TCB info)"),
    (("decode quote", "quote version", "tee type", "body type"), "quote format"),
    (("collateral", "crl"), "collateral"),
)


def _check_name(message: str) -> str:
    low = message.lower()
    for needles, name in _CHECKS:
        if any(n in low for n in needles):
            return name
    return "DCAP quote verification"


def _collateral(collateral: Any, kind: str) -> Any:
    import dcap_qvl

    if isinstance(collateral, Mapping):
        try:
            text = json.dumps(dict(collateral))
        except (TypeError, ValueError) as e:
            raise AttestationError(f"{kind} collateral is malformed: not JSON data") from e
    elif isinstance(collateral, bytes):
        if len(collateral) > MAX_COLLATERAL_LEN:
            raise AttestationError(f"{kind} collateral is malformed: too long")
        try:
            text = collateral.decode("utf-8")
        except UnicodeDecodeError as e:
            raise AttestationError(f"{kind} collateral is malformed: not UTF-8 JSON") from e
    else:
        raise AttestationError(f"{kind} collateral must be a JSON object or its bytes")
    if len(text) > MAX_COLLATERAL_LEN:
        raise AttestationError(f"{kind} collateral is malformed: too long")
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(text)
    except BaseException as e:  # noqa: B036 -- a Rust panic surfaces as a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise AttestationError(f"{kind} collateral is malformed: {_detail(e)}") from e


def _detail(e: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip() and line.strip() != "Caused by:")
    return text[:200]


def _dcap_verify(kind: str, quote: bytes, collateral: Any, now: Any, root_ca_der: bytes) -> dict[str, Any]:
    """dcap-qvl's verdict as a dict (status, advisory_ids, report, ppid); AttestationError otherwise."""
    import dcap_qvl

    if type(now) is not int or not 0 <= now < 2**63:
        raise AttestationError(f"{kind} verification time must be Unix seconds (an int)")
    col = _collateral(collateral, kind)
    try:
        report = dcap_qvl.verify_with_root_ca(quote, col, root_ca_der, now)
        verdict = json.loads(report.to_json())
        verdict["ppid"] = bytes(report.ppid)
    except BaseException as e:  # noqa: B036 -- a Rust panic surfaces as a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        check = _check_name(str(e))
        raise AttestationError(f"{kind} quote refused: {check} failed ({_detail(e)})") from e
    if not isinstance(verdict, dict) or not isinstance(verdict.get("status"), str) \
            or not isinstance(verdict.get("advisory_ids"), list) \
            or not all(isinstance(a, str) for a in verdict["advisory_ids"]) \
            or not isinstance(verdict.get("report"), dict):
        raise AttestationError(f"{kind} quote refused: the verifier returned no verdict")
    return verdict


def _cross_check(kind: str, verdict: dict[str, Any], variants: tuple[str, ...], ours: Mapping[str, bytes]) -> None:
    """dcap-qvl's parse of the signed body must agree with ours on the fields we decide on."""
    report = verdict["report"]
    theirs = next((report[k] for k in variants if isinstance(report.get(k), dict)), None)
    if theirs is not None and isinstance(theirs.get("base"), dict):  # TDX 1.5: the 1.0 fields under "base"
        theirs = {**theirs["base"], **theirs}
    try:
        ok = theirs is not None and all(bytes.fromhex(theirs[name]) == value for name, value in ours.items())
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise AttestationError(f"{kind} quote refused: the verified report body does not match the quote")


def verify_sgx(quote: bytes, collateral: Mapping[str, Any] | bytes, *, policy: SgxPolicy, now: int,
               expected_report_data: bytes | None) -> SgxClaims:
    """Verify an SGX DCAP v3 quote with its collateral at ``now`` (Unix seconds) under ``policy``.

    ``collateral`` is the JSON object dcap-qvl reads (PCS responses; see docs/attestation.md) or
    its UTF-8 bytes. ``expected_report_data`` (32 or 64 bytes) must be the start of the quote's
    64-byte report_data; None skips that check (only for recorded evidence).
    """
    if not isinstance(policy, SgxPolicy):
        raise TypeError("policy must be an SgxPolicy")
    _check_expected(expected_report_data)
    body = parse_sgx_quote(quote)
    verdict = _dcap_verify("SGX", quote, collateral, now, policy.root_ca_der)
    _cross_check("SGX", verdict, ("SgxEnclave",), {"mr_enclave": body.mr_enclave, "mr_signer": body.mr_signer,
                                                   "attributes": body.attributes, "report_data": body.report_data})
    advisories = tuple(verdict["advisory_ids"])
    _check_status("SGX", verdict["status"], advisories, policy.allow_tcb_statuses, policy.reject_advisories)
    check_sgx_body(body, policy, expected_report_data=expected_report_data)
    return SgxClaims(tcb_status=verdict["status"], advisory_ids=advisories, body=body, ppid=verdict["ppid"])


def verify_tdx(quote: bytes, collateral: Mapping[str, Any] | bytes, *, policy: TdxPolicy, now: int,
               expected_report_data: bytes | None) -> TdxClaims:
    """Verify a TDX quote (v4, or v5 with a TDX 1.0/1.5 body) at ``now`` under ``policy``.

    Arguments as for :func:`verify_sgx`.
    """
    if not isinstance(policy, TdxPolicy):
        raise TypeError("policy must be a TdxPolicy")
    _check_expected(expected_report_data)
    body = parse_tdx_quote(quote)
    verdict = _dcap_verify("TDX", quote, collateral, now, policy.root_ca_der)
    _cross_check("TDX", verdict, ("TD10", "TD15"), {"mr_td": body.mr_td, "td_attributes": body.td_attributes,
                                                    "rt_mr0": body.rtmrs[0], "rt_mr1": body.rtmrs[1],
                                                    "rt_mr2": body.rtmrs[2], "rt_mr3": body.rtmrs[3],
                                                    "report_data": body.report_data})
    advisories = tuple(verdict["advisory_ids"])
    _check_status("TDX", verdict["status"], advisories, policy.allow_tcb_statuses, policy.reject_advisories)
    check_tdx_body(body, policy, expected_report_data=expected_report_data)
    return TdxClaims(tcb_status=verdict["status"], advisory_ids=advisories, body=body, ppid=verdict["ppid"])


def _check_expected(expected: bytes | None) -> None:
    if expected is not None and (not isinstance(expected, bytes) or len(expected) not in (32, 64)):
        raise TypeError("expected_report_data must be 32 or 64 bytes, or None")
