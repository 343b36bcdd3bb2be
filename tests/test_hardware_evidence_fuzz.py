"""Arbitrary evidence objects and bytes reach the hardware verifiers: only AttestationError comes out.

The server hands every client's evidence to ``EvidenceVerifier.verify``; whatever the JSON or the
bytes inside it, the answer must be a refusal naming a check (HTTP 403), never another exception
(HTTP 500). Runs derandomized in CI (tests/conftest.py's ``ci`` profile).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from dcap_signer import FakeIntel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from snp_signer import FakeAmd

from mlcapsule.attestation import AttestationPolicy, EvidenceVerifier
from mlcapsule.attestation.dcap import SgxPolicy, TdxPolicy
from mlcapsule.attestation.nitro import NitroPolicy
from mlcapsule.attestation.snp import SnpPolicy
from mlcapsule.enclave.errors import AttestationError

INTEL = FakeIntel(seed=0)
AMD = FakeAmd("Milan", seed=0)
POLICY = AttestationPolicy(
    measurements={"ab" * 32}, sgx=SgxPolicy(mr_enclaves={bytes(32)}, root_ca_der=INTEL.root_ca_der),
    tdx=TdxPolicy(mr_tds={bytes(48)}, root_ca_der=INTEL.root_ca_der),
    snp=SnpPolicy(measurements={"00" * 48}), snp_roots=AMD.roots,
    nitro=NitroPolicy(pcrs={0: {"00" * 48}, 1: {"00" * 48}, 2: {"00" * 48}}))
VERIFIER = EvidenceVerifier(POLICY)
RD = bytes(64)
SEEDS = {
    "sgx": {"type": "sgx", "version": 1, "quote": base64.b64encode(INTEL.sgx_quote(RD)).decode(),
            "collateral": INTEL.collateral("sgx")},
    "tdx": {"type": "tdx", "version": 1, "quote": base64.b64encode(INTEL.tdx_quote(RD)).decode(),
            "collateral": INTEL.collateral("tdx")},
    "snp": {"type": "snp", "version": 1, "report": base64.b64encode(AMD.report(RD)).decode(),
            "vcek": base64.b64encode(AMD.vcek_der).decode(), "chain": AMD.chain_pem.decode()},
}
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


def refused_only(evidence: Any) -> None:
    try:
        VERIFIER.verify(evidence, expected_report_data=hashlib.sha256(b"binding").digest())
    except AttestationError:
        return
    raise AssertionError("verified")  # nothing here carries the expected binding


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["sgx", "tdx", "snp", "nitro"]), fields=st.dictionaries(
    st.sampled_from(["type", "version", "quote", "collateral", "report", "vcek", "chain", "document", "x"]),
    json_values, max_size=6))
def test_arbitrary_evidence_objects_are_refused_with_attestation_errors(kind: str, fields: dict[str, Any]) -> None:
    refused_only({"type": kind, **fields})


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["sgx", "tdx", "snp", "nitro"]), blob=st.binary(max_size=6000),
       version=st.sampled_from([1, 1, 1, 2, "1", None]))
def test_arbitrary_bytes_in_evidence_are_refused_with_attestation_errors(kind: str, blob: bytes, version: Any) -> None:
    b64 = base64.b64encode(blob).decode()
    evidence = {"sgx": {"type": "sgx", "version": version, "quote": b64, "collateral": None},
                "tdx": {"type": "tdx", "version": version, "quote": b64, "collateral": {"tcb_info": b64}},
                "snp": {"type": "snp", "version": version, "report": b64, "vcek": b64, "chain": blob.decode("latin-1")},
                "nitro": {"type": "nitro", "version": version, "document": b64}}[kind]
    refused_only(evidence)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(SEEDS)), data=st.data())
def test_mutated_signed_evidence_is_refused_with_attestation_errors(kind: str, data: st.DataObject) -> None:
    evidence = dict(SEEDS[kind])
    name = "quote" if kind in ("sgx", "tdx") else data.draw(st.sampled_from(["report", "vcek"]))
    raw = bytearray(base64.b64decode(evidence[name]))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    evidence[name] = base64.b64encode(bytes(raw)).decode()
    refused_only(evidence)
