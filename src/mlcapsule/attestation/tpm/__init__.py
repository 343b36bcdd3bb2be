"""Verifier for evidence from the ``tpm`` backend (:mod:`mlcapsule.enclave.backends.tpm`).

Pure code on pyca ``cryptography``, in three parts:

* :mod:`.marshal`    TPM 2.0 structures: TPMT_PUBLIC, TPMS_ATTEST, TPMT_SIGNATURE, the constants
* :mod:`.verify`     the pure verifier: the quote, the PCR digest and policy, the EK chain
* :mod:`.credential` credential activation (TPM2_MakeCredential, :func:`credential_challenge`)

Every public name of the three is importable from here, as it was from the single module.

    verified = verify_tpm(evidence, expected_report_data=rd, policy=policy, tpm_policy=TpmPolicy(...))
    answer = credential_challenge(evidence, seal_payload(...))     # {"payload", "credential"}
"""

from __future__ import annotations

from cryptography.hazmat.primitives.serialization import Encoding as Encoding  # the tests use T.Encoding

from .credential import (
    CREDENTIAL_LEN as CREDENTIAL_LEN,
    WRAP_CONTEXT as WRAP_CONTEXT,
    credential_challenge as credential_challenge,
    make_credential as make_credential,
    wrap_payload as wrap_payload,
)
from .marshal import (
    ADMIN_WITH_POLICY as ADMIN_WITH_POLICY,
    ALG_AES as ALG_AES,
    ALG_CFB as ALG_CFB,
    ALG_ECC as ALG_ECC,
    ALG_ECDAA as ALG_ECDAA,
    ALG_ECDH as ALG_ECDH,
    ALG_ECDSA as ALG_ECDSA,
    ALG_ECSCHNORR as ALG_ECSCHNORR,
    ALG_HMAC as ALG_HMAC,
    ALG_KEYEDHASH as ALG_KEYEDHASH,
    ALG_NULL as ALG_NULL,
    ALG_OAEP as ALG_OAEP,
    ALG_RSA as ALG_RSA,
    ALG_RSAES as ALG_RSAES,
    ALG_RSAPSS as ALG_RSAPSS,
    ALG_RSASSA as ALG_RSASSA,
    ALG_SHA1 as ALG_SHA1,
    ALG_SHA256 as ALG_SHA256,
    ALG_SHA384 as ALG_SHA384,
    ALG_SHA512 as ALG_SHA512,
    ALG_SM2 as ALG_SM2,
    ALG_SYMCIPHER as ALG_SYMCIPHER,
    ALG_XOR as ALG_XOR,
    BANKS as BANKS,
    CURVES as CURVES,
    DECRYPT as DECRYPT,
    ENCRYPTED_DUPLICATION as ENCRYPTED_DUPLICATION,
    FIXED_PARENT as FIXED_PARENT,
    FIXED_TPM as FIXED_TPM,
    HASHES as HASHES,
    MAX_STRUCT as MAX_STRUCT,
    NO_DA as NO_DA,
    RESERVED_ATTRIBUTES as RESERVED_ATTRIBUTES,
    RESTRICTED as RESTRICTED,
    SENSITIVE_DATA_ORIGIN as SENSITIVE_DATA_ORIGIN,
    SIGN as SIGN,
    ST_CLEAR as ST_CLEAR,
    TPM_GENERATED_VALUE as TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_CERTIFY as TPM_ST_ATTEST_CERTIFY,
    TPM_ST_ATTEST_CREATION as TPM_ST_ATTEST_CREATION,
    TPM_ST_ATTEST_QUOTE as TPM_ST_ATTEST_QUOTE,
    USER_WITH_AUTH as USER_WITH_AUTH,
    Attest as Attest,
    PcrSelection as PcrSelection,
    Signature as Signature,
    TpmFormatError as TpmFormatError,
    TpmPublic as TpmPublic,
    parse_attest as parse_attest,
    parse_public as parse_public,
    parse_signature as parse_signature,
)
from .verify import (
    CERT_ERRORS as CERT_ERRORS,
    EVIDENCE_TYPE as EVIDENCE_TYPE,
    EXTRA_DATA_CONTEXT as EXTRA_DATA_CONTEXT,
    FIELDS as FIELDS,
    MAX_CERT as MAX_CERT,
    MAX_CHAIN as MAX_CHAIN,
    VERSION as VERSION,
    ParsedTpmEvidence as ParsedTpmEvidence,
    PcrPolicy as PcrPolicy,
    TpmPolicy as TpmPolicy,
    TpmVerifier as TpmVerifier,
    check_ak as check_ak,
    check_ek as check_ek,
    check_pcr_policy as check_pcr_policy,
    check_tpm_evidence as check_tpm_evidence,
    ek_certificate_matches as ek_certificate_matches,
    load_certificates as load_certificates,
    pcr_digest as pcr_digest,
    quote_extra_data as quote_extra_data,
    verify_ek_certificate as verify_ek_certificate,
    verify_quote as verify_quote,
    verify_signature as verify_signature,
    verify_tpm as verify_tpm,
)

__all__ = [
    "EVIDENCE_TYPE",
    "Attest",
    "PcrSelection",
    "Signature",
    "TpmPolicy",
    "TpmPublic",
    "TpmVerifier",
    "check_tpm_evidence",
    "credential_challenge",
    "ek_certificate_matches",
    "load_certificates",
    "make_credential",
    "parse_attest",
    "parse_public",
    "parse_signature",
    "pcr_digest",
    "quote_extra_data",
    "verify_ek_certificate",
    "verify_quote",
    "verify_signature",
    "verify_tpm",
    "wrap_payload",
]
