"""Verifier for evidence from the ``software`` backend (:mod:`mlcapsule.enclave.backends.software`).

Wire format (a JSON object; every field required, no others)::

    {"type": "software", "version": 1,
     "measurement": hex(32 bytes), "report_data": b64(32 bytes), "platform_key": b64(32 bytes),
     "signature": b64(Ed25519(platform_key,
                  b"mlcapsule-evidence/software/v1\\0" + canonical_json(everything but "signature")))}

The platform key lives in a file on the client, so a valid signature proves only that *some*
mlcapsule installation signed the evidence, not that the enclave is isolated from its owner.
The server therefore refuses software evidence unless the operator enables it loudly.

Checks, in order: it is an object of exactly these fields; type and version (before anything
else is parsed); the policy allows software evidence; field types and lengths; the signature;
report_data equals the expected value (constant-time); the measurement is on the allow-list.
"""

from __future__ import annotations

import binascii
import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..enclave._util import b64d, canonical_json
from ..enclave.errors import AttestationError
from .policy import SOFTWARE_OPTION, AttestationPolicy, VerifiedEvidence, check_evidence_header, normalize_measurement

EVIDENCE_TYPE = "software"
VERSION = 1
CONTEXT = b"mlcapsule-evidence/software/v1\0"
FIELDS = frozenset({"type", "version", "measurement", "report_data", "platform_key", "signature"})


def _b64_field(evidence: Mapping[str, Any], name: str, length: int) -> bytes:
    value = evidence[name]
    if not isinstance(value, str) or len(value) > 4 * length:
        raise AttestationError(f"software evidence: {name} is malformed")
    try:
        raw = b64d(value)
    except (ValueError, binascii.Error, UnicodeEncodeError) as e:
        raise AttestationError(f"software evidence: {name} is not base64") from e
    if len(raw) != length:
        raise AttestationError(f"software evidence: {name} must be {length} bytes")
    return raw


def verify_software(evidence: Mapping[str, Any], *, expected_report_data: bytes,
                    policy: AttestationPolicy, now: dt.datetime | None = None) -> VerifiedEvidence:
    check_evidence_header(evidence, evidence_type=EVIDENCE_TYPE, fields=FIELDS, version=VERSION)
    if not policy.allow_software:
        raise AttestationError(
            "this server does not accept evidence from the 'software' backend (the provider has not started it "
            f"with {SOFTWARE_OPTION}): that evidence is signed by a key on the client's own disk and does not "
            "protect the model against the machine's owner",
            hint="use a hardware-backed enclave backend, or ask the provider to accept software evidence "
                 "(development only)")
    platform_key = _b64_field(evidence, "platform_key", 32)
    signature = _b64_field(evidence, "signature", 64)
    got_report_data = _b64_field(evidence, "report_data", 32)
    if not isinstance(evidence["measurement"], str):
        raise AttestationError("software evidence: measurement is malformed")
    try:
        measurement = normalize_measurement(evidence["measurement"])
    except AttestationError as e:
        raise AttestationError("software evidence: measurement is malformed") from e
    if measurement != evidence["measurement"]:  # the signer writes lower-case hex; anything else was edited
        raise AttestationError("software evidence: measurement is malformed")
    body = {k: v for k, v in evidence.items() if k != "signature"}
    try:
        Ed25519PublicKey.from_public_bytes(platform_key).verify(signature, CONTEXT + canonical_json(body))
    except (InvalidSignature, ValueError) as e:
        raise AttestationError("software evidence: the platform signature does not verify") from e
    if not hmac.compare_digest(got_report_data, expected_report_data):
        raise AttestationError("the evidence does not bind this challenge and these keys (report_data differs)",
                               hint="the evidence was made for another nonce or other keys; run setup again")
    policy.check_measurement(measurement)
    return VerifiedEvidence(EVIDENCE_TYPE, measurement, hashlib.sha256(platform_key).hexdigest())
