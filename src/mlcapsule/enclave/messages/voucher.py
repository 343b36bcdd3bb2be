"""Vouchers: provider-signed top-ups, redeemable offline.

A voucher names the license and device it is for and carries a sequence number. The enclave
accepts voucher ``seq`` only if it is exactly one more than the last one it redeemed, so a
voucher can be neither replayed nor redeemed out of order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import signed

KIND = "voucher/v1"
_FIELDS = {"license_id": str, "device_id": str, "seq": int, "queries": int}


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
    body = signed.verify_bound(KIND, envelope, provider_key, fields=_FIELDS, what="voucher", license_id=license_id,
                               device_id=device_id, valid=lambda b: 0 < b["queries"] <= 10**12)
    return Voucher(body["license_id"], body["device_id"], body["seq"], body["queries"])
