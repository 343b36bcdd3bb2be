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
KINDS = ("setup", "lease", "voucher", "report", "detection", "rollback")
_CONTEXT = b"mlcapsule/receipt/v1\0"
MAX_UPLOAD = 100_000


#: The fields of a receipt body (what :func:`make_entry` writes) and their JSON types.
_BODY_TYPES: dict[str, type | tuple[type, ...]] = {"seq": int, "prev": str, "kind": str, "license_id": str,
                                                   "time": str, "charged": int, "answered": int, "data": dict}
_BODY_FIELDS = set(_BODY_TYPES)


def entry_hash(entry: dict[str, Any]) -> str:
    try:
        return hashlib.sha256(canonical_json(entry)).hexdigest()
    except (TypeError, ValueError) as e:  # e.g. a lone surrogate from JSON "\ud800" does not encode
        raise FormatError("a receipt is malformed") from e


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
        # Every field's type is checked before it is used: a signature that was a number, null
        # or a list used to escape as AttributeError (a 500 from /v1/usage; red team, issue 9).
        if not isinstance(e, dict) or set(e) != {"body", "signature"} or not isinstance(e["signature"], str):
            raise FormatError("a receipt is malformed")
        body = e["body"]
        if (not isinstance(body, dict) or not _BODY_FIELDS <= set(body)
                or not all(isinstance(body[k], t) and not isinstance(body[k], bool) for k, t in _BODY_TYPES.items())):
            raise FormatError("a receipt is malformed")
        try:
            sig, signed = b64d(e["signature"]), _CONTEXT + canonical_json(body)
        except ValueError as ex:  # not base64, or a string that does not encode (UnicodeError)
            raise FormatError("a receipt is malformed") from ex
        seq, prev, kind = body["seq"], body["prev"], body["kind"]
        charged, answered, lid = body["charged"], body["answered"], body["license_id"]
        if seq != cur.seq + 1:
            raise IntegrityError(f"receipt chain has a gap or is out of order (expected {cur.seq + 1}, got {seq})")
        if prev != cur.hash:
            raise IntegrityError(f"receipt {seq} does not link to the previous one")
        if lid != license_id or kind not in KINDS:
            raise IntegrityError(f"receipt {seq} is not for this license")
        if charged < cur.charged or answered < cur.answered or answered > charged:
            raise IntegrityError(f"receipt {seq} has counters that go backwards or exceed what was charged")
        verify_ed25519(receipt_key, sig, signed, what="receipt")
        cur = ChainHead(seq, entry_hash(e), charged, answered)
    return cur


# -- the server's signed acknowledgement --------------------------------------------------------------
ACK_KIND = "usage-ack/v1"
#: Usage protocol 2: the server answers an upload with a signed acknowledgement of the chain head
#: it stored, which the enclave verifies before it forgets any receipt. A request without
#: ``protocol`` comes from a client of protocol 1 (unsigned acknowledgements): refused with 426.
USAGE_PROTOCOL = 2


@dataclass(frozen=True)
class Ack:
    """The server has stored this device's receipt chain up to entry ``seq``, whose hash is
    ``hash``. Signed by the provider key the capsule's manifest pins, so the untrusted host cannot
    make the enclave forget receipts (and the alarms in them) that never reached the server."""

    license_id: str
    device_id: str
    seq: int
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {"license_id": self.license_id, "device_id": self.device_id, "seq": self.seq, "hash": self.hash}

    def sign(self, key: Ed25519PrivateKey) -> dict[str, Any]:
        from . import signed

        return signed.sign(ACK_KIND, self.to_dict(), key)


def verify_ack(envelope: Any, provider_key: Ed25519PublicKey, *, license_id: str, device_id: str) -> Ack:
    """The acknowledgement in ``envelope`` if the provider signed it for this license and device."""
    from . import signed

    body = signed.verify(ACK_KIND, envelope, provider_key)
    if set(body) != {"license_id", "device_id", "seq", "hash"}:
        raise FormatError("the usage acknowledgement is malformed")
    seq, h = body["seq"], body["hash"]
    if (not isinstance(seq, int) or isinstance(seq, bool) or seq < 1 or not isinstance(h, str) or len(h) != 64
            or not isinstance(body["license_id"], str) or not isinstance(body["device_id"], str)):
        raise FormatError("the usage acknowledgement is malformed")
    ack = Ack(body["license_id"], body["device_id"], seq, h)
    if ack.license_id != license_id or ack.device_id != device_id:
        raise IntegrityError("the usage acknowledgement is for another license or device")
    return ack
