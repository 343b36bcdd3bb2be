"""Fuzz the TDX quote verifier, quote v4 and v5 (``parse_tdx_quote``, ``verify_tdx``); see fuzz_dcap.py.

Seeds: the recorded dcap-qvl TDX quotes and collateral, and production v4/v5 quotes from
go-tdx-guest, trustee and Open Enclave.
"""

from __future__ import annotations

import sys

from _common import instrumented, main
from fuzz_dcap import harness

with instrumented(__name__ == "__main__"):
    from mlcapsule.attestation import dcap as D

_MRTD = D.parse_tdx_quote(__import__("_common").data_file("tdx_quote")).mr_td
TestOneInput = harness("tdx", D.parse_tdx_quote, D.verify_tdx, D.TdxPolicy(mr_tds={_MRTD}))

if __name__ == "__main__":
    main(TestOneInput, json_input=True, prefix=1)
    sys.exit(0)
