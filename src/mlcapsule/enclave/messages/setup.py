"""The setup phase (DESIGN §2), as pure functions.

1. client -> server  POST /v1/challenge            -> nonce (32 bytes, single use, short TTL)
2. enclave           fresh X25519 HPKE key + Ed25519 receipt key;
                     evidence over report_data(nonce, hpke_pub, receipt_pub)
3. client -> server  POST /v1/provision {nonce, evidence, hpke_pub, receipt_pub, ...}
4. server            verifies evidence, measurement, nonce, grant, device limit; answers
                     HPKE(hpke_pub, info=INFO||nonce, {"content_key", "license"})
5. enclave           opens the payload, checks the license against the manifest's provider key,
                     seals key + license + state to the platform

HPKE is RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM, through
pyca ``cryptography``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .._util import b64d, b64e, canonical_json
from ..errors import FormatError, IntegrityError

SETUP_PROTOCOL_VERSION = 1
NONCE_LEN = 32
HPKE_INFO = b"mlcapsule-provision/v1\0"
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
MAX_PAYLOAD = 1024 * 1024


def report_data(nonce: bytes, hpke_pub: bytes, receipt_pub: bytes) -> bytes:
    """H(protocol version || nonce || hpke_pub || receipt_pub): what the evidence must carry."""
    if len(nonce) != NONCE_LEN or len(hpke_pub) != 32 or len(receipt_pub) != 32:
        raise FormatError("setup: nonce and public keys have the wrong length")
    return hashlib.sha256(b"mlcapsule-setup/v1\0" + struct.pack(">I", SETUP_PROTOCOL_VERSION)
                          + nonce + hpke_pub + receipt_pub).digest()


def seal_payload(hpke_pub: bytes, nonce: bytes, content_key: bytes, license_envelope: dict[str, Any]) -> bytes:
    """Server side: encrypt the content key and the signed license to the enclave's HPKE key."""
    plaintext = canonical_json({"content_key": b64e(content_key), "license": license_envelope})
    return SUITE.encrypt(plaintext, X25519PublicKey.from_public_bytes(hpke_pub), info=HPKE_INFO + nonce)


def open_payload(ciphertext: bytes, hpke_key: X25519PrivateKey, nonce: bytes) -> tuple[bytes, dict[str, Any]]:
    """Enclave side: (content key, license envelope). Any tampering raises IntegrityError."""
    if len(ciphertext) > MAX_PAYLOAD:
        raise FormatError("provisioning payload is too large")
    try:
        plaintext = SUITE.decrypt(ciphertext, hpke_key, info=HPKE_INFO + nonce)
    except Exception as e:  # pyca raises InvalidTag or ValueError; both mean "not for us"
        raise IntegrityError("the provisioning payload failed to decrypt") from e
    try:
        obj = json.loads(plaintext)
        # Anyone who sees the enclave's HPKE key can encrypt a payload to it (base mode): a content
        # key that was not a string escaped as AttributeError, deep nesting as RecursionError (fuzzing).
        if not isinstance(obj, dict) or not isinstance(obj.get("content_key"), str):
            raise TypeError("not an object with a content key")
        key = b64d(obj["content_key"])
        lic = obj["license"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise FormatError("the provisioning payload is malformed") from e
    if len(key) != 32 or not isinstance(lic, dict):
        raise FormatError("the provisioning payload is malformed")
    return key, lic
