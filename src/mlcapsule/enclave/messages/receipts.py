"""The usage log: a hash chain of entries signed by the enclave's receipt key.

Entry ``n`` is ``{"body": {...}, "signature": b64}`` where body has ``seq = n`` (from 1),
``prev`` = the hash of entry ``n-1`` (64 zeros for the first), and the cumulative counters
``charged`` (queries paid for by leases) and ``answered`` (queries answered). The hash of an
entry is SHA-256 of its canonical JSON. The server keeps the last (seq, hash) it accepted per
device, so an upload must continue the chain exactly: a gap, a reordering or an edit breaks it.

Two kinds carry the defenses' reports (issue 12); :func:`alarm_records` and :func:`gap_record`
check their ``data`` (both sides use them: the enclave writes, the server stores):

* ``alarm``: ``{"alarms": [{"detector", "query", "statistic", "threshold", "action"}, ...],
  "defense": {summary counters}}``, one entry per batch that raised alarms (``statistic`` and
  ``threshold`` are numbers, or null when not finite);
* ``defense-gap``: ``{"queries": N, "reason": "crash" | "rollback"}``, queries answered whose
  defense-state updates were lost.

An applied unlock voucher writes ``unlock`` (``{"seq", "reset_detectors"}``; it is numbered in
the voucher sequence) and then ``defense`` (the defense counters after it).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .._util import b64d, b64e, canonical_json
from ..crypto.keys import verify_ed25519
from ..errors import FormatError, IntegrityError

GENESIS = "0" * 64
KINDS = ("setup", "lease", "voucher", "report", "detection", "rollback", "alarm", "defense-gap", "unlock", "defense")
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
                or not all(isinstance(body[k], t) and not isinstance(body[k], bool) for k, t in _BODY_TYPES.items())
                or not all(0 <= body[k] <= _MAX_INT for k in ("seq", "charged", "answered"))):
            # Counters beyond 64 bits were a 500 where the server stores them (fuzzing, issue 15).
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


# -- the defenses' entries (issue 12) ----------------------------------------------------------------
#: At most this many alarms in one ``alarm`` entry, and this long a detector name.
MAX_ALARMS_PER_ENTRY = 1000
MAX_DETECTOR_NAME = 64
ALARM_ACTIONS = ("record", "degrade", "refuse", "lock")
GAP_REASONS = ("crash", "rollback")
_ALARM_FIELDS = ("detector", "query", "statistic", "threshold", "action")
_MAX_INT = 2**63 - 1


#: The most queries one ``defense-gap`` entry may report.
MAX_GAP_QUERIES = 10**12


def _number_or_null(v: Any) -> bool:
    if type(v) is int:
        return -_MAX_INT <= v <= _MAX_INT
    return v is None or (type(v) is float and math.isfinite(v))


def _count(v: Any, top: int = _MAX_INT) -> bool:
    return type(v) is int and 0 <= v <= top


def alarm_records(data: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the alarms, the defense summary) of an ``alarm`` entry's ``data``; FormatError saying what
    is wrong if it is malformed. Each alarm has exactly the keys of ``_ALARM_FIELDS`` (others are
    ignored): a detector name, a query index, the statistic and the threshold (numbers or null),
    the action taken."""
    if not isinstance(data, dict) or not isinstance(data.get("alarms"), list) or not data["alarms"]:
        raise FormatError("its data has no list of alarms")
    if len(data["alarms"]) > MAX_ALARMS_PER_ENTRY:
        raise FormatError(f"it has {len(data['alarms'])} alarms (at most {MAX_ALARMS_PER_ENTRY})")
    summary = data.get("defense", {})
    if not isinstance(summary, dict):
        raise FormatError("its defense summary is not an object")
    out = []
    for i, a in enumerate(data["alarms"]):
        if not isinstance(a, dict) or not all(k in a for k in _ALARM_FIELDS):
            raise FormatError(f"alarm {i} is not an object with {', '.join(_ALARM_FIELDS)}")
        det, query, action = a["detector"], a["query"], a["action"]
        if not isinstance(det, str) or not 0 < len(det) <= MAX_DETECTOR_NAME:
            raise FormatError(f"alarm {i}: the detector must be a name of 1 to {MAX_DETECTOR_NAME} characters")
        if not _count(query):
            raise FormatError(f"alarm {i}: the query must be a non-negative integer")
        if not _number_or_null(a["statistic"]) or not _number_or_null(a["threshold"]):
            raise FormatError(f"alarm {i}: the statistic and the threshold must be finite numbers or null")
        if action not in ALARM_ACTIONS:
            raise FormatError(f"alarm {i}: the action must be one of {', '.join(ALARM_ACTIONS)}")
        out.append({k: a[k] for k in _ALARM_FIELDS})
    return out, summary


def gap_record(data: Any) -> tuple[int, str]:
    """(queries, reason) of a ``defense-gap`` entry's ``data``; FormatError if it is malformed."""
    if (not isinstance(data, dict) or not _count(data.get("queries"), MAX_GAP_QUERIES)
            or data.get("reason") not in GAP_REASONS):
        raise FormatError(f"its data must be {{\"queries\": an integer from 0 to 10^12, \"reason\": "
                          f"{' or '.join(chr(34) + r + chr(34) for r in GAP_REASONS)}}}")
    return data["queries"], data["reason"]


# -- the server's signed acknowledgement --------------------------------------------------------------
ACK_KIND = "usage-ack/v1"
#: Usage protocol 2: the server answers an upload with a signed acknowledgement of the chain head
#: it stored, which the enclave verifies before it forgets any receipt. A request without
#: ``protocol`` comes from a client of protocol 1 (unsigned acknowledgements): refused with 426.
USAGE_PROTOCOL = 2
_ACK_FIELDS = {"license_id": str, "device_id": str, "seq": int, "hash": str}


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

    body = signed.verify_bound(ACK_KIND, envelope, provider_key, fields=_ACK_FIELDS, what="usage acknowledgement",
                               license_id=license_id, device_id=device_id, valid=lambda b: len(b["hash"]) == 64)
    return Ack(body["license_id"], body["device_id"], body["seq"], body["hash"])
