"""The usage log: a hash chain of entries signed by the enclave's receipt key.

Entry ``n`` is ``{"body": {...}, "signature": b64}`` where body has ``seq = n`` (from 1),
``prev`` = the hash of entry ``n-1`` (64 zeros for the first), and the cumulative counters
``charged`` (queries paid for by leases) and ``answered`` (queries answered). The hash of an
entry is SHA-256 of its canonical JSON. The server keeps the last (seq, hash) it accepted per
device, so an upload must continue the chain exactly: a gap, a reordering or an edit breaks it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .._util import b64d, b64e, canonical_json
from ..crypto.keys import verify_ed25519
from ..errors import FormatError, IntegrityError

GENESIS = "0" * 64
KINDS = ("setup", "lease", "voucher", "report", "detection")
_CONTEXT = b"mlcapsule/receipt/v1\0"
MAX_UPLOAD = 100_000


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(entry)).hexdigest()


def make_entry(key: Ed25519PrivateKey, *, seq: int, prev: str, kind: str, license_id: str, time: str,
               charged: int, answered: int, data: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"seq": seq, "prev": prev, "kind": kind, "license_id": license_id, "time": time,
            "charged": charged, "answered": answered, "data": data or {}}
    return {"body": body, "signature": b64e(key.sign(_CONTEXT + canonical_json(body)))}


@dataclass(frozen=True)
class ChainHead:
    seq: int
    hash: str
    charged: int
    answered: int


def verify_chain(entries: Any, receipt_key: Ed25519PublicKey, *, license_id: str, head: ChainHead) -> ChainHead:
    """Verify ``entries`` continue the chain from ``head``; return the new head.

    Raises IntegrityError on a bad signature, a gap, a reordering, a counter going backwards,
    or an entry of another license.
    """
    if not isinstance(entries, list) or len(entries) > MAX_UPLOAD:
        raise FormatError("receipts must be a list")
    cur = head
    for e in entries:
        try:
            body, sig = e["body"], b64d(e["signature"])
            seq, prev, kind = int(body["seq"]), str(body["prev"]), str(body["kind"])
            charged, answered, lid = int(body["charged"]), int(body["answered"]), str(body["license_id"])
            if set(e) != {"body", "signature"}:
                raise ValueError
        except (KeyError, TypeError, ValueError) as ex:
            raise FormatError("a receipt is malformed") from ex
        if seq != cur.seq + 1:
            raise IntegrityError(f"receipt chain has a gap or is out of order (expected {cur.seq + 1}, got {seq})")
        if prev != cur.hash:
            raise IntegrityError(f"receipt {seq} does not link to the previous one")
        if lid != license_id or kind not in KINDS:
            raise IntegrityError(f"receipt {seq} is not for this license")
        if charged < cur.charged or answered < cur.answered or answered > charged:
            raise IntegrityError(f"receipt {seq} has counters that go backwards or exceed what was charged")
        verify_ed25519(receipt_key, sig, _CONTEXT + canonical_json(body), what="receipt")
        cur = ChainHead(seq, entry_hash(e), charged, answered)
    return cur
