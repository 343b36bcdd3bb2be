"""Fuzz the provisioning payload the enclave opens at ``setup_finish`` (host -> enclave).

HPKE base mode authenticates no sender: anyone who sees the enclave's public HPKE key (the host
does) can encrypt a payload to it. So the plaintext is attacker-controlled too. Input: a mode
byte, then
  0: the HPKE ciphertext (``open_payload`` with the harness's fixed X25519 key and nonce);
  1: the plaintext, which the harness encrypts to that key first, so the fuzzer reaches the
     parser behind the AEAD.
What opens is then checked as ``EnclaveCore.setup_finish`` does: the license under the provider
key, for the capsule and the enclave's receipt key. Seeds: the payload of a real setup.
"""

from __future__ import annotations

import sys
import uuid

from _common import b64, context, instrumented, main, ours, split

with instrumented(__name__ == "__main__"):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from mlcapsule.enclave.crypto.keys import ed25519_public_from_raw
    from mlcapsule.enclave.messages.license import verify_license
    from mlcapsule.enclave.messages.setup import HPKE_INFO, SUITE, open_payload

#: The harness's enclave: fixed, so that make_corpus.py can encrypt the ciphertext seeds to it.
HPKE_KEY = X25519PrivateKey.from_private_bytes(bytes(range(32)))
NONCE = bytes(32)
_CTX = context()
_PROVIDER = ed25519_public_from_raw(bytes.fromhex(_CTX["provider_public"]))
_CAPSULE, _VERSION, _RECEIPT = uuid.UUID(_CTX["capsule_id"]), _CTX["version"], b64(_CTX["receipt_key"])


def TestOneInput(data: bytes) -> None:  # noqa: N802
    mode, rest = split(data, 2)
    ciphertext = rest if mode == 0 else SUITE.encrypt(rest, HPKE_KEY.public_key(), info=HPKE_INFO + NONCE)
    with ours():
        _, envelope = open_payload(ciphertext, HPKE_KEY, NONCE)
        verify_license(envelope, _PROVIDER, capsule_id=_CAPSULE, version=_VERSION, receipt_key=_RECEIPT)


if __name__ == "__main__":
    main(TestOneInput, json_input=True, prefix=1)
    sys.exit(0)
