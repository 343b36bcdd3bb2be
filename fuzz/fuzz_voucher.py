"""Fuzz the provider's signed messages bound to one license and device.

Input: a mode byte, then an envelope's JSON bytes:
  0: a top-up voucher (``verify_voucher``), 1: an unlock voucher (``verify_unlock``),
  2: a usage acknowledgement (``verify_ack``).
Each is checked as the enclave checks it (provider key, license and device of the context), then
re-signed with the provider key and checked again (the schema behind the signature).
Seeds: the voucher, unlock and acknowledgement of a real session.
"""

from __future__ import annotations

import sys

from _common import context, data_file, instrumented, json_or_none, main, ours, split

with instrumented(__name__ == "__main__"):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from mlcapsule.enclave.crypto.keys import ed25519_public_from_raw
    from mlcapsule.enclave.messages import receipts, signed, unlock, voucher

_CTX = context()
_SIGNER = load_pem_private_key(data_file("provider-key.pem"), None)
_PUBLIC = ed25519_public_from_raw(bytes.fromhex(_CTX["provider_public"]))
_KINDS = ((voucher.KIND, voucher.verify_voucher), (unlock.KIND, unlock.verify_unlock),
          (receipts.ACK_KIND, receipts.verify_ack))


def TestOneInput(data: bytes) -> None:  # noqa: N802
    mode, rest = split(data, len(_KINDS))
    kind, verify = _KINDS[mode]
    envelope = json_or_none(rest)
    bound = {"license_id": _CTX["license_id"], "device_id": _CTX["device_id"]}
    with ours():
        verify(envelope, _PUBLIC, **bound)
    if isinstance(envelope, dict) and isinstance(envelope.get("body"), dict):
        with ours():
            verify(signed.sign(kind, envelope["body"], _SIGNER), _PUBLIC, **bound)  # type: ignore[arg-type]


if __name__ == "__main__":
    main(TestOneInput, json_input=True, prefix=1)
    sys.exit(0)
