"""Fuzz the ``tpm`` evidence verifier: TPM2 structures (TPMT_PUBLIC, TPMS_ATTEST, TPMT_SIGNATURE),
the quote's signature and PCR digest, the EK certificate chain, and credential activation.

Input: the evidence JSON. ``verify_tpm`` under a policy trusting the private EK CA the seeds'
swtpm was manufactured with (``fuzz/data/tpm-root.pem``), for the context's report_data; evidence
that verifies then goes through ``credential_challenge`` (what the server seals the payload with).
Besides, each base64 field that decodes is fed to its own marshal parser, so mutations of the
binary structures are reached even when the JSON around them is off.
Seeds: evidence from the real tpm backend on a swtpm (ECC and RSA AKs, an ECC-384 EK), and a real
GCP vTPM's AK and quote.
"""

from __future__ import annotations

import base64
import binascii
import sys

from _common import DATA, context, instrumented, json_or_none, main, ours

with instrumented(__name__ == "__main__"):
    from mlcapsule.attestation import AttestationPolicy, tpm as T
    from mlcapsule.attestation.tpm.credential import credential_challenge
    from mlcapsule.enclave.measurement import measurement

_CTX = context()
_REPORT_DATA = bytes.fromhex(_CTX["report_data"])
_ROOTS = [p for p in (DATA / "tpm-root.pem", DATA / "tpm-intermediate.pem") if p.exists()]
_TPM_POLICY = T.TpmPolicy(roots=tuple(T.load_certificates(_ROOTS[:1])),
                          intermediates=tuple(T.load_certificates(_ROOTS[1:])))
_POLICY = AttestationPolicy(measurements={_CTX["measurement"], measurement().hex()}, tpm=_TPM_POLICY)
_PARSERS = {"ak_public": T.parse_public, "ek_public": T.parse_public, "quote": T.parse_attest,
            "signature": T.parse_signature}


def TestOneInput(data: bytes) -> None:  # noqa: N802
    evidence = json_or_none(data)
    with ours():
        T.verify_tpm(evidence, expected_report_data=_REPORT_DATA, policy=_POLICY)  # type: ignore[arg-type]
        credential_challenge(evidence, b"payload")  # type: ignore[arg-type]
    if isinstance(evidence, dict):
        for name, parse in _PARSERS.items():
            try:
                raw = base64.b64decode(evidence.get(name), validate=True)  # type: ignore[arg-type]
            except (TypeError, ValueError, binascii.Error):
                continue
            with ours():
                parse(raw)


if __name__ == "__main__":
    main(TestOneInput, json_input=True)
    sys.exit(0)
