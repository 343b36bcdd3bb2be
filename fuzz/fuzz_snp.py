"""Fuzz the AMD SEV-SNP verifier (``parse_snp_report``, ``verify_snp``).

Input: a mode byte, then
  0: the 1184-byte attestation report, 1: the VCEK/VLEK certificate (DER),
  2: the ASK+ARK chain (PEM);
the other two are the recorded go-sev-guest Milan report's. Verified at a time inside every
recorded certificate's validity, under a policy that accepts the recorded report (debug guest).
Seeds: real Milan reports (VCEK and VLEK signed), their certificates and AMD's chains.
"""

from __future__ import annotations

import datetime as dt
import sys

from _common import data_file, instrumented, main, ours, split

with instrumented(__name__ == "__main__"):
    from mlcapsule.attestation.snp import SnpPolicy, parse_snp_report, verify_snp

_NOW = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
_FIXED = [data_file("snp_report"), data_file("snp_vcek.der"), data_file("snp_chain.pem")]
_POLICY = SnpPolicy(measurements={parse_snp_report(_FIXED[0]).measurement.hex()}, allow_debug=True)


def TestOneInput(data: bytes) -> None:  # noqa: N802
    mode, rest = split(data, 3)
    args = list(_FIXED)
    args[mode] = rest
    with ours():
        parse_snp_report(args[0])
    with ours():
        verify_snp(args[0], args[1], args[2], policy=_POLICY, expected_report_data=None, now=_NOW)
    with ours():
        verify_snp(args[0], args[1], args[2], policy=_POLICY, expected_report_data=b"\1" * 64, now=_NOW)


if __name__ == "__main__":
    main(TestOneInput)
    sys.exit(0)
