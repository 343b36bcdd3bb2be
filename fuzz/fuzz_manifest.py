"""Fuzz the manifest's schema, behind the signature.

Input: the manifest's JSON bytes. The harness writes a header for them and signs header and
manifest with the context's provider key (the python-tuf idiom: mutate, then re-sign, so the
fuzzer reaches what sits behind the signature check), then calls the pure
:func:`~mlcapsule.enclave.format.trust.verify_capsule` with the pinned key: the JSON, the named
key, the signature, ``Manifest.from_dict`` (every field, the defense policy), the version rule
and the segments' tiling. The data length in the header is the sum the manifest claims, so
tiling errors are reached too. Seeds: the manifests of the real packer's capsules.
"""

from __future__ import annotations

import sys

from _common import context, data_file, instrumented, json_or_none, main, ours

with instrumented(__name__ == "__main__"):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from mlcapsule.enclave.format.manifest import Manifest
    from mlcapsule.enclave.format.trust import (
        HEADER_LEN,
        MAX_MANIFEST,
        SIG_LEN,
        TrustProviderKey,
        _align,
        pack_header,
        signed_message,
        verify_capsule,
    )


_CTX = context()
_PINNED = TrustProviderKey(bytes.fromhex(_CTX["provider_public"]))
_SIGNER = load_pem_private_key(data_file("provider-key.pem"), None)


def _claimed_length(raw: object) -> int:
    """What the manifest's segments add up to (harness-side, lenient): the header's data length."""
    try:
        return sum(int(s["length"]) for s in raw["segments"]) % (1 << 63)  # type: ignore[index]
    except Exception:  # noqa: BLE001 -- anything: then 0
        return 0


def TestOneInput(data: bytes) -> None:  # noqa: N802
    raw = json_or_none(data)
    with ours():
        Manifest.from_dict(raw)
    if not 2 <= len(data) <= MAX_MANIFEST:
        return
    for minor in (0, 2):
        header = pack_header(len(data), _align(HEADER_LEN + len(data) + SIG_LEN), _claimed_length(raw), minor=minor)
        signature = _SIGNER.sign(signed_message(header, data))  # type: ignore[union-attr]
        with ours():
            verify_capsule(header, data, signature, trust=_PINNED)


if __name__ == "__main__":
    main(TestOneInput, json_input=True)
    sys.exit(0)
