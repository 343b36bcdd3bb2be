"""The license: what the provider allows one device to do with one capsule version."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .._util import b64d, b64e
from ..errors import FormatError, IntegrityError
from ..format.manifest import parse_time
from . import signed

KIND = "license/v1"
_OPT_STR = (str, type(None))
#: The license's fields and their JSON types ("policy" is optional: a dict or null).
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "license_id": str, "capsule_id": str, "version": int, "device_id": str, "account": str, "receipt_key": str,
    "budget": (int, type(None)), "expires": _OPT_STR, "issued": _OPT_STR, "lease_size": int}
#: ``policy["defenses"]``: the grant's defense specs (``admin grant --defense``), which tighten the
#: capsule's signed policy (issue 12); at most this many, each at most this long.
MAX_GRANT_DEFENSES = 32
MAX_DEFENSE_SPEC = 256


def check_policy(policy: Any) -> dict[str, Any]:
    """``policy`` if it is a license policy: an object whose ``defenses``, when present, is a list
    of at most 32 defense specs (strings of at most 256 characters). Other keys are the backends'
    (e.g. ``tpm.seal_pcrs``) and are checked where they are used. FormatError otherwise."""
    if not isinstance(policy, dict):
        raise FormatError("the license is malformed (its policy is not an object)")
    if "defenses" in policy:
        specs = policy["defenses"]
        if (not isinstance(specs, list) or len(specs) > MAX_GRANT_DEFENSES
                or not all(isinstance(x, str) and 0 < len(x) <= MAX_DEFENSE_SPEC for x in specs)):
            raise FormatError(f"the license is malformed (policy.defenses must be a list of at most "
                              f"{MAX_GRANT_DEFENSES} defense specs of at most {MAX_DEFENSE_SPEC} characters)")
    return policy


def _is(value: Any, types: type | tuple[type, ...]) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)


@dataclass(frozen=True)
class License:
    license_id: str
    capsule_id: uuid.UUID
    version: int
    device_id: str
    account: str
    receipt_key: bytes  # the enclave's Ed25519 receipt public key (raw)
    budget: int | None  # None = unlimited
    expires: dt.datetime | None
    issued: dt.datetime
    lease_size: int = 100
    #: {} or {"defenses": [spec, ...]}: the grant's tightening of the capsule's defense policy
    #: (:func:`check_policy`); the TPM backend also reads ``tpm.seal_pcrs`` from here.
    policy: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_policy(self.policy)

    @property
    def defenses(self) -> list[str]:
        """The grant's defense specs (empty when the grant has none)."""
        return list(self.policy.get("defenses") or [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "license_id": self.license_id, "capsule_id": str(self.capsule_id), "version": self.version,
            "device_id": self.device_id, "account": self.account, "receipt_key": b64e(self.receipt_key),
            "budget": self.budget, "expires": self.expires.isoformat() if self.expires else None,
            "issued": self.issued.isoformat(), "lease_size": self.lease_size, "policy": self.policy,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> License:
        # Every field's JSON type is checked first: a number where a string belongs used to
        # escape as AttributeError or TypeError (red team, issue 9). bool is not an int here.
        if not isinstance(d, dict) or not all(
                k in d and _is(d[k], t) for k, t in _FIELDS.items()) or not _is(d.get("policy"), (dict, type(None))):
            raise FormatError("the license is malformed")
        try:
            budget = d["budget"]
            lic = cls(
                license_id=d["license_id"], capsule_id=uuid.UUID(d["capsule_id"]), version=d["version"],
                device_id=d["device_id"], account=d["account"], receipt_key=b64d(d["receipt_key"]),
                budget=budget, expires=parse_time(d["expires"], "license.expires"),
                issued=parse_time(d["issued"], "license.issued") or dt.datetime.now(dt.UTC),
                lease_size=d["lease_size"], policy=dict(d.get("policy") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError("the license is malformed") from e
        if (len(lic.receipt_key) != 32 or (lic.budget is not None and lic.budget < 0)
                or not 1 <= lic.lease_size <= 1_000_000):
            raise FormatError("the license is malformed")
        return lic

    def sign(self, key: Ed25519PrivateKey) -> dict[str, Any]:
        return signed.sign(KIND, self.to_dict(), key)


def verify_license(envelope: Any, provider_key: Ed25519PublicKey, *, capsule_id: uuid.UUID, version: int,
                   receipt_key: bytes | None = None) -> License:
    """Check the provider's signature and that the license is for this capsule (and device)."""
    lic = License.from_dict(signed.verify(KIND, envelope, provider_key))
    if lic.capsule_id != capsule_id or lic.version != version:
        raise IntegrityError("the license is for another capsule or version")
    if receipt_key is not None and lic.receipt_key != receipt_key:
        raise IntegrityError("the license is for another device")
    return lic
