"""Vouchers: provider-signed top-ups, redeemable offline.

A voucher names the license and device it is for and carries a sequence number. The enclave
accepts voucher ``seq`` only if it is exactly one more than the last one it redeemed, so a
voucher can be neither replayed nor redeemed out of order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import FormatError, IntegrityError
from . import signed

KIND = "voucher/v1"


@dataclass(frozen=True)
class Voucher:
    license_id: str
    device_id: str
    seq: int
    queries: int

    def to_dict(self) -> dict[str, Any]:
        return {"license_id": self.license_id, "device_id": self.device_id, "seq": self.seq, "queries": self.queries}

    def sign(self, key: Ed25519PrivateKey) -> dict[str, Any]:
        return signed.sign(KIND, self.to_dict(), key)


def verify_voucher(envelope: Any, provider_key: Ed25519PublicKey, *, license_id: str, device_id: str) -> Voucher:
    body = signed.verify(KIND, envelope, provider_key)
    try:
        v = Voucher(str(body["license_id"]), str(body["device_id"]), int(body["seq"]), int(body["queries"]))
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError("the voucher is malformed") from e
    if v.license_id != license_id or v.device_id != device_id:
        raise IntegrityError("the voucher is for another license or device")
    if v.seq < 1 or not 0 < v.queries <= 10**12:
        raise FormatError("the voucher is malformed")
    return v
