"""The pure verifier for evidence from the ``tpm`` backend (:mod:`mlcapsule.enclave.backends.tpm`).

Pure code on pyca ``cryptography``: the TPM 2.0 structures are parsed by :mod:`.marshal`, and
credential activation is in :mod:`.credential`; neither a TPM nor tpm2-tss is needed.

Wire format (a JSON object; every field required, no others)::

    {"type": "tpm", "version": 1,
     "measurement": hex(32 bytes),            # the enclave's self-reported code measurement
     "ak_public": b64(TPMT_PUBLIC),           # the attestation key (AK): restricted signing key
     "quote": b64(TPMS_ATTEST),               # TPM2_Quote by the AK
     "signature": b64(TPMT_SIGNATURE),
     "pcrs": {"sha256": {"0": hex, ...}},     # the values of exactly the PCRs the quote covers
     "ek_public": b64(TPMT_PUBLIC),           # the endorsement key (EK)
     "ek_certificate": b64(DER),              # the EK certificate read from the TPM's NV
     "ek_chain": [b64(DER), ...]}             # intermediates, as far as the client knows them

The quote's extraData is :func:`quote_extra_data` = SHA-256(context || report_data ||
measurement): the setup protocol's report_data (nonce, HPKE key, receipt key) and the
measurement are bound into a structure only the TPM signs with a restricted key.

What the checks establish: the quote was made by a restricted, fixedTPM signing key whose
public area is ``ak_public``, over PCR values that the provider's policy accepts, for this setup
(nonce and keys); the EK is certified by a manufacturer root the provider configured. They do
NOT by themselves show that the AK lives in the TPM of that EK: that is what *credential
activation* adds. The server seals the provisioning payload under a secret that only
TPM2_ActivateCredential on the TPM holding both the EK and an object named like the AK can
recover (:func:`.credential.credential_challenge`); an AK that is not in the same TPM as the certified EK
never sees the content key or the license. No extra round trip is needed.

    verified = verify_tpm(evidence, expected_report_data=rd, policy=policy, tpm_policy=TpmPolicy(...))
    answer = credential_challenge(evidence, seal_payload(...))     # {"payload", "credential"}
"""

from __future__ import annotations

import binascii
import datetime as dt
import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ...enclave._util import b64d
from ...enclave.errors import AttestationError
from ..policy import AttestationPolicy, VerifiedEvidence, check_evidence_header, normalize_measurement
from .marshal import (
    ALG_AES,
    ALG_CFB,
    ALG_ECDSA,
    ALG_RSAPSS,
    ALG_RSASSA,
    ALG_SHA1,
    BANKS,
    DECRYPT,
    FIXED_PARENT,
    FIXED_TPM,
    HASHES,
    MAX_STRUCT,
    RESTRICTED,
    SENSITIVE_DATA_ORIGIN,
    SIGN,
    TPM_ST_ATTEST_QUOTE,
    Attest,
    Signature,
    TpmPublic,
    _digest,
    parse_attest,
    parse_public,
    parse_signature,
)

EVIDENCE_TYPE = "tpm"
VERSION = 1
FIELDS = frozenset({"type", "version", "measurement", "ak_public", "quote", "signature", "pcrs",
                    "ek_public", "ek_certificate", "ek_chain"})
#: Domain separation of the quote's extraData (also in the enclave backend; a test pins both).
EXTRA_DATA_CONTEXT = b"mlcapsule-evidence/tpm/v1\0"
MAX_CERT = 16384
MAX_CHAIN = 8


# -- checks -----------------------------------------------------------------------------------------
def verify_signature(signer: TpmPublic, message: bytes, signature: Signature) -> None:
    """Raise AttestationError unless ``signature`` over ``message`` verifies with ``signer``."""
    if signature.hash_alg not in HASHES:
        raise AttestationError(f"TPM signature hash {signature.hash_alg:#06x} is not supported")
    h = HASHES[signature.hash_alg][1]()
    key = signer.public_key()
    try:
        if signature.alg == ALG_RSASSA and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature.rsa, message, padding.PKCS1v15(), h)
        elif signature.alg == ALG_RSAPSS and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature.rsa, message, padding.PSS(padding.MGF1(h), padding.PSS.AUTO), h)
        elif signature.alg == ALG_ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(encode_dss_signature(*signature.ecc), message, ec.ECDSA(h))
        else:
            raise AttestationError("TPM signature: the scheme does not match the key type")
    except (InvalidSignature, ValueError) as e:
        raise AttestationError("the TPM quote signature does not verify") from e


