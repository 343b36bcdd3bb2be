"""Credential activation, server side: TPM2_MakeCredential in software (:func:`make_credential`)
and the provisioning answer gated on it (:func:`credential_challenge`).

The server seals the provisioning payload under a fresh secret that only
TPM2_ActivateCredential, on the TPM that holds both the certified EK and an object named like
the AK, can recover: an AK that is not in the same TPM as the EK never sees the payload.
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # AES-CFB is what TPM2_MakeCredential uses; pyca moved CFB to its "decrepit" module
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

from ...enclave._util import b64d, b64e
from ...enclave.errors import AttestationError
from .marshal import HASHES, TpmPublic, _tpm2b, parse_public
from .verify import check_ek

#: AAD context of the payload wrapped under the activated credential (also in the backend).
WRAP_CONTEXT = b"mlcapsule-tpm-activation/v1\0"
CREDENTIAL_LEN = 32


def _kdfa(hash_alg: int, key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    """TPM KDFa (SP 800-108 counter mode HMAC; pyca puts the 0 byte between label and context)."""
    return KBKDFHMAC(algorithm=HASHES[hash_alg][1](), mode=Mode.CounterMode, length=bits // 8, rlen=4, llen=4,
                     location=CounterLocation.BeforeFixed, label=label, context=context, fixed=None).derive(key)


def _kdfe(hash_alg: int, z: bytes, use: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """TPM KDFe (SP 800-56A concatenation KDF); ``use`` includes its terminating 0 byte."""
    return ConcatKDFHash(algorithm=HASHES[hash_alg][1](), length=bits // 8,
                         otherinfo=use + party_u + party_v).derive(z)


def _seed(ek: TpmPublic, label: bytes) -> tuple[bytes, bytes]:
    """(seed, encrypted seed) for the EK: RSA-OAEP, or ephemeral ECDH + KDFe (Part 1, Annex B/C)."""
    h = HASHES[ek.name_alg][1]
    size = h().digest_size
    key = ek.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        seed = os.urandom(size)
        return seed, key.encrypt(seed, padding.OAEP(padding.MGF1(h()), h(), label))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    eph = ec.generate_private_key(key.curve)
    plen = (key.curve.key_size + 7) // 8
    en = eph.public_key().public_numbers()
    ex, ey = en.x.to_bytes(plen, "big"), en.y.to_bytes(plen, "big")
    z = eph.exchange(ec.ECDH(), key)
    seed = _kdfe(ek.name_alg, z, label, ex, key.public_numbers().x.to_bytes(plen, "big"), size * 8)
    return seed, _tpm2b(ex) + _tpm2b(ey)


def make_credential(ek: TpmPublic, object_name: bytes, credential: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software: (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET), marshalled.

    Only a TPM holding the private EK *and* a loaded object named ``object_name`` can recover
    ``credential`` with TPM2_ActivateCredential.
    """
    check_ek(ek)
    if not 0 < len(credential) <= HASHES[ek.name_alg][1]().digest_size:
        raise ValueError("the credential must be at most one digest long")
    seed, enc_seed = _seed(ek, b"IDENTITY\0")
    sym_key = _kdfa(ek.name_alg, seed, b"STORAGE", object_name, ek.symmetric[1])
    enc = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = enc.update(_tpm2b(credential)) + enc.finalize()
    hmac_key = _kdfa(ek.name_alg, seed, b"INTEGRITY", b"", HASHES[ek.name_alg][1]().digest_size * 8)
    mac = crypto_hmac.HMAC(hmac_key, HASHES[ek.name_alg][1]())
    mac.update(enc_identity + object_name)
    id_object = _tpm2b(mac.finalize()) + enc_identity
    return _tpm2b(id_object), _tpm2b(enc_seed)


def wrap_payload(secret: bytes, payload: bytes, ak_name: bytes) -> bytes:
    """AES-256-GCM of the provisioning payload under the credential secret, bound to the AK name."""
    nonce = os.urandom(12)
    return nonce + AESGCM(secret).encrypt(nonce, payload, WRAP_CONTEXT + ak_name)


def credential_challenge(evidence: Mapping[str, Any], payload: bytes) -> dict[str, Any]:
    """Server side, after :func:`verify_tpm` accepted ``evidence``: gate ``payload`` on activation.

    Returns the fields of the /v1/provision answer for TPM evidence::

        {"payload": b64(nonce || AES-GCM(secret, HPKE payload, aad=WRAP_CONTEXT || ak_name)),
         "credential": {"id_object": b64(TPM2B_ID_OBJECT), "encrypted_secret": b64(TPM2B_ENCRYPTED_SECRET)}}

    ``secret`` is 32 fresh random bytes made into a credential for the evidence's EK and AK name;
    the enclave recovers it with TPM2_ActivateCredential and unwraps the payload. Stateless: the
    server stores nothing and needs no second request.
    """
    try:
        ak = parse_public(b64d(evidence["ak_public"]))
        ek = parse_public(b64d(evidence["ek_public"]))
    except (KeyError, TypeError, ValueError, binascii.Error) as e:
        raise AttestationError("tpm evidence: the AK or EK public area is malformed") from e
    secret = os.urandom(CREDENTIAL_LEN)
    id_object, enc_secret = make_credential(ek, ak.name, secret)
    return {"payload": b64e(wrap_payload(secret, payload, ak.name)),
            "credential": {"id_object": b64e(id_object), "encrypted_secret": b64e(enc_secret)}}
