"""Request and response bodies of the ``/v1/`` API (pydantic), kept apart from the ORM models.

Bytes travel as standard base64 (RFC 4648 §4, with padding). Requests refuse unknown fields.
"""

from __future__ import annotations

import binascii
import datetime as dt
import uuid
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..enclave._util import b64d
from ..enclave.messages.receipts import MAX_UPLOAD, USAGE_PROTOCOL  # noqa: F401  (re-exported)

MAX_EVIDENCE_FIELDS = 64


def _b64_32(value: str) -> str:
    try:
        raw = b64d(value)
    except (ValueError, binascii.Error, UnicodeEncodeError) as e:
        raise ValueError("must be standard base64") from e
    if len(raw) != 32:
        raise ValueError("must encode exactly 32 bytes")
    return value


B64Key = Annotated[str, Field(min_length=44, max_length=44, description="standard base64 of 32 bytes",
                              examples=["AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]),
                   AfterValidator(_b64_32)]
CapsuleVersion = Annotated[int, Field(strict=True, ge=0, lt=2**31)]
Id = Annotated[str, Field(min_length=1, max_length=64)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HealthResponse(BaseModel):
    status: str = "ok"
    version: str


class ChallengeRequest(_Request):
    capsule_id: uuid.UUID
    version: CapsuleVersion


class ChallengeResponse(BaseModel):
    nonce: str = Field(description="standard base64 of 32 random bytes; single use")
    expires_at: dt.datetime


class ProvisionRequest(_Request):
    capsule_id: uuid.UUID
    version: CapsuleVersion
    nonce: B64Key
    hpke_pub: B64Key = Field(description="the enclave's X25519 HPKE public key")
    receipt_pub: B64Key = Field(description="the enclave's Ed25519 usage-receipt public key")
    evidence: dict[str, Any] = Field(description="the IEE backend's evidence over "
                                                 "report_data(nonce, hpke_pub, receipt_pub)",
                                     max_length=MAX_EVIDENCE_FIELDS)


class ProvisionResponse(BaseModel):
    license_id: str
    device_id: str
    payload: str = Field(description="standard base64 of the HPKE message sealed to hpke_pub "
                                     "(content key and signed license); for tpm evidence, wrapped under the "
                                     "credential's secret")
    credential: dict[str, str] | None = Field(
        default=None, description="tpm evidence only: {id_object, encrypted_secret} for TPM2_ActivateCredential")




class UsageRequest(_Request):
    protocol: int = Field(1, description="usage protocol of the client (2: signed acknowledgements)")
    license_id: Id
    device_id: Id
    receipts: list[dict[str, Any]] = Field(max_length=MAX_UPLOAD,
                                           description="signed receipts continuing the chain the server holds")


class UsageResponse(BaseModel):
    seq: int
    charged: int
    answered: int
    ack: dict[str, Any] = Field(description="usage-ack/v1 envelope signed by the provider key: {license_id, "
                                            "device_id, seq, hash} of the chain head the server stored")


class ErrorBody(BaseModel):
    type: str = Field(description="name of the mlcapsule.enclave.errors class, e.g. AttestationError")
    message: str
    hint: str


class ErrorResponse(BaseModel):
    error: ErrorBody
