"""Unlock vouchers: the provider's signed word that lifts a defense lock (issue 12).

A detector whose action is ``lock`` (or ``degrade``) stops a license from answering (or from
answering more than labels) until the provider says otherwise. The provider issues an unlock
voucher with ``mlcapsule admin unlock``; the client applies it with ``mlcapsule topup``. Like a
top-up voucher it names its license and device, and its ``seq`` is a number of the same
sequence as the top-ups' (per device, from 1): the enclave accepts voucher ``seq`` only if it is
one more than the last voucher of either kind it redeemed, so the counter that keeps a top-up
from being redeemed twice, even by a restored state, keeps an unlock from being replayed.
``reset`` also empties the detectors' state (PRADA's query sets, the out-of-distribution window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import signed

KIND = "unlock/v1"
_FIELDS = {"license_id": str, "device_id": str, "seq": int, "reset": bool}


@dataclass(frozen=True)
class Unlock:
    license_id: str
    device_id: str
    seq: int
    reset: bool = False  # also reset the detectors' state

    def to_dict(self) -> dict[str, Any]:
        return {"license_id": self.license_id, "device_id": self.device_id, "seq": self.seq, "reset": self.reset}

    def sign(self, key: Ed25519PrivateKey) -> dict[str, Any]:
        return signed.sign(KIND, self.to_dict(), key)


def verify_unlock(envelope: Any, provider_key: Ed25519PublicKey, *, license_id: str, device_id: str) -> Unlock:
    """The unlock voucher in ``envelope`` if the provider signed it for this license and device:
    FormatError if it is malformed (or ``seq`` < 1), IntegrityError if it is for another license
    or device, SignatureError if the signature does not verify."""
    body = signed.verify_bound(KIND, envelope, provider_key, fields=_FIELDS, what="unlock voucher",
                               license_id=license_id, device_id=device_id)
    return Unlock(body["license_id"], body["device_id"], body["seq"], body["reset"])
