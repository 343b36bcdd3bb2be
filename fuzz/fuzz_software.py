"""Fuzz the server's evidence dispatch and the ``software`` evidence verifier.

Input: the evidence JSON of a provisioning request. Checked by an ``EvidenceVerifier`` with the
default verifiers (``software``, ``tpm``) under a policy that allows software evidence and the
context's measurement, for the context's report_data; then, for an object, re-signed with the
platform key of the context's software backend (``fuzz/data/platform``) and checked again, so the
fuzzer reaches the report_data and measurement checks behind the signature.
Seeds: evidence from the real software backend.
"""

from __future__ import annotations

import sys

from _common import DATA, context, instrumented, json_or_none, main, ours

with instrumented(__name__ == "__main__"):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from mlcapsule.attestation import AttestationPolicy, EvidenceVerifier
    from mlcapsule.attestation.software import CONTEXT
    from mlcapsule.enclave._util import b64e, canonical_json
    from mlcapsule.enclave.measurement import measurement

_CTX = context()
# The seeds carry the measurement of the enclave code they were made with; the tree may have moved on.
_VERIFIER = EvidenceVerifier(AttestationPolicy(allow_software=True,
                                               measurements={_CTX["measurement"], measurement().hex()}))
_REPORT_DATA = bytes.fromhex(_CTX["report_data"])
_PLATFORM = load_pem_private_key((DATA / "platform" / "platform-key.pem").read_bytes(), None)


def TestOneInput(data: bytes) -> None:  # noqa: N802
    evidence = json_or_none(data)
    with ours():
        _VERIFIER.verify(evidence, expected_report_data=_REPORT_DATA)
    if isinstance(evidence, dict) and evidence.get("type") == "software":
        body = {k: v for k, v in evidence.items() if k != "signature"}
        try:
            signature = b64e(_PLATFORM.sign(CONTEXT + canonical_json(body)))  # type: ignore[union-attr]
        except (TypeError, ValueError, RecursionError):  # not JSON-encodable: the harness's side
            return
        with ours():
            _VERIFIER.verify({**evidence, "signature": signature}, expected_report_data=_REPORT_DATA)


if __name__ == "__main__":
    main(TestOneInput, json_input=True)
    sys.exit(0)
