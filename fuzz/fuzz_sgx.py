"""Fuzz the SGX DCAP v3 quote verifier (``parse_sgx_quote``, ``verify_sgx``); see fuzz_dcap.py.

Seeds: the recorded dcap-qvl SGX quote and its collateral, Intel's sample quotes (test root) and
Open Enclave's bad SGX report.
"""

from __future__ import annotations

import sys

from _common import instrumented, main
from fuzz_dcap import harness

with instrumented(__name__ == "__main__"):
    from mlcapsule.attestation import dcap as D

_MRENCLAVE = bytes.fromhex("33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")
TestOneInput = harness("sgx", D.parse_sgx_quote, D.verify_sgx,
                       D.SgxPolicy(mr_enclaves={_MRENCLAVE}, allow_tcb_statuses={"ConfigurationAndSWHardeningNeeded"}))

if __name__ == "__main__":
    main(TestOneInput, json_input=True, prefix=1)
    sys.exit(0)
