"""Fuzz the license: the signed envelope and ``License.from_dict``.

Input: the license envelope's JSON bytes (as the provisioning payload carries it). Checked as the
enclave checks it (``verify_license`` under the provider key, for the capsule and the device's
receipt key); then the envelope's body is re-signed with the context's provider key and checked
again, so the fuzzer reaches the schema behind the signature. Seed: the license of a real setup.
"""

from __future__ import annotations

import sys
import uuid

from _common import b64, context, data_file, instrumented, json_or_none, main, ours

with instrumented(__name__ == "__main__"):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from mlcapsule.enclave.crypto.keys import ed25519_public_from_raw
    from mlcapsule.enclave.messages import signed
    from mlcapsule.enclave.messages.license import KIND, verify_license

_CTX = context()
_SIGNER = load_pem_private_key(data_file("provider-key.pem"), None)
_PUBLIC = ed25519_public_from_raw(bytes.fromhex(_CTX["provider_public"]))
_CAPSULE, _VERSION, _RECEIPT = uuid.UUID(_CTX["capsule_id"]), _CTX["version"], b64(_CTX["receipt_key"])


def TestOneInput(data: bytes) -> None:  # noqa: N802
    envelope = json_or_none(data)
    with ours():
        verify_license(envelope, _PUBLIC, capsule_id=_CAPSULE, version=_VERSION, receipt_key=_RECEIPT)
    if isinstance(envelope, dict) and isinstance(envelope.get("body"), dict):
        with ours():
            resigned = signed.sign(KIND, envelope["body"], _SIGNER)  # type: ignore[arg-type]
            verify_license(resigned, _PUBLIC, capsule_id=_CAPSULE, version=_VERSION, receipt_key=_RECEIPT)


if __name__ == "__main__":
    main(TestOneInput, json_input=True)
    sys.exit(0)
