"""Fuzz the usage upload's receipts: the hash chain and the defenses' entries.

Input: the ``receipts`` JSON list of an upload. The server's checks: ``verify_chain`` from the
genesis head under the device's receipt key, then ``alarm_records`` / ``gap_record`` on the data of
``alarm`` and ``defense-gap`` entries (as the service stores them). Then every entry's body is
re-signed with the context's receipt key (the enclave's) and the chain is checked again, so the
fuzzer reaches the chain rules behind the signatures. Seeds: the chain of a real session.
"""

from __future__ import annotations

import sys

from _common import b64, context, instrumented, json_or_none, main, ours

with instrumented(__name__ == "__main__"):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from mlcapsule.enclave._util import b64e, canonical_json
    from mlcapsule.enclave.crypto.keys import ed25519_public_from_raw
    from mlcapsule.enclave.messages import receipts as R

_CTX = context()
_KEY = Ed25519PrivateKey.from_private_bytes(b64(_CTX["receipt_private"]))
_PUBLIC = ed25519_public_from_raw(b64(_CTX["receipt_key"]))
_GENESIS = R.ChainHead(0, R.GENESIS, 0, 0)


def _check(entries: object) -> None:
    with ours():
        R.verify_chain(entries, _PUBLIC, license_id=_CTX["license_id"], head=_GENESIS)
    for e in entries if isinstance(entries, list) else []:
        body = e.get("body") if isinstance(e, dict) else None
        if isinstance(body, dict) and body.get("kind") == "alarm":
            with ours():
                R.alarm_records(body.get("data"))
        elif isinstance(body, dict) and body.get("kind") == "defense-gap":
            with ours():
                R.gap_record(body.get("data"))


def _resigned(entries: list[object]) -> list[object]:
    out = []
    for e in entries:
        if isinstance(e, dict) and isinstance(e.get("body"), dict):
            try:
                signature = b64e(_KEY.sign(R._CONTEXT + canonical_json(e["body"])))
            except (TypeError, ValueError, RecursionError):  # not JSON-encodable: the harness's side
                signature = ""
            e = {**e, "signature": signature}
        out.append(e)
    return out


def TestOneInput(data: bytes) -> None:  # noqa: N802
    entries = json_or_none(data)
    _check(entries)
    if isinstance(entries, list):
        _check(_resigned(entries))


if __name__ == "__main__":
    main(TestOneInput, json_input=True)
    sys.exit(0)
