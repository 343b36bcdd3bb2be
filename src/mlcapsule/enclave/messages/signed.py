"""Signed JSON envelopes: ``{"type": T, "body": {...}, "signature": b64}``.

The signature is Ed25519 over ``"mlcapsule/" T "\\0" || canonical_json(body)``, so a signature
made for one type (a voucher) can never be replayed as another (a license). A failure to parse
is a failure of trust: everything malformed raises IntegrityError or FormatError. Messages
bound to one license and device (vouchers, unlock vouchers, usage acknowledgements) are checked
by :func:`verify_bound`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .._util import b64d, b64e, canonical_json
from ..crypto.keys import verify_ed25519
from ..errors import FormatError, IntegrityError

#: The largest signed message (type and canonical body) and signature text either side makes
#: or accepts. A license, voucher or acknowledgement is well under 1 KiB; this bounds what a host
#: can make the enclave hash and check.
MAX_ENVELOPE = 1024 * 1024


def _message(kind: str, body: dict[str, Any]) -> bytes:
    return b"mlcapsule/" + kind.encode() + b"\0" + canonical_json(body)


def _checked_message(kind: str, body: dict[str, Any]) -> bytes:
    try:
        message = _message(kind, body)
    except (ValueError, RecursionError) as e:  # a lone surrogate from JSON "\ud800" has no UTF-8 (fuzzing, issue 15)
        raise FormatError(f"signed {kind} is malformed (its body is not canonical JSON)") from e
    if len(message) > MAX_ENVELOPE:
        raise FormatError(f"signed {kind} is too large ({len(message)} bytes, at most {MAX_ENVELOPE})")
    return message


def sign(kind: str, body: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    return {"type": kind, "body": body, "signature": b64e(key.sign(_checked_message(kind, body)))}


def verify(kind: str, envelope: Any, key: Ed25519PublicKey) -> dict[str, Any]:
    """Return the body if ``envelope`` is a valid ``kind`` signed by ``key``."""
    if not isinstance(envelope, dict) or set(envelope) != {"type", "body", "signature"}:
        raise FormatError(f"not a signed {kind}")
    if envelope["type"] != kind:
        raise FormatError(f"expected a {kind}, got {str(envelope['type'])[:40]!r}")
    body = envelope["body"]
    if not isinstance(body, dict) or not isinstance(envelope["signature"], str):
        raise FormatError(f"not a signed {kind}")
    if len(envelope["signature"]) > MAX_ENVELOPE:
        raise FormatError(f"signed {kind} is too large (its signature field)")
    message = _checked_message(kind, body)  # the size, before any signature math
    try:
        sig = b64d(envelope["signature"])
    except ValueError as e:
        raise FormatError(f"{kind} signature is not base64") from e
    verify_ed25519(key, sig, message, what=kind)
    return body


def verify_bound(kind: str, envelope: Any, key: Ed25519PublicKey, *, fields: dict[str, type], what: str,
                 license_id: str, device_id: str, valid: Callable[[dict[str, Any]], bool] | None = None
                 ) -> dict[str, Any]:
    """The body of a signed message bound to one license and device (a voucher, an unlock, a
    usage acknowledgement): signed by ``key``; exactly ``fields``, each of exactly its JSON type
    (bool is not an int); ``seq`` at least 1 and ``valid(body)`` (FormatError otherwise); for
    ``license_id`` and ``device_id`` (IntegrityError otherwise)."""
    body = verify(kind, envelope, key)
    if (set(body) != set(fields) or not all(type(body[k]) is t for k, t in fields.items())
            or body["seq"] < 1 or (valid is not None and not valid(body))):
        raise FormatError(f"the {what} is malformed")
    if body["license_id"] != license_id or body["device_id"] != device_id:
        raise IntegrityError(f"the {what} is for another license or device")
    return body
