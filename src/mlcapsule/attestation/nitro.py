"""The pure verifier for AWS Nitro Enclaves attestation documents. cbor2 and pyca, no I/O.

An attestation document is what the Nitro Security Module (NSM) returns to an enclave asking
for one: a COSE_Sign1 structure (RFC 9052; CBOR, tag 18 optional) whose payload is a CBOR map
with ``module_id``, ``timestamp`` (ms since the epoch), ``digest`` ("SHA384"), ``pcrs``
(index → 48-byte SHA-384 register), ``certificate`` (the enclave's short-lived leaf, DER),
``cabundle`` (DER certificates, root first), and the optional ``public_key``, ``user_data`` and
``nonce`` that the enclave passed to the NSM. See AWS's "Verifying the root of trust" page in the
Nitro Enclaves user guide.

:func:`verify_nitro` checks, each failure an :class:`AttestationError` naming it:

1. the document parses (COSE_Sign1, protected header ``{1: -35}`` = ES384, payload fields typed
   and bounded as AWS specifies);
2. the chain: ``cabundle[0]`` is the pinned AWS Nitro root (byte for byte), each next certificate
   is a CA signed by the previous one with ECDSA, the leaf ``certificate`` is signed by the last;
   every certificate is valid at the document's own ``timestamp`` (and at ``now`` when given);
3. the ES384 signature over the COSE Sig_structure ``["Signature1", protected, b"", payload]``
   with the leaf's P-384 key;
4. the provider's :class:`NitroPolicy`: debug mode (PCR0, PCR1 and PCR2 all zero) refused unless
   allowed, PCR0–2 (and PCR8 if the policy lists it) on the allow-lists; and the binding: the
   policy's ``bind_to`` field (``user_data`` by default, or ``nonce``) starts with the caller's
   expected report data.

Pinned root: AWS's "AWS_NitroEnclaves_Root-G1" (CN=aws.nitro-enclaves, valid 2019 to 2049),
``https://aws-nitro-enclaves.amazonaws.com/AWS_NitroEnclaves_Root-G1.zip``, whose SHA-256
(of the DER) AWS publishes as 641a0321…79bb5b; copied from evervault/attestation-doc-validation
into the shared attestation vectors (``nitro/aws_nitro_root.pem``).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..enclave.errors import AttestationError
from .policy import hex_allow_list

__all__ = ["AWS_NITRO_ROOT_DER", "AWS_NITRO_ROOT_SHA256", "NitroClaims", "NitroDocument", "NitroPolicy",
           "parse_nitro_document", "verify_nitro"]

_ROOT_B64 = (
    "MIICETCCAZagAwIBAgIRAPkxdWgbkK/hHUbMtOTn+FYwCgYIKoZIzj0EAwMwSTELMAkGA1UEBhMCVVMxDzANBgNVBAoMBkFtYXpvbjEM"
    "MAoGA1UECwwDQVdTMRswGQYDVQQDDBJhd3Mubml0cm8tZW5jbGF2ZXMwHhcNMTkxMDI4MTMyODA1WhcNNDkxMDI4MTQyODA1WjBJMQsw"
    "CQYDVQQGEwJVUzEPMA0GA1UECgwGQW1hem9uMQwwCgYDVQQLDANBV1MxGzAZBgNVBAMMEmF3cy5uaXRyby1lbmNsYXZlczB2MBAGByqG"
    "SM49AgEGBSuBBAAiA2IABPwCVOumCMHzaHDimtqQvkY4MpJzbolL//Zy2YlES1BR5TSksfbb48C8WBoyt7F2Bw7eEtaaP+ohG2bnUs99"
    "0d0JX28TcPQXCEPZ3BABIeTPYwEoCWZEh8l5YoQwTcU/9KNCMEAwDwYDVR0TAQH/BAUwAwEB/zAdBgNVHQ4EFgQUkCW1DdkFR+eWw5b6"
    "cp3PmanfS5YwDgYDVR0PAQH/BAQDAgGGMAoGCCqGSM49BAMDA2kAMGYCMQCjfy+Rocm9Xue4YnwWmNJVA44fA0P5W2OpYow9OYCVRaEe"
    "vL8uO1XYru5xtMPWrfMCMQCi85sWBbJwKKXdS6BptQFuZbT73o/gBh1qUxl/nNr12UO8Yfwr6wPLb+6NIwLz3/Y=")
#: The AWS Nitro Enclaves root certificate (DER); see the module docstring for provenance.
AWS_NITRO_ROOT_DER = base64.b64decode(_ROOT_B64)
AWS_NITRO_ROOT_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"

MAX_DOCUMENT = 16 * 1024
MAX_CERT = 1024  # AWS: each certificate is at most 1024 bytes
MAX_CABUNDLE = 8
MAX_OPTIONAL = {"public_key": 1024, "user_data": 512, "nonce": 512}
PCR_HEX_LEN = 96  # SHA-384
ES384 = -35
_PROTECTED = {1: ES384}
_PAYLOAD_FIELDS = frozenset({"module_id", "timestamp", "digest", "pcrs", "certificate", "cabundle",
                             "public_key", "user_data", "nonce"})
_CERT_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion,
                                             x509.DuplicateExtension, x509.UnsupportedGeneralNameType)
_VERIFY_ERRORS: tuple[type[Exception], ...] = (InvalidSignature, *_CERT_ERRORS)


@dataclass(frozen=True)
class NitroDocument:
    """A parsed attestation document. Parsing checks shapes only, nothing signed."""

    protected: bytes
    payload: bytes
    signature: bytes
    module_id: str
    timestamp_ms: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None

    @property
    def timestamp(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.timestamp_ms / 1000, dt.UTC)


def _loads(data: bytes, what: str) -> Any:
    """One CBOR item filling ``data`` exactly (cbor2.loads ignores trailing bytes: a document with junk
    appended would verify as the original, so the same evidence would have many encodings)."""
    fp = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(fp).decode()
    except Exception as e:  # cbor2 raises many types (CBORDecodeError, ValueError, RecursionError, ...)
        raise AttestationError(f"the Nitro attestation document's {what} is not valid CBOR") from e
    if fp.tell() != len(data):
        raise AttestationError(f"the Nitro attestation document's {what} has trailing bytes after its CBOR item")
    return obj


def _opt_bytes(p: Mapping[Any, Any], name: str) -> bytes | None:
    v = p.get(name)
    if v is None:
        return None
    if not isinstance(v, bytes) or len(v) > MAX_OPTIONAL[name]:
        raise AttestationError(f"the Nitro attestation document's {name} is malformed")
    return v


def parse_nitro_document(document: bytes) -> NitroDocument:
    """Parse a COSE_Sign1 Nitro attestation document (raw CBOR bytes); AttestationError on anything else."""
    if not isinstance(document, bytes | bytearray) or not 0 < len(document) <= MAX_DOCUMENT:
        raise AttestationError("the Nitro attestation document is missing or too large")
    obj = _loads(bytes(document), "COSE_Sign1 envelope")
    if isinstance(obj, cbor2.CBORTag):
        if obj.tag != 18:
            raise AttestationError("the Nitro attestation document is not a COSE_Sign1 (tag 18)")
        obj = obj.value
    if not isinstance(obj, list | tuple) or len(obj) != 4:  # cbor2 may give a tagged array as a tuple
        raise AttestationError("the Nitro attestation document is not a COSE_Sign1 array")
    protected, unprotected, payload, signature = obj
    if not (isinstance(protected, bytes) and isinstance(unprotected, Mapping) and isinstance(payload, bytes)
            and isinstance(signature, bytes)):
        raise AttestationError("the Nitro attestation document is not a COSE_Sign1 array")
    header = _loads(protected, "protected header")
    if not isinstance(header, Mapping) or dict(header) != _PROTECTED:
        raise AttestationError("the Nitro attestation document's protected header is not {alg: ES384}")
    p = _loads(payload, "payload")
    if not isinstance(p, Mapping) or not all(isinstance(k, str) for k in p) or not set(p) <= _PAYLOAD_FIELDS \
            or not _PAYLOAD_FIELDS - {"public_key", "user_data", "nonce"} <= set(p):
        raise AttestationError("the Nitro attestation document's payload has missing or unknown fields")
    module_id, ts, digest, pcrs = p["module_id"], p["timestamp"], p["digest"], p["pcrs"]
    cert, bundle = p["certificate"], p["cabundle"]
    if not isinstance(module_id, str) or not module_id:
        raise AttestationError("the Nitro attestation document's module_id is malformed")
    if type(ts) is not int or not 0 < ts < 2**53:
        raise AttestationError("the Nitro attestation document's timestamp is malformed")
    if digest != "SHA384":
        raise AttestationError("the Nitro attestation document's digest is not SHA384")
    if not isinstance(pcrs, Mapping) or not 0 < len(pcrs) <= 32 or not all(
            type(k) is int and 0 <= k < 32 and isinstance(v, bytes) and len(v) == PCR_HEX_LEN // 2
            for k, v in pcrs.items()):
        raise AttestationError("the Nitro attestation document's pcrs are malformed")
    if not isinstance(cert, bytes) or not 0 < len(cert) <= MAX_CERT:
        raise AttestationError("the Nitro attestation document's certificate is malformed")
    if not isinstance(bundle, list | tuple) or not 0 < len(bundle) <= MAX_CABUNDLE or not all(
            isinstance(c, bytes) and 0 < len(c) <= MAX_CERT for c in bundle):
        raise AttestationError("the Nitro attestation document's cabundle is malformed")
    return NitroDocument(protected=protected, payload=payload, signature=signature, module_id=module_id,
                         timestamp_ms=ts, pcrs=MappingProxyType(dict(pcrs)), certificate=cert,
                         cabundle=tuple(bundle), public_key=_opt_bytes(p, "public_key"),
                         user_data=_opt_bytes(p, "user_data"), nonce=_opt_bytes(p, "nonce"))


def _pcr_values(values: Iterable[str]) -> frozenset[str]:
    return hex_allow_list(values, PCR_HEX_LEN // 2, "a Nitro PCR value")


@dataclass(frozen=True)
class NitroPolicy:
    """What the provider accepts from Nitro Enclaves. The default refuses everything.

    ``pcrs``: PCR index → allowed values (hex). PCR0 (enclave image), PCR1 (kernel and boot
    ramdisk) and PCR2 (application) are required; PCR3 (parent instance role), PCR4 (parent
    instance ID) and PCR8 (the image's signing certificate) are checked when listed.
    ``allow_debug``: accept debug-mode enclaves (PCR0–2 all zero; the parent can read their memory
    through the console and the attestation proves nothing about the code).
    ``bind_to``: the document field that must start with the expected report data.
    """

    pcrs: Mapping[int, frozenset[str]] = field(default_factory=dict)
    allow_debug: bool = False
    bind_to: str = "user_data"

    def __post_init__(self) -> None:
        if not isinstance(self.pcrs, Mapping) or not all(type(k) is int and 0 <= k < 32 for k in self.pcrs):
            raise AttestationError("a Nitro PCR policy maps PCR indices (0-31) to allowed values")
        object.__setattr__(self, "pcrs", MappingProxyType({k: _pcr_values(v) for k, v in self.pcrs.items()}))
        if self.bind_to not in ("user_data", "nonce"):
            raise AttestationError("NitroPolicy.bind_to must be 'user_data' or 'nonce'")


@dataclass(frozen=True)
class NitroClaims:
    """What :func:`verify_nitro` vouches for."""

    module_id: str
    timestamp: dt.datetime
    pcrs: Mapping[int, str]  # every PCR in the document, hex
    measurement: str  # PCR0, hex
    debug: bool
    user_data: bytes | None
    nonce: bytes | None
    public_key: bytes | None
    leaf_sha256: str  # hex SHA-256 of the enclave's leaf certificate (DER)


def _load(der: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except _CERT_ERRORS as e:
        raise AttestationError(f"Nitro certificate chain: the {what} is malformed") from e


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _check_chain(doc: NitroDocument, root_der: bytes, now: dt.datetime | None) -> x509.Certificate:
    """The leaf, once the chain from the pinned root to it checks out at the document's timestamp (and ``now``)."""
    if not hmac.compare_digest(doc.cabundle[0], root_der):
        raise AttestationError("Nitro certificate chain: the cabundle does not start with the pinned AWS Nitro root")
    when = doc.timestamp
    certs = [_load(c, "root" if i == 0 else f"cabundle[{i}]") for i, c in enumerate(doc.cabundle)]
    certs.append(_load(doc.certificate, "enclave certificate"))
    names = ["root", *(f"cabundle[{i}]" for i in range(1, len(doc.cabundle))), "enclave certificate"]
    for i, (cert, name) in enumerate(zip(certs, names, strict=True)):
        issuer = certs[i - 1] if i else cert  # the root is self-signed
        if i < len(certs) - 1 and not _is_ca(cert):
            raise AttestationError(f"Nitro certificate chain: the {name} is not a CA")
        try:
            cert.verify_directly_issued_by(issuer)
        except _VERIFY_ERRORS as e:
            raise AttestationError(f"Nitro certificate chain: the {name} is not signed by its issuer") from e
        for at, what in ((when, "the document's timestamp"), (now, "the verification time")):
            if at is not None and not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
                raise AttestationError(f"Nitro certificate chain: the {name} is not valid at {what} "
                                       f"{at.isoformat()} (valid {cert.not_valid_before_utc.isoformat()} to "
                                       f"{cert.not_valid_after_utc.isoformat()})")
    return certs[-1]


def _check_signature(doc: NitroDocument, leaf: x509.Certificate) -> None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise AttestationError("the Nitro enclave certificate's key is not ECDSA P-384")
    if len(doc.signature) != 96:
        raise AttestationError("the Nitro attestation document signature does not verify (not 96 bytes)")
    sig = encode_dss_signature(int.from_bytes(doc.signature[:48], "big"), int.from_bytes(doc.signature[48:], "big"))
    to_be_signed = cbor2.dumps(["Signature1", doc.protected, b"", doc.payload])
    try:
        key.verify(sig, to_be_signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as e:
        raise AttestationError("the Nitro attestation document signature does not verify") from e


def verify_nitro(document: bytes, *, policy: NitroPolicy, expected_report_data: bytes | None,
                 root_der: bytes = AWS_NITRO_ROOT_DER, now: dt.datetime | None = None) -> NitroClaims:
    """Verify a Nitro attestation document (raw COSE_Sign1 bytes); see the module docstring.

    ``expected_report_data``: the policy's ``bind_to`` field must start with these bytes; None
    skips the binding (only for recorded evidence: it then proves no freshness).
    ``root_der``: the trusted root (tests inject their own).
    ``now``: when given, every certificate must also be valid then; an NSM's leaf lives about 3 hours,
    so this bounds the document's age (None: only at the document's own timestamp, as for recordings).
    """
    if not isinstance(policy, NitroPolicy):
        raise TypeError("policy must be a NitroPolicy")
    if expected_report_data is not None and (not isinstance(expected_report_data, bytes)
                                             or not 0 < len(expected_report_data) <= MAX_OPTIONAL[policy.bind_to]):
        raise TypeError("expected_report_data must be 1 to 512 bytes, or None")
    doc = parse_nitro_document(document)
    try:
        when = None if now is None else (now if now.tzinfo else now.replace(tzinfo=dt.UTC))
        leaf = _check_chain(doc, root_der, when)
        _check_signature(doc, leaf)
    except _CERT_ERRORS as e:  # a mutated certificate whose key pyca cannot load
        raise AttestationError("a Nitro certificate is malformed") from e
    pcrs = {k: v.hex() for k, v in doc.pcrs.items()}
    if not {0, 1, 2} <= set(pcrs):
        raise AttestationError("the Nitro attestation document lacks PCR0, PCR1 or PCR2")
    debug = all(not any(doc.pcrs[i]) for i in (0, 1, 2))
    if debug and not policy.allow_debug:
        raise AttestationError("the Nitro enclave runs in debug mode (PCR0-2 are zero): its memory is readable "
                               "and its code unattested", hint="run the enclave without --debug-mode")
    if not {0, 1, 2} <= set(policy.pcrs):
        raise AttestationError("the server's Nitro policy does not list PCR0, PCR1 and PCR2")
    for index, allowed in sorted(policy.pcrs.items()):
        if pcrs.get(index) not in allowed:
            raise AttestationError(f"Nitro PCR{index} {pcrs.get(index, '(absent)')[:16]}... is not on the "
                                   "server's allow-list")
    if expected_report_data is not None:
        bound = doc.user_data if policy.bind_to == "user_data" else doc.nonce
        if bound is None or not hmac.compare_digest(bound[:len(expected_report_data)], expected_report_data):
            raise AttestationError(f"the Nitro attestation document's {policy.bind_to} is not bound to this setup")
    return NitroClaims(module_id=doc.module_id, timestamp=doc.timestamp, pcrs=MappingProxyType(pcrs),
                       measurement=pcrs[0], debug=debug, user_data=doc.user_data, nonce=doc.nonce,
                       public_key=doc.public_key,
                       leaf_sha256=hashlib.sha256(doc.certificate).hexdigest())
