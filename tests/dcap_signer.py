"""Test-only Intel SGX (DCAP quote v3) and TDX (quote v4/v5) signers under a fake Intel root.

Recorded quotes cannot carry a fresh nonce, so end-to-end tests sign their own quotes with a
fake "Intel SGX Root CA" that the real verifier (dcap-qvl, through
:func:`mlcapsule.attestation.dcap.verify_sgx` / ``verify_tdx``) accepts once the root is
injected (``SgxPolicy(root_ca_der=intel.root_ca_der)`` / ``TdxPolicy(...)``). Only pyca
``cryptography`` does cryptography here (ECDSA P-256, the X.509 and CRL builders); the DER of
the Intel SGX extension and the quote layouts are plain byte packing.

API (other tests and the ``cvm`` backend's fake configfs-tsm tree use exactly this)::

    from dcap_signer import FakeIntel, VALID_AT

    intel = FakeIntel(seed=0)                 # deterministic per seed (keys, serials, RFC 6979 signatures):
                                              # two FakeIntel(0) agree byte for byte
    intel.root_ca_der                         # DER of the fake root: inject it into the policy
    intel.valid_at                            # == VALID_AT, a Unix time inside every default window
    q = intel.sgx_quote(report_data, mr_enclave=..., mr_signer=..., isv_prod_id=0, isv_svn=0,
                        debug=False)          # SGX DCAP quote v3, certification data type 5
    q = intel.tdx_quote(report_data, mr_td=..., rtmrs=(r0, r1, r2, r3), td_attributes=...,
                        debug=False, version=4)   # or version=5 (body type 3, TDX 1.5, unless
                                                  # body_type=2 asks for a TDX 1.0 body)
    c = intel.collateral("sgx" | "tdx", tcb_status="UpToDate", advisory_ids=(),
                         issue_date=ISSUE_DATE, next_update=NEXT_UPDATE, revoke_pck=False)

``report_data`` is 64 bytes (shorter values are zero-padded on the right). ``mr_enclave`` and
``mr_signer`` are 32 bytes, ``mr_td`` and each RTMR 48 bytes, ``td_attributes`` 8 bytes
(default: SEPT_VE_DISABLE only, as on production TDs; ``debug=True`` sets TUD.DEBUG on top).
dcap-qvl 0.7 refuses debug enclaves and TDs itself, whatever the policy's ``allow_debug`` says,
so ``debug=True`` quotes only test that refusal.

What the pieces are, as on a real platform:

* root CA (self-signed, CN "Intel SGX Root CA") -> "Intel SGX PCK Processor CA" -> the PCK leaf
  carrying the SGX extension (OID 1.2.840.113741.1.13.1: PPID, TCB with 16 CPUSVN components and
  PCESVN, PCEID, FMSPC, SGX type); root -> "Intel SGX TCB Signing" (signs TCB info and QE
  identity). CRLs: the root CRL (signed by the root) and the PCK CRL (signed by the PCK CA).
* the quoting enclave (QE) report, signed by the PCK key, whose report_data starts with
  SHA-256(attestation public key || QE authentication data); the attestation key signs the
  quote header and report body.

:meth:`FakeIntel.collateral` returns the JSON object dcap.py hands to dcap-qvl (the same shape
as the recorded ``sgx_quote_collateral.json``). Its TCB info has a level matching exactly this
platform's TCB with ``tcb_status`` and ``advisory_ids`` (plus, when that status is not
UpToDate, a higher UpToDate level the platform does not reach), so dcap-qvl computes the status
asked for; the QE identity is UpToDate. Everything (TCB info, QE identity and both CRLs) is
valid from ``issue_date`` to ``next_update`` (aware datetimes or Unix seconds; by default
:data:`ISSUE_DATE` .. :data:`NEXT_UPDATE`, 2025-01-01 .. 2040-01-01, wide enough that the
server's own clock falls inside); certificates are valid 2024-01-01 .. 2049-12-31. Pass
``now=intel.valid_at`` (or the server clock) to the verifier. ``revoke_pck=True`` lists the
PCK certificate on the PCK CRL.

A signature covers: the attestation key's over header + body (v5: header + body descriptor +
body); the PCK key's over the QE report; the TCB signing key's over the TCB info and QE identity
JSON text; the CAs' over certificates and CRLs. Flipping any byte of those refuses the quote.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

__all__ = ["ISSUE_DATE", "NEXT_UPDATE", "VALID_AT", "FakeIntel", "INTEL_QE_VENDOR_ID", "TCB_STATUSES"]

UTC = dt.UTC
CERT_NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=UTC)
CERT_NOT_AFTER = dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)
#: Default validity window of the collateral (TCB info, QE identity, CRLs).
ISSUE_DATE = dt.datetime(2025, 1, 1, tzinfo=UTC)
NEXT_UPDATE = dt.datetime(2040, 1, 1, tzinfo=UTC)
#: A Unix time inside the default collateral window (2026-01-01T00:00:00Z).
VALID_AT = int(dt.datetime(2026, 1, 1, tzinfo=UTC).timestamp())

#: Every TCB status a TCB level may carry (dcap-qvl refuses Revoked itself).
TCB_STATUSES = ("UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
                "OutOfDate", "OutOfDateConfigurationNeeded", "Revoked")

INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
TEE_SGX, TEE_TDX = 0x00000000, 0x00000081
ATT_KEY_ECDSA_P256 = 2
CERT_DATA_PCK_CHAIN = 5
CERT_DATA_QE_REPORT = 6
SGX_OID = "1.2.840.113741.1.13.1"

# The platform's TCB (what the PCK certificate and the TD report say) and the QE's.
CPUSVN = bytes([4, 4, 2, 2, 3, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0])
PCESVN = 13
QE_SVN = 8
TEE_TCB_SVN = bytes([5, 3, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # [module ISVSVN, module version, ...]
FMSPC = bytes.fromhex("00806F050000")
PCEID = b"\x00\x00"
SGX_QE_PROD_ID, TD_QE_PROD_ID = 1, 2
QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")  # INIT | PROVISIONKEY, not debug
QE_ATTRIBUTES_MASK = "FBFFFFFFFFFFFFFF0000000000000000"
SGX_FLAGS = 0x05  # INIT | MODE64BIT
SGX_FLAG_DEBUG = 0x02
SGX_XFRM = 0xE7
TD_ATTRIBUTES = bytes.fromhex("0000001000000000")  # SEPT_VE_DISABLE (bit 28)
TD_DEBUG = 0x01
XFAM = bytes.fromhex("e702060000000000")
TDX_MODULE_MRSIGNER = bytes(48)  # Intel's TDX module MRSIGNER is all zero
TCB_DATE = "2024-03-13T00:00:00Z"
N_P256 = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


# -- DER bits for the SGX extension (packing only) ---------------------------------------------------------------
def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytes([40 * parts[0] + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        body += bytes(reversed(chunk))
    return _tlv(0x06, body)


def _int(value: int, tag: int = 0x02) -> bytes:
    raw = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")  # room for the sign bit
    return _tlv(tag, raw)


def _seq(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def _entry(sub: str, value: bytes) -> bytes:
    return _seq(_oid(f"{SGX_OID}.{sub}"), value)


def sgx_extension(*, ppid: bytes, cpusvn: bytes, pcesvn: int, pceid: bytes, fmspc: bytes) -> bytes:
    """The DER value of the Intel SGX extension of a PCK certificate (processor CA layout)."""
    tcb = [_entry(f"2.{i + 1}", _int(svn)) for i, svn in enumerate(cpusvn)]
    tcb += [_entry("2.17", _int(pcesvn)), _entry("2.18", _tlv(0x04, cpusvn))]
    return _seq(_entry("1", _tlv(0x04, ppid)), _entry("2", _seq(*tcb)), _entry("3", _tlv(0x04, pceid)),
                _entry("4", _tlv(0x04, fmspc)), _entry("5", _int(0, tag=0x0A)))


# -- keys, names, signatures --------------------------------------------------------------------------------------
def _derive(seed: int, label: str, n: int = 32) -> bytes:
    return hashlib.shake_256(f"mlcapsule fake intel {seed} {label}".encode()).digest(n)


def _key(seed: int, label: str) -> ec.EllipticCurvePrivateKey:
    scalar = int.from_bytes(hashlib.sha512(_derive(seed, f"key {label}")).digest(), "big") % (N_P256 - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Intel Corporation"),
                      x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
                      x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
                      x509.NameAttribute(NameOID.COUNTRY_NAME, "US")])


def _raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 as Intel encodes it: r || s, 32 bytes each, big-endian."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True)))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_pub(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]


def _pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(Encoding.PEM).decode() for c in certs)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _when(value: dt.datetime | int) -> dt.datetime:
    """A time given as an aware datetime or as Unix seconds, to the second."""
    if isinstance(value, int):
        return dt.datetime.fromtimestamp(value, UTC)
    if not isinstance(value, dt.datetime) or value.tzinfo is None:
        raise TypeError("times must be timezone-aware datetimes or Unix seconds")
    return value.astimezone(UTC).replace(microsecond=0)


def _fixed(value: bytes, n: int, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != n:
        raise ValueError(f"{name} must be {n} bytes")
    return value


def _report_data(value: bytes) -> bytes:
    if not isinstance(value, bytes) or len(value) > 64:
        raise ValueError("report_data must be at most 64 bytes")
    return value.ljust(64, b"\0")


class FakeIntel:
    """A fake Intel PKI and one fake platform (PCK certificate, QE, attestation key). See the module doc."""

    valid_at = VALID_AT

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._root_key = _key(seed, "root")
        self._pck_ca_key = _key(seed, "pck ca")
        self._tcb_key = _key(seed, "tcb signing")
        self._pck_key = _key(seed, "pck")
        self.attestation_key = _key(seed, "attestation")
        self.ppid = _derive(seed, "ppid", 16)
        self.qe_id = _derive(seed, "qe id", 16)
        self.qe_auth_data = _derive(seed, "qe auth data", 32)
        self.sgx_qe_mrsigner = _derive(seed, "sgx qe mrsigner")
        self.td_qe_mrsigner = _derive(seed, "td qe mrsigner")
        self.root = self._cert("Intel SGX Root CA", self._root_key, None, ca_pathlen=1)
        self.pck_ca = self._cert("Intel SGX PCK Processor CA", self._pck_ca_key, (self.root, self._root_key),
                                 ca_pathlen=0)
        self.tcb_signing = self._cert("Intel SGX TCB Signing", self._tcb_key, (self.root, self._root_key))
        ext = sgx_extension(ppid=self.ppid, cpusvn=CPUSVN, pcesvn=PCESVN, pceid=PCEID, fmspc=FMSPC)
        self.pck = self._cert("Intel SGX PCK Certificate", self._pck_key, (self.pck_ca, self._pck_ca_key),
                              sgx_ext=ext)

    # -- certificates -------------------------------------------------------------------------------------------
    def _cert(self, cn: str, key: ec.EllipticCurvePrivateKey,
              issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, *,
              ca_pathlen: int | None = None, sgx_ext: bytes | None = None) -> x509.Certificate:
        serial = int.from_bytes(_derive(self.seed, f"serial {cn}", 16), "big") >> 1 | 1
        issuer_name = issuer[0].subject if issuer else _name(cn)
        signer = issuer[1] if issuer else key
        ca = ca_pathlen is not None
        b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer_name)
             .public_key(key.public_key()).serial_number(serial)
             .not_valid_before(CERT_NOT_BEFORE).not_valid_after(CERT_NOT_AFTER)
             .add_extension(x509.BasicConstraints(ca=ca, path_length=ca_pathlen), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=not ca,
                                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                                          key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False),
                            critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                            critical=False))
        if sgx_ext is not None:
            b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_OID), sgx_ext), critical=False)
        return b.sign(signer, hashes.SHA256(), ecdsa_deterministic=True)

    @property
    def root_ca_der(self) -> bytes:
        """DER of the fake Intel SGX Root CA: the trust anchor a test injects into the policy."""
        return self.root.public_bytes(Encoding.DER)

    @property
    def pck_chain_pem(self) -> str:
        return _pem(self.pck, self.pck_ca, self.root)

    # -- quotes -------------------------------------------------------------------------------------------------
    def _header(self, version: int, tee_type: int) -> bytes:
        return struct.pack("<HHIHH16s20s", version, ATT_KEY_ECDSA_P256, tee_type, QE_SVN, PCESVN,
                           INTEL_QE_VENDOR_ID, self.qe_id + bytes(4))

    def _qe_report(self, tdx: bool) -> bytes:
        att_pub = _raw_pub(self.attestation_key)
        report_data = hashlib.sha256(att_pub + self.qe_auth_data).digest() + bytes(32)
        mrsigner = self.td_qe_mrsigner if tdx else self.sgx_qe_mrsigner
        prod = TD_QE_PROD_ID if tdx else SGX_QE_PROD_ID
        mrenclave = _derive(self.seed, "td qe mrenclave" if tdx else "sgx qe mrenclave")
        return _enclave_report(cpu_svn=CPUSVN, attributes=QE_ATTRIBUTES, mr_enclave=mrenclave, mr_signer=mrsigner,
                               isv_prod_id=prod, isv_svn=QE_SVN, report_data=report_data)

    def _qe_certification(self, tdx: bool) -> bytes:
        """QE report, its PCK signature, the QE authentication data and the PCK chain (type 5)."""
        qe_report = self._qe_report(tdx)
        pem = self.pck_chain_pem.encode()
        return (qe_report + _raw_sig(self._pck_key, qe_report) + struct.pack("<H", len(self.qe_auth_data))
                + self.qe_auth_data + struct.pack("<HI", CERT_DATA_PCK_CHAIN, len(pem)) + pem)

    def sgx_quote(self, report_data: bytes, *, mr_enclave: bytes = bytes(32), mr_signer: bytes = bytes(32),
                  isv_prod_id: int = 0, isv_svn: int = 0, debug: bool = False) -> bytes:
        """An SGX DCAP quote v3 of an enclave with these identities, signed by this platform."""
        flags = SGX_FLAGS | (SGX_FLAG_DEBUG if debug else 0)
        attributes = struct.pack("<QQ", flags, SGX_XFRM)
        body = _enclave_report(cpu_svn=CPUSVN, attributes=attributes,
                               mr_enclave=_fixed(mr_enclave, 32, "mr_enclave"),
                               mr_signer=_fixed(mr_signer, 32, "mr_signer"), isv_prod_id=isv_prod_id,
                               isv_svn=isv_svn, report_data=_report_data(report_data))
        signed = self._header(3, TEE_SGX) + body
        auth = _raw_sig(self.attestation_key, signed) + _raw_pub(self.attestation_key) + self._qe_certification(False)
        return signed + struct.pack("<I", len(auth)) + auth

    def tdx_quote(self, report_data: bytes, *, mr_td: bytes = bytes(48),
                  rtmrs: Sequence[bytes] = (bytes(48),) * 4, td_attributes: bytes = TD_ATTRIBUTES,
                  debug: bool = False, version: int = 4, body_type: int | None = None) -> bytes:
        """A TDX quote (v4; or v5, by default with a TDX 1.5 body) of a TD, signed by this platform."""
        if version not in (4, 5):
            raise ValueError("version must be 4 or 5")
        body_type = body_type if body_type is not None else (2 if version == 4 else 3)
        if body_type not in (2, 3) or (version == 4 and body_type != 2):
            raise ValueError("body_type must be 2 (TDX 1.0) or, in a v5 quote, 3 (TDX 1.5)")
        if len(rtmrs) != 4:
            raise ValueError("rtmrs must be four 48-byte values")
        attrs = bytearray(_fixed(td_attributes, 8, "td_attributes"))
        if debug:
            attrs[0] |= TD_DEBUG
        body = (TEE_TCB_SVN + _derive(self.seed, "mrseam", 48) + TDX_MODULE_MRSIGNER + bytes(8) + bytes(attrs)
                + XFAM + _fixed(mr_td, 48, "mr_td") + bytes(48 * 3)
                + b"".join(_fixed(r, 48, f"rtmrs[{i}]") for i, r in enumerate(rtmrs)) + _report_data(report_data))
        assert len(body) == 584
        if body_type == 3:
            body += TEE_TCB_SVN + bytes(48)  # tee_tcb_svn2, mr_service_td (no service TD)
        signed = self._header(version, TEE_TDX)
        if version == 5:
            signed += struct.pack("<HI", body_type, len(body))
        signed += body
        qe = self._qe_certification(True)
        auth = (_raw_sig(self.attestation_key, signed) + _raw_pub(self.attestation_key)
                + struct.pack("<HI", CERT_DATA_QE_REPORT, len(qe)) + qe)
        return signed + struct.pack("<I", len(auth)) + auth

    # -- collateral -----------------------------------------------------------------------------------------------
    def _crl(self, issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, revoked: Sequence[x509.Certificate],
             issue_date: dt.datetime, next_update: dt.datetime) -> bytes:
        b = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
             .last_update(issue_date).next_update(next_update)
             .add_extension(x509.CRLNumber(1), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False))
        for cert in revoked:
            b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                                          .revocation_date(issue_date).build())
        return b.sign(key, hashes.SHA256(), ecdsa_deterministic=True).public_bytes(Encoding.DER)

    def collateral(self, kind: str, *, tcb_status: str = "UpToDate", advisory_ids: Sequence[str] = (),
                   issue_date: dt.datetime | int = ISSUE_DATE, next_update: dt.datetime | int = NEXT_UPDATE,
                   revoke_pck: bool = False) -> dict[str, Any]:
        """The collateral JSON object for this platform's ``kind`` ("sgx" or "tdx") quotes. See the module doc."""
        if kind not in ("sgx", "tdx"):
            raise ValueError('kind must be "sgx" or "tdx"')
        if tcb_status not in TCB_STATUSES:
            raise ValueError(f"tcb_status must be one of {TCB_STATUSES}")
        if isinstance(advisory_ids, str):
            raise TypeError("advisory_ids must be a collection of strings")
        tdx = kind == "tdx"
        issue_date, next_update = _when(issue_date), _when(next_update)
        dates = {"issueDate": _iso(issue_date), "nextUpdate": _iso(next_update)}

        def level(cpusvn: bytes, tdx_svn: bytes, status: str, advisories: Sequence[str]) -> dict[str, Any]:
            tcb: dict[str, Any] = {"sgxtcbcomponents": [{"svn": s} for s in cpusvn], "pcesvn": PCESVN}
            if tdx:
                tcb["tdxtcbcomponents"] = [{"svn": s} for s in tdx_svn]
            out: dict[str, Any] = {"tcb": tcb, "tcbDate": TCB_DATE, "tcbStatus": status}
            if advisories:
                out["advisoryIDs"] = list(advisories)
            return out

        levels = [level(CPUSVN, TEE_TCB_SVN, tcb_status, advisory_ids)]
        if tcb_status != "UpToDate":  # a newer level this platform has not reached
            levels.insert(0, level(bytes(s + 1 for s in CPUSVN), bytes(s + 1 for s in TEE_TCB_SVN), "UpToDate", ()))
        tcb_info: dict[str, Any] = {"id": "TDX" if tdx else "SGX", "version": 3, **dates, "fmspc": FMSPC.hex().upper(),
                                    "pceId": PCEID.hex().upper(), "tcbType": 0, "tcbEvaluationDataNumber": 17}
        if tdx:
            module = {"mrsigner": TDX_MODULE_MRSIGNER.hex().upper(), "attributes": "0000000000000000",
                      "attributesMask": "FFFFFFFFFFFFFFFF"}
            tcb_info["tdxModule"] = module
            tcb_info["tdxModuleIdentities"] = [{
                "id": f"TDX_{TEE_TCB_SVN[1]:02X}", **module,
                "tcbLevels": [{"tcb": {"isvsvn": TEE_TCB_SVN[0]}, "tcbDate": TCB_DATE, "tcbStatus": "UpToDate"}]}]
        tcb_info["tcbLevels"] = levels
        qe_identity = {"id": "TD_QE" if tdx else "QE", "version": 2, **dates, "tcbEvaluationDataNumber": 17,
                       "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
                       "attributes": QE_ATTRIBUTES.hex().upper(), "attributesMask": QE_ATTRIBUTES_MASK,
                       "mrsigner": (self.td_qe_mrsigner if tdx else self.sgx_qe_mrsigner).hex().upper(),
                       "isvprodid": TD_QE_PROD_ID if tdx else SGX_QE_PROD_ID,
                       "tcbLevels": [{"tcb": {"isvsvn": QE_SVN}, "tcbDate": TCB_DATE, "tcbStatus": "UpToDate"}]}
        tcb_text = json.dumps(tcb_info, separators=(",", ":"))
        qe_text = json.dumps(qe_identity, separators=(",", ":"))
        signing_chain = _pem(self.tcb_signing, self.root)
        return {
            "pck_crl_issuer_chain": _pem(self.pck_ca, self.root),
            "root_ca_crl": self._crl(self.root, self._root_key, (), issue_date, next_update).hex(),
            "pck_crl": self._crl(self.pck_ca, self._pck_ca_key, (self.pck,) if revoke_pck else (),
                                 issue_date, next_update).hex(),
            "tcb_info_issuer_chain": signing_chain,
            "tcb_info": tcb_text,
            "tcb_info_signature": _raw_sig(self._tcb_key, tcb_text.encode()).hex(),
            "qe_identity_issuer_chain": signing_chain,
            "qe_identity": qe_text,
            "qe_identity_signature": _raw_sig(self._tcb_key, qe_text.encode()).hex(),
        }


def _enclave_report(*, cpu_svn: bytes, attributes: bytes, mr_enclave: bytes, mr_signer: bytes, isv_prod_id: int,
                    isv_svn: int, report_data: bytes) -> bytes:
    """An SGX REPORTBODY (384 bytes), the layout of both the ISV enclave report and the QE report."""
    if not (0 <= isv_prod_id < 2**16 and 0 <= isv_svn < 2**16):
        raise ValueError("isv_prod_id and isv_svn must be 16-bit integers")
    out = (cpu_svn + struct.pack("<I", 0) + bytes(28) + attributes + mr_enclave + bytes(32) + mr_signer + bytes(96)
           + struct.pack("<HH", isv_prod_id, isv_svn) + bytes(60) + report_data)
    assert len(out) == 384
    return out
