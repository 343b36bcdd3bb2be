"""Fuzz the hardware evidence wire format (``sgx``, ``tdx``, ``snp``, ``nitro``) behind ``EvidenceVerifier``.

Input: the evidence JSON of a provisioning request, as the server receives it. Dispatched by the
default verifier table under a policy that accepts the recorded evidence (the SGX enclave, the TDX
MRTD, the debug SNP guest and the debug Nitro enclave), at a time inside the recorded collateral
and certificates (per type), for a fixed expected binding: the base64 fields, the collateral
object (or null), the chain, then dcap-qvl / SNP / Nitro verification and the binding check.
The raw quote, report and document parsers have their own harnesses (fuzz_sgx.py, ...).
Seeds: the recorded quotes, reports and documents in the wire format, with and without collateral.
"""

from __future__ import annotations

import datetime as dt
import sys

from _common import data_file, instrumented, json_or_none, main, ours

with instrumented(__name__ == "__main__"):
    from mlcapsule.attestation import AttestationPolicy, EvidenceVerifier, dcap as D
    from mlcapsule.attestation.nitro import NitroPolicy, parse_nitro_document
    from mlcapsule.attestation.snp import SnpPolicy, parse_snp_report

_ZERO48 = "00" * 48
_NITRO_DOC = (__import__("_common").CORPUS / "nitro" / "example_attestation.cbor").read_bytes()
_POLICY = AttestationPolicy(
    measurements={"00" * 32},
    sgx=D.SgxPolicy(mr_enclaves={D.parse_sgx_quote(data_file("sgx_quote")).mr_enclave},
                    allow_tcb_statuses={"ConfigurationAndSWHardeningNeeded"}),
    tdx=D.TdxPolicy(mr_tds={D.parse_tdx_quote(data_file("tdx_quote")).mr_td}),
    snp=SnpPolicy(measurements={parse_snp_report(data_file("snp_report")).measurement.hex()}, allow_debug=True),
    nitro=NitroPolicy(pcrs={0: {_ZERO48}, 1: {_ZERO48}, 2: {_ZERO48}}, allow_debug=True))
_VERIFIER = EvidenceVerifier(_POLICY)
_DCAP_TIME = dt.datetime(2025, 7, 1, tzinfo=dt.UTC)
_NOW = {"sgx": _DCAP_TIME, "tdx": _DCAP_TIME, "snp": dt.datetime(2025, 6, 1, tzinfo=dt.UTC),
        "nitro": parse_nitro_document(_NITRO_DOC).timestamp}
_BINDING = bytes(range(32))


def TestOneInput(data: bytes) -> None:  # noqa: N802
    evidence = json_or_none(data)
    kind = evidence.get("type") if isinstance(evidence, dict) else None
    now = _NOW.get(kind, _DCAP_TIME) if isinstance(kind, str) else _DCAP_TIME
    with ours():
        _VERIFIER.verify(evidence, expected_report_data=_BINDING, now=now)


if __name__ == "__main__":
    main(TestOneInput, json_input=True)
    sys.exit(0)
