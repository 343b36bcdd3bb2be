"""Fuzz the AWS Nitro Enclaves verifier (``parse_nitro_document``, ``verify_nitro``).

Input: a raw COSE_Sign1 attestation document (CBOR). Parsed, then verified against the pinned
AWS root under a policy that accepts the recorded debug enclave (PCR0-2 zero), unbound and bound
to a user_data prefix. Seeds: the recorded 2024 documents (a valid one, and one that must fail).
"""

from __future__ import annotations

import sys

from _common import instrumented, main, ours

with instrumented(__name__ == "__main__"):
    from mlcapsule.attestation.nitro import NitroPolicy, parse_nitro_document, verify_nitro

_ZERO = "00" * 48
_POLICY = NitroPolicy(pcrs={0: {_ZERO}, 1: {_ZERO}, 2: {_ZERO}}, allow_debug=True)


def TestOneInput(data: bytes) -> None:  # noqa: N802
    with ours():
        parse_nitro_document(data)
    with ours():
        verify_nitro(data, policy=_POLICY, expected_report_data=None)
    with ours():
        verify_nitro(data, policy=_POLICY, expected_report_data=b"\1" * 32)


if __name__ == "__main__":
    main(TestOneInput)
    sys.exit(0)