def check_ak(ak: TpmPublic) -> None:
    """The AK must be a restricted signing key that never leaves its TPM (cannot sign forged quotes)."""
    need = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN
    if ak.attributes & need != need or ak.attributes & DECRYPT:
        raise AttestationError("the attestation key is not a restricted, fixedTPM, TPM-generated signing key")


def check_ek(ek: TpmPublic) -> None:
    need = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | DECRYPT
    if ek.attributes & need != need or ek.attributes & SIGN:
        raise AttestationError("the endorsement key is not a restricted, fixedTPM decryption key")
    if ek.symmetric[0] != ALG_AES or ek.symmetric[2] != ALG_CFB or ek.symmetric[1] not in (128, 192, 256):
        raise AttestationError("the endorsement key has no AES-CFB symmetric parameters")


def pcr_digest(hash_alg: int, values: Sequence[bytes]) -> bytes:
    """The quote's pcrDigest: H_sig(value || value || ...) in selection order."""
    return _digest(hash_alg, b"".join(values))


def verify_quote(ak: TpmPublic, quote: bytes, signature: bytes, *,
                 pcr_values: Mapping[str, Mapping[int, bytes]] | None = None) -> Attest:
    """Parse and check a TPM2_Quote: the AK's signature and, if given, the PCR values' digest.

    ``pcr_values`` maps bank name ("sha256") to {index: value}; it must hold exactly the PCRs
    the quote selects. The caller checks extraData and the PCR policy. Returns the parsed quote.
    """
    attest = parse_attest(quote)
    if attest.type != TPM_ST_ATTEST_QUOTE:
        raise AttestationError("the TPM attestation is not a quote")
    sig = parse_signature(signature)
    verify_signature(ak, attest.raw, sig)
    if pcr_values is not None:
        ordered = []
        seen: dict[str, set[int]] = {}
        for sel in attest.pcr_select:
            if sel.hash_alg not in HASHES:
                raise AttestationError(f"the quote selects an unsupported PCR bank {sel.bank}")
            bank = pcr_values.get(sel.bank, {})
            for i in sel.pcrs:
                if i not in bank:
                    raise AttestationError(f"the evidence lacks the value of PCR {sel.bank}:{i}")
                if len(bank[i]) != len(_digest(sel.hash_alg, b"")):
                    raise AttestationError(f"PCR {sel.bank}:{i} has the wrong length")
                ordered.append(bank[i])
                seen.setdefault(sel.bank, set()).add(i)
        extra = {(b, i) for b, vals in pcr_values.items() for i in vals} - {(b, i) for b, s in seen.items() for i in s}
        if extra:
            raise AttestationError("the evidence carries PCR values that the quote does not cover")
        if not hmac.compare_digest(pcr_digest(sig.hash_alg, ordered), attest.pcr_digest):
            raise AttestationError("the PCR values do not match the quote's PCR digest")
    return attest


def quote_extra_data(report_data: bytes, measurement: str) -> bytes:
    """The extraData the enclave asks the TPM to sign: binds report_data and the measurement."""
    return hashlib.sha256(EXTRA_DATA_CONTEXT + report_data + bytes.fromhex(measurement)).digest()


# -- EK certificates --------------------------------------------------------------------------------
#: What pyca/cryptography raises on a certificate it cannot read. Certificates are parsed lazily,
#: so these come out of attribute access (names, extensions, the public key, the signature
#: algorithm) as well as of loading; each becomes an AttestationError here (red team, issue 9:
#: mutated EK certificates escaped as ValueError and UnsupportedAlgorithm).
CERT_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion,
                                            x509.DuplicateExtension, x509.UnsupportedGeneralNameType)
_VERIFY_ERRORS: tuple[type[Exception], ...] = (InvalidSignature, *CERT_ERRORS)


