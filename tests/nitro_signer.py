"""A fake AWS Nitro Enclaves hierarchy and NSM that sign attestation documents, for tests only.

Recorded Nitro documents cannot carry our nonce, so end-to-end and negative tests sign their own
with a fake root, passed to :func:`mlcapsule.attestation.nitro.verify_nitro` as ``root_der=``.
Built with pyca ``cryptography`` and cbor2 only.

API (other tests rely on it)::

    nsm = FakeNitro(seed=0)
    nsm.root_der     # the fake root certificate (DER): verify_nitro(..., root_der=nsm.root_der)
    nsm.document(*, pcrs={0: ..., 1: ..., 2: ...}, user_data=None, nonce=None, public_key=None,
                 timestamp=None) -> bytes   # an untagged COSE_Sign1, as the NSM returns it

The hierarchy mirrors AWS's (see the recorded ``nitro/example_attestation.b64``): a self-signed
root ``CN=aws.nitro-enclaves``-style ECDSA P-384 CA, then a regional, a zonal and an instance CA
(``cabundle`` = [root, regional, zonal, instance], root first), then a per-document leaf for the
enclave (``certificate``), valid from 3 seconds before the document's timestamp for 3 hours, as the
NSM issues them. Every certificate is signed with ECDSA/SHA-384. The document is a COSE_Sign1
(RFC 9052) with protected header ``{1: -35}`` (ES384), an empty unprotected header, a CBOR payload
with, in the NSM's order, ``module_id``, ``digest`` ("SHA384"), ``timestamp`` (ms since the epoch),
``pcrs``, ``certificate``, ``cabundle``, ``public_key``, ``user_data``, ``nonce``, and a 96-byte
r||s signature over ``["Signature1", protected, b"", payload]`` by the leaf.

``pcrs``: index → 48 bytes; PCRs 0 to 15 not given are zero, as on an NSM. ``timestamp``: a
timezone-aware datetime (default: now). Every key derives from ``seed`` (the leaf's also from the
timestamp) and every signature is RFC 6979 deterministic, so equal arguments give equal bytes in
any process, and ``FakeNitro(seed).root_der`` is the same everywhere.

Keyword-only extras for negative tests: ``FakeNitro(ca_validity=(not_before, not_after))`` for the
regional, zonal and instance CAs (default: the root's 2019-10-28 to 2049-10-28, so documents at any
time verify), ``aws_names=True`` (the root's name is AWS's, byte for byte), ``document(...,
leaf_validity=(not_before, not_after), tag=True)``; :meth:`FakeNitro.payload` and
:meth:`FakeNitro.sign` build and sign a payload separately, to splice fields.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

__all__ = ["ROOT_VALIDITY", "FakeNitro"]

ROOT_VALIDITY = (dt.datetime(2019, 10, 28, 13, 28, 5, tzinfo=dt.UTC),  # AWS's root's
                 dt.datetime(2049, 10, 28, 14, 28, 5, tzinfo=dt.UTC))
LEAF_LIFETIME = dt.timedelta(hours=3)
PROTECTED = cbor2.dumps({1: -35})  # ES384
_P384_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
_ECDSA = ec.ECDSA(hashes.SHA384(), deterministic_signing=True)

Validity = tuple[dt.datetime, dt.datetime]


def _derive(*label: object) -> bytes:
    return hashlib.sha512(repr(("mlcapsule-fake-nitro", *label)).encode()).digest()


def _key(*label: object) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(_derive(*label), "big") % (_P384_ORDER - 1) + 1, ec.SECP384R1())


def _name(cn: str, *, amazon: bool = True, seattle: bool = False) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COUNTRY_NAME, "US")]
    if seattle:
        attrs += [x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Washington"),
                  x509.NameAttribute(NameOID.LOCALITY_NAME, "Seattle")]
    if amazon:
        attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Amazon"),
                  x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "AWS")]
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _utc(t: dt.datetime) -> dt.datetime:
    if t.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware (datetime.UTC)")
    return t.astimezone(dt.UTC)


class FakeNitro:
    """A fake AWS Nitro root, regional, zonal and instance CA, and an NSM; see the module docstring."""

    def __init__(self, seed: int = 0, *, ca_validity: Validity = ROOT_VALIDITY, aws_names: bool = False) -> None:
        if type(seed) is not int or seed < 0:
            raise ValueError("seed must be a non-negative int")
        self.seed = seed
        tag = hashlib.sha256(f"{seed}".encode()).hexdigest()
        root_cn = "aws.nitro-enclaves" if aws_names else f"fake{seed}.aws.nitro-enclaves"
        self.instance_id = f"i-0{tag[:16]}"
        self.module_id = f"{self.instance_id}-enc{tag[16:32]}"
        self._keys = [_key(role, seed) for role in ("root", "regional", "zonal", "instance")]
        names = [_name(root_cn), _name(f"{tag[32:48]}.us-east-1.{root_cn}"),
                 _name(f"{tag[48:64]}.zonal.us-east-1.{root_cn}"),
                 _name(f"{self.instance_id}.us-east-1.{root_cn}", seattle=True)]
        self._leaf_issuer = names[3]
        start, end = _utc(ca_validity[0]), _utc(ca_validity[1])
        self._certs: list[x509.Certificate] = []
        for i, (key, name) in enumerate(zip(self._keys, names, strict=True)):
            issuer_key = self._keys[i - 1] if i else key
            b = (x509.CertificateBuilder().subject_name(name).issuer_name(names[i - 1] if i else name)
                 .public_key(key.public_key()).serial_number(int.from_bytes(_derive("serial", i, seed)[:16], "big"))
                 .not_valid_before(ROOT_VALIDITY[0] if i == 0 else start)
                 .not_valid_after(ROOT_VALIDITY[1] if i == 0 else end)
                 .add_extension(x509.BasicConstraints(ca=True, path_length=None if i == 0 else 3 - i), critical=True)
                 .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                              key_encipherment=False, data_encipherment=False, key_agreement=False,
                                              key_cert_sign=True, crl_sign=True, encipher_only=False,
                                              decipher_only=False), critical=True)
                 .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
            self._certs.append(b.sign(issuer_key, hashes.SHA384(), ecdsa_deterministic=True))

    @property
    def root_der(self) -> bytes:
        """The fake root certificate, DER (``verify_nitro(..., root_der=...)``)."""
        return self._certs[0].public_bytes(Encoding.DER)

    @property
    def cabundle(self) -> list[bytes]:
        """Root, regional, zonal and instance CA certificates, DER, root first (the payload's ``cabundle``)."""
        return [c.public_bytes(Encoding.DER) for c in self._certs]

    def leaf_key(self, timestamp: dt.datetime) -> ec.EllipticCurvePrivateKey:
        """The per-document enclave key the NSM uses at ``timestamp``."""
        return _key("leaf", self.seed, int(_utc(timestamp).timestamp() * 1000))

    def leaf_der(self, timestamp: dt.datetime, validity: Validity | None = None) -> bytes:
        """The enclave certificate for a document at ``timestamp`` (default validity: -3 s to +3 h)."""
        t = _utc(timestamp).replace(microsecond=0)
        start, end = (t - dt.timedelta(seconds=3), t + LEAF_LIFETIME) if validity is None else validity
        key = self.leaf_key(timestamp)
        b = (x509.CertificateBuilder()
             .subject_name(_name(f"{self.module_id}.us-east-1.aws", seattle=True)).issuer_name(self._leaf_issuer)
             .public_key(key.public_key())
             .serial_number(int.from_bytes(_derive("leaf serial", self.seed, t.isoformat())[:15], "big"))
             .not_valid_before(_utc(start)).not_valid_after(_utc(end))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                          crl_sign=False, encipher_only=False, decipher_only=False), critical=False))
        return b.sign(self._keys[3], hashes.SHA384(), ecdsa_deterministic=True).public_bytes(Encoding.DER)

    def payload(self, *, pcrs: Mapping[int, bytes], user_data: bytes | None = None, nonce: bytes | None = None,
                public_key: bytes | None = None, timestamp: dt.datetime | None = None,
                leaf_validity: Validity | None = None) -> dict[str, Any]:
        """The document's payload map (not yet encoded), in the NSM's field order."""
        when = dt.datetime.now(dt.UTC) if timestamp is None else _utc(timestamp)
        if not all(type(k) is int and 0 <= k < 32 and isinstance(v, bytes) and len(v) == 48 for k, v in pcrs.items()):
            raise ValueError("pcrs maps indices 0-31 to 48-byte values")
        full = {i: bytes(48) for i in range(16)} | dict(pcrs)
        return {"module_id": self.module_id, "digest": "SHA384", "timestamp": int(when.timestamp() * 1000),
                "pcrs": dict(sorted(full.items())), "certificate": self.leaf_der(when, leaf_validity),
                "cabundle": self.cabundle, "public_key": public_key, "user_data": user_data, "nonce": nonce}

    def sign(self, payload: Mapping[str, Any] | bytes, key: ec.EllipticCurvePrivateKey, *, tag: bool = False,
             protected: bytes = PROTECTED) -> bytes:
        """A COSE_Sign1 of ``payload`` (a map, or already-encoded CBOR) signed with ES384 by ``key``."""
        body = payload if isinstance(payload, bytes) else cbor2.dumps(dict(payload))
        r, s = decode_dss_signature(key.sign(cbor2.dumps(["Signature1", protected, b"", body]), _ECDSA))
        envelope = [protected, {}, body, r.to_bytes(48, "big") + s.to_bytes(48, "big")]
        return cbor2.dumps(cbor2.CBORTag(18, envelope) if tag else envelope)

    def document(self, *, pcrs: Mapping[int, bytes], user_data: bytes | None = None, nonce: bytes | None = None,
                 public_key: bytes | None = None, timestamp: dt.datetime | None = None,
                 leaf_validity: Validity | None = None, tag: bool = False) -> bytes:
        """A signed attestation document (COSE_Sign1 bytes, untagged as the NSM returns it unless ``tag``)."""
        when = dt.datetime.now(dt.UTC) if timestamp is None else _utc(timestamp)
        p = self.payload(pcrs=pcrs, user_data=user_data, nonce=nonce, public_key=public_key, timestamp=when,
                         leaf_validity=leaf_validity)
        return self.sign(p, self.leaf_key(when), tag=tag)