def _utc(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _valid_at(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AttestationError(f"the {what} is not valid at {now.isoformat()} "
                               f"(valid {cert.not_valid_before_utc.isoformat()} "
                               f"to {cert.not_valid_after_utc.isoformat()})")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify_ek_certificate(cert: x509.Certificate, *, roots: Sequence[x509.Certificate],
                          intermediates: Sequence[x509.Certificate] = (), now: dt.datetime | None = None,
                          ) -> list[x509.Certificate]:
    """Build and check the chain from an EK certificate to one of ``roots``; returns it, leaf first.

    Each link: issuer name matches, the signature verifies (``verify_directly_issued_by``), the
    issuer is a CA, and every certificate is valid at ``now``. EK certificates are not web PKI
    certificates (empty subject, critical SAN with TPM directory names), so no path-validation
    library profile fits; this checks what matters for trust in the key.
    """
    if not roots:
        raise AttestationError("the server trusts no TPM manufacturer roots",
                               hint="configure the EK CA roots of the TPMs you accept")
    try:
        return _ek_chain(cert, roots=roots, intermediates=intermediates, now=now)
    except CERT_ERRORS as e:
        raise AttestationError("an EK certificate is malformed") from e


def _ek_chain(cert: x509.Certificate, *, roots: Sequence[x509.Certificate],
              intermediates: Sequence[x509.Certificate], now: dt.datetime | None) -> list[x509.Certificate]:
    now = _utc(now or dt.datetime.now(dt.UTC))
    _valid_at(cert, now, "EK certificate")
    root_der = {r.public_bytes(Encoding.DER) for r in roots}
    chain = [cert]
    current = cert
    for _ in range(MAX_CHAIN + 1):
        issuers = [c for c in (*roots, *intermediates) if c.subject == current.issuer]
        for issuer in issuers:
            try:
                current.verify_directly_issued_by(issuer)
            except _VERIFY_ERRORS:
                continue
            if not _is_ca(issuer):
                raise AttestationError("an EK certificate issuer is not a CA")
            _valid_at(issuer, now, "EK issuer certificate")
            chain.append(issuer)
            if issuer.public_bytes(Encoding.DER) in root_der:
                return chain
            current = issuer
            break
        else:
            raise AttestationError("the EK certificate does not chain to a TPM manufacturer root this server trusts",
                                   hint="the TPM's maker is not among the configured EK roots")
    raise AttestationError("the EK certificate chain is too long")


def ek_certificate_matches(cert: x509.Certificate, ek: TpmPublic) -> bool:
    """Does the certificate certify exactly this EK public key?"""
    spki = PublicFormat.SubjectPublicKeyInfo
    try:
        return cert.public_key().public_bytes(Encoding.DER, spki) == ek.public_key().public_bytes(Encoding.DER, spki)
    except CERT_ERRORS:
        return False


# -- the policy and the registry verifier -----------------------------------------------------------
PcrPolicy = Mapping[str, Mapping[int, frozenset[str]]]


def _normalize_pcr_policy(pcrs: Mapping[str, Mapping[Any, Any]]) -> dict[str, dict[int, frozenset[str]]]:
    out: dict[str, dict[int, frozenset[str]]] = {}
    for bank, entries in pcrs.items():
        if bank not in BANKS:
            raise ValueError(f"unknown PCR bank {bank!r} (one of {', '.join(BANKS)})")
        size = len(_digest(BANKS[bank], b""))
        out[bank] = {}
        for index, allowed in entries.items():
            i = int(index)
            if not 0 <= i < 32:
                raise ValueError(f"PCR index {index!r} is out of range")
            values = [allowed] if isinstance(allowed, str) else list(allowed)
            norm = frozenset(v.strip().lower() for v in values)
            if not norm or any(len(v) != 2 * size or any(c not in "0123456789abcdef" for c in v) for v in norm):
                raise ValueError(f"PCR {bank}:{i}: allowed values must be {size}-byte hex digests")
            out[bank][i] = norm
    return out


@dataclass(frozen=True)
class TpmPolicy:
    """What the provider accepts from ``tpm`` evidence.

    ``roots``
        EK CA root certificates (the TPM manufacturers, or a private CA for swtpm in tests).
        Empty refuses every TPM.
    ``intermediates``
        Extra intermediate CA certificates the server knows (manufacturers publish them).
    ``pcrs``
        {bank: {index: allowed hex values}}: each listed PCR must be covered by the quote and hold
        one of its allowed values. Empty accepts any platform state (the quote is still checked).
    ``allow_sha1``
        Accept quotes signed with SHA-1 (old TPMs and some vTPMs). Off by default.
    ``now``
        Check certificate validity at this time instead of the current time (tests, recordings).
    """

    roots: tuple[x509.Certificate, ...] = ()
    intermediates: tuple[x509.Certificate, ...] = ()
    pcrs: Mapping[str, Mapping[int, frozenset[str]]] = field(default_factory=dict)
    allow_sha1: bool = False
    now: dt.datetime | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "roots", tuple(self.roots))
        object.__setattr__(self, "intermediates", tuple(self.intermediates))
        object.__setattr__(self, "pcrs", _normalize_pcr_policy(self.pcrs))

    @classmethod
    def from_files(cls, roots: Iterable[str | os.PathLike[str]], *,
                   intermediates: Iterable[str | os.PathLike[str]] = (),
                   pcr_policy: str | os.PathLike[str] | Mapping[str, Any] | None = None,
                   allow_sha1: bool = False) -> TpmPolicy:
        """Roots and intermediates from PEM or DER files (or folders of them); the PCR policy from
        a JSON file ``{"sha256": {"7": ["hex", ...]}}`` or the same mapping."""
        pcrs: Mapping[str, Any] = {}
        if isinstance(pcr_policy, Mapping):
            pcrs = pcr_policy
        elif pcr_policy is not None:
            pcrs = json.loads(Path(pcr_policy).read_text())
        return cls(roots=tuple(load_certificates(roots)), intermediates=tuple(load_certificates(intermediates)),
                   pcrs=pcrs, allow_sha1=allow_sha1)


def load_certificates(paths: Iterable[str | os.PathLike[str]]) -> list[x509.Certificate]:
    """Every certificate in these PEM/DER files, or in the files of these folders."""
    out: list[x509.Certificate] = []
    for p in map(Path, paths):
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
        for f in files:
            data = f.read_bytes()
            if b"-----BEGIN CERTIFICATE-----" in data:
                out.extend(x509.load_pem_x509_certificates(data))
            else:
                out.append(x509.load_der_x509_certificate(data))
    return out


def _b64_field(evidence: Mapping[str, Any], name: str, limit: int) -> bytes:
    value = evidence[name]
    if not isinstance(value, str) or len(value) > 4 * limit // 3 + 4:
        raise AttestationError(f"tpm evidence: {name} is malformed")
    try:
        return b64d(value)
    except (ValueError, binascii.Error, UnicodeEncodeError) as e:
        raise AttestationError(f"tpm evidence: {name} is not base64") from e


def _pcr_values(raw: Any) -> dict[str, dict[int, bytes]]:
    if not isinstance(raw, Mapping) or len(raw) > len(BANKS):
        raise AttestationError("tpm evidence: pcrs is malformed")
    out: dict[str, dict[int, bytes]] = {}
    for bank, values in raw.items():
        if bank not in BANKS or not isinstance(values, Mapping) or len(values) > 32:
            raise AttestationError("tpm evidence: pcrs is malformed")
        out[bank] = {}
        for k, v in values.items():
            if not isinstance(k, str) or not k.isdigit() or not isinstance(v, str) or len(v) > 128:
                raise AttestationError("tpm evidence: pcrs is malformed")
            try:
                out[bank][int(k)] = bytes.fromhex(v)
            except ValueError as e:
                raise AttestationError("tpm evidence: a PCR value is not hex") from e
    return out


def check_pcr_policy(pcrs: Mapping[str, Mapping[int, bytes]], policy: TpmPolicy) -> None:
    for bank, entries in policy.pcrs.items():
        for index, allowed in entries.items():
            value = pcrs.get(bank, {}).get(index)
            if value is None:
                raise AttestationError(f"the quote does not cover PCR {bank}:{index}, "
                                       "which the provider's policy checks")
            if value.hex() not in allowed:
                raise AttestationError(f"PCR {bank}:{index} holds a value the provider's policy does not accept",
                                       hint="the platform's firmware, boot chain or configuration differs from "
                                            "what the provider allows")


@dataclass(frozen=True)
class ParsedTpmEvidence:
    measurement: str
    ak: TpmPublic
    ek: TpmPublic
    attest: Attest
    pcrs: dict[str, dict[int, bytes]]
    ek_chain: list[x509.Certificate]


def check_tpm_evidence(evidence: Mapping[str, Any], *, expected_report_data: bytes,
                       tpm_policy: TpmPolicy) -> ParsedTpmEvidence:
    """Every check on ``tpm`` evidence except the measurement allow-list (see module docstring)."""
    check_evidence_header(evidence, evidence_type=EVIDENCE_TYPE, fields=FIELDS, version=VERSION)
    m = evidence["measurement"]
    if not isinstance(m, str):
        raise AttestationError("tpm evidence: measurement is malformed")
    measurement = normalize_measurement(m)
    if measurement != m:
        raise AttestationError("tpm evidence: measurement is malformed")
    ak = parse_public(_b64_field(evidence, "ak_public", MAX_STRUCT))
    ek = parse_public(_b64_field(evidence, "ek_public", MAX_STRUCT))
    quote = _b64_field(evidence, "quote", MAX_STRUCT)
    signature = _b64_field(evidence, "signature", MAX_STRUCT)
    pcrs = _pcr_values(evidence["pcrs"])
    chain_raw = evidence["ek_chain"]
    if not isinstance(chain_raw, list) or len(chain_raw) > MAX_CHAIN:
        raise AttestationError("tpm evidence: ek_chain is malformed")
    try:
        ek_cert = x509.load_der_x509_certificate(_b64_field(evidence, "ek_certificate", MAX_CERT))
        client_chain = [x509.load_der_x509_certificate(_b64_field({"c": c}, "c", MAX_CERT)) for c in chain_raw]
    except CERT_ERRORS as e:
        raise AttestationError("tpm evidence: an EK certificate does not parse") from e

    check_ak(ak)
    attest = verify_quote(ak, quote, signature, pcr_values=pcrs)
    sig = parse_signature(signature)
    if sig.hash_alg == ALG_SHA1 and not tpm_policy.allow_sha1:
        raise AttestationError("the TPM quote is signed with SHA-1, which this server does not accept")
    if not hmac.compare_digest(attest.extra_data, quote_extra_data(expected_report_data, measurement)):
        raise AttestationError("the evidence does not bind this challenge and these keys "
                               "(the quote's extraData differs)",
                               hint="the evidence was made for another nonce or other keys; run setup again")
    check_pcr_policy(pcrs, tpm_policy)
    check_ek(ek)
    if not ek_certificate_matches(ek_cert, ek):
        raise AttestationError("the EK certificate does not certify this endorsement key")
    chain = verify_ek_certificate(ek_cert, roots=tpm_policy.roots,
                                  intermediates=(*tpm_policy.intermediates, *client_chain), now=tpm_policy.now)
    return ParsedTpmEvidence(measurement, ak, ek, attest, pcrs, chain)


def verify_tpm(evidence: Mapping[str, Any], *, expected_report_data: bytes, policy: AttestationPolicy,
               tpm_policy: TpmPolicy | None = None, now: dt.datetime | None = None) -> VerifiedEvidence:
    """The verifier for ``tpm`` evidence (an :class:`~mlcapsule.attestation.EvidenceVerifier` default).

    The TPM settings come from ``tpm_policy``, else from ``policy.tpm``. Without either, TPM
    evidence is refused: there is no default set of trusted manufacturers, and no process-wide one.
    Certificates are checked at ``now`` unless the TPM policy pins its own time.
    """
    tp = tpm_policy or getattr(policy, "tpm", None)
    if not isinstance(tp, TpmPolicy):
        raise AttestationError("this server does not accept evidence from the 'tpm' backend: "
                               "no TPM EK roots are configured",
                               hint="the provider must configure the EK CA roots (and PCR policy) it accepts")
    if now is not None and tp.now is None:
        tp = replace(tp, now=now)
    parsed = check_tpm_evidence(evidence, expected_report_data=expected_report_data, tpm_policy=tp)
    policy.check_measurement(parsed.measurement)
    return VerifiedEvidence(EVIDENCE_TYPE, parsed.measurement, hashlib.sha256(parsed.ek.raw).hexdigest())


class TpmVerifier:
    """A verifier bound to one :class:`TpmPolicy`: ``EvidenceVerifier(policy, verifiers={"tpm": TpmVerifier(p)})``."""

    def __init__(self, tpm_policy: TpmPolicy) -> None:
        self.tpm_policy = tpm_policy

    def __call__(self, evidence: Mapping[str, Any], *, expected_report_data: bytes,
                 policy: AttestationPolicy, now: dt.datetime | None = None) -> VerifiedEvidence:
        return verify_tpm(evidence, expected_report_data=expected_report_data, policy=policy,
                          tpm_policy=self.tpm_policy, now=now)
