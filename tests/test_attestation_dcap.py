"""SGX (DCAP v3) and TDX (v4/v5) quote verification against quotes recorded on real hardware.

The vectors and their provenance: ../shared/attestation-vectors/README.md. Their collateral
(TCB info, QE identity, PCK CRL) is valid for a month in 2025 (2026 for the v5 quote), so every
verification pins a time inside that window. Test-signed quotes (a fake Intel root making quotes
with our report_data) are not built yet, so the binding, debug and identity checks on accepted
quotes are tested through the policy functions on parsed bodies and on the recordings' own values.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings, strategies as st

from mlcapsule.attestation import dcap as D
from mlcapsule.enclave.errors import AttestationError

# shared/ sits beside the checkout (as in CI); MLCAPSULE_SHARED points elsewhere.
SHARED = Path(os.environ.get("MLCAPSULE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
VECTORS = SHARED / "attestation-vectors"


def _ts(s: str) -> int:
    return int(dt.datetime.fromisoformat(s).replace(tzinfo=dt.UTC).timestamp())


T_2025 = _ts("2025-07-01T00:00:00")  # inside the SGX and TDX v4 collateral (2025-06-19 .. 2025-07-19)
T_2026 = _ts("2026-03-01T00:00:00")  # inside the v5 "outdated" quote's collateral

SGX_MRENCLAVE = bytes.fromhex("33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")
SGX_MRSIGNER = bytes.fromhex("815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6")
SGX_REPORT_DATA = b"Hello, world!".ljust(64, b"\0")
TDX_MRTD = bytes.fromhex("91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
                         "de03ae6dc5f87f27428b2538873118b7")
TDX_RTMR0 = bytes.fromhex("44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c"
                          "48aca29b220b80b6a540cf994b9bc9c0")
TDX_REPORT_DATA = bytes.fromhex("9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9"
                                "eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20")
SGX_STATUS = "ConfigurationAndSWHardeningNeeded"
SGX_ADVISORIES = ("INTEL-SA-00289", "INTEL-SA-00615")


def _read(rel: str) -> bytes:
    path = VECTORS / rel
    if not path.exists():
        pytest.fail(f"a recorded attestation vector is missing: {path}")
    return path.read_bytes()


def _collateral(rel: str) -> dict[str, Any]:
    return json.loads(_read(rel))


@pytest.fixture(scope="module")
def sgx() -> tuple[bytes, dict[str, Any]]:
    return _read("dcapqvl/sgx_quote"), _collateral("dcapqvl/sgx_quote_collateral.json")


@pytest.fixture(scope="module")
def tdx() -> tuple[bytes, dict[str, Any]]:
    return _read("dcapqvl/tdx_quote"), _collateral("dcapqvl/tdx_quote_collateral.json")


SGX_OK = D.SgxPolicy(mr_enclaves={SGX_MRENCLAVE}, allow_tcb_statuses={SGX_STATUS})
TDX_OK = D.TdxPolicy(mr_tds={TDX_MRTD}, rtmr0={TDX_RTMR0})


def _flip(data: bytes, i: int) -> bytes:
    b = bytearray(data)
    b[i] ^= 0x01
    return bytes(b)


# -- the pinned root ---------------------------------------------------------------------------------------
def test_pinned_root_is_intels_and_matches_the_vectors() -> None:
    pem = x509.load_pem_x509_certificate(_read("tdx/trusted_root.pem"))
    assert pem.public_bytes(Encoding.DER) == D.INTEL_SGX_ROOT_CA_DER
    assert hashlib.sha256(D.INTEL_SGX_ROOT_CA_DER).hexdigest().upper() == \
        "44A0196B2B99F889B8E149E95B807A350E7424964399E885A7CBB8CCFAB674D3"


def test_another_root_is_refused(sgx: tuple[bytes, dict[str, Any]]) -> None:
    # Intel's *test* root (the SGXDataCenterAttestationPrimitives sample data): a real certificate, wrong anchor.
    test_root = x509.load_pem_x509_certificate(_read("inteldcap/trustedRootCaCert.pem")).public_bytes(Encoding.DER)
    with pytest.raises(AttestationError, match="SGX quote refused"):
        D.verify_sgx(*sgx, policy=dataclasses.replace(SGX_OK, root_ca_der=test_root), now=T_2025,
                     expected_report_data=None)


# -- SGX ----------------------------------------------------------------------------------------------
def test_sgx_quote_status_is_refused_by_default(sgx: tuple[bytes, dict[str, Any]]) -> None:
    with pytest.raises(AttestationError, match=f"TCB status check failed: the platform is {SGX_STATUS} "
                                               r"\(advisories: INTEL-SA-00289, INTEL-SA-00615\)"):
        D.verify_sgx(*sgx, policy=D.SgxPolicy(mr_enclaves={SGX_MRENCLAVE}), now=T_2025, expected_report_data=None)


def test_sgx_quote_verifies_when_the_policy_accepts_its_status(sgx: tuple[bytes, dict[str, Any]]) -> None:
    quote, collateral = sgx
    claims = D.verify_sgx(quote, collateral, policy=SGX_OK, now=T_2025, expected_report_data=SGX_REPORT_DATA)
    assert claims.tcb_status == SGX_STATUS and claims.advisory_ids == SGX_ADVISORIES
    assert claims.mr_enclave == SGX_MRENCLAVE and claims.body.mr_signer == SGX_MRSIGNER
    assert claims.body.isv_prod_id == 0 and claims.body.isv_svn == 0 and not claims.body.debug
    assert claims.report_data == SGX_REPORT_DATA and claims.ppid.hex() == "d04ec06d4e6d92dc90d0ad3cf5ee2ddf"
    # collateral as bytes, and a 32-byte binding compared as a prefix
    again = D.verify_sgx(quote, json.dumps(collateral).encode(), policy=SGX_OK, now=T_2025,
                         expected_report_data=SGX_REPORT_DATA[:32])
    assert again == claims
    with pytest.raises(dataclasses.FrozenInstanceError):
        claims.tcb_status = "UpToDate"  # type: ignore[misc]


def test_sgx_signer_policy(sgx: tuple[bytes, dict[str, Any]]) -> None:
    ok = D.SgxPolicy(mr_signers={SGX_MRSIGNER}, isv_prod_ids={0}, allow_tcb_statuses={SGX_STATUS})
    assert D.verify_sgx(*sgx, policy=ok, now=T_2025, expected_report_data=None).body.mr_signer == SGX_MRSIGNER
    for policy, check in [(dataclasses.replace(ok, mr_signers={b"\1" * 32}), "MRSIGNER"),
                          (dataclasses.replace(ok, isv_prod_ids={7}), "ISVPRODID"),
                          (dataclasses.replace(ok, min_isv_svn=1), "ISVSVN"),
                          (dataclasses.replace(SGX_OK, mr_enclaves={b"\2" * 32}), "MRENCLAVE"),
                          (D.SgxPolicy(allow_tcb_statuses={SGX_STATUS}), "identity"),
                          (dataclasses.replace(ok, reject_advisories={"INTEL-SA-00615"}), "advisory")]:
        with pytest.raises(AttestationError, match=f"SGX {check} check failed"):
            D.verify_sgx(*sgx, policy=policy, now=T_2025, expected_report_data=None)


def test_sgx_wrong_report_data_is_refused(sgx: tuple[bytes, dict[str, Any]]) -> None:
    for wrong in (b"\0" * 32, b"Hello, world?".ljust(64, b"\0"), SGX_REPORT_DATA[:63] + b"\1"):
        with pytest.raises(AttestationError, match="SGX report_data check failed"):
            D.verify_sgx(*sgx, policy=SGX_OK, now=T_2025, expected_report_data=wrong)


@pytest.mark.parametrize(("now", "why"), [
    (_ts("2025-06-01T00:00:00"), "collateral validity"),  # before the TCB info was issued
    (_ts("2025-07-20T00:00:00"), "collateral validity"),  # after the QE identity and PCK CRL expired
    (_ts("2026-12-01T00:00:00"), "collateral validity"),
])
def test_time_outside_the_collateral_is_refused(sgx: tuple[bytes, dict[str, Any]],
                                                tdx: tuple[bytes, dict[str, Any]], now: int, why: str) -> None:
    with pytest.raises(AttestationError, match=f"SGX quote refused: {why}"):
        D.verify_sgx(*sgx, policy=SGX_OK, now=now, expected_report_data=None)
    with pytest.raises(AttestationError, match=f"TDX quote refused: {why}"):
        D.verify_tdx(*tdx, policy=TDX_OK, now=now, expected_report_data=None)


def test_sgx_signed_region_flips_are_refused(sgx: tuple[bytes, dict[str, Any]]) -> None:
    quote, collateral = sgx
    # header (bytes 0..47): every flip is refused, some as a format error before any signature is checked
    for i in range(48):
        with pytest.raises(AttestationError):
            D.verify_sgx(_flip(quote, i), collateral, policy=SGX_OK, now=T_2025, expected_report_data=None)
    # report body (48..431): signed by the attestation key
    for i in range(48, 432, 5):
        with pytest.raises(AttestationError, match=r"quote signature \(attestation key"):
            D.verify_sgx(_flip(quote, i), collateral, policy=SGX_OK, now=T_2025, expected_report_data=None)
    # the QE report (564..947) and its signature (948..1011): signed by the PCK key
    for i in range(564, 1012, 7):
        with pytest.raises(AttestationError, match="QE report"):
            D.verify_sgx(_flip(quote, i), collateral, policy=SGX_OK, now=T_2025, expected_report_data=None)


def test_tdx_quote_is_not_an_sgx_quote(sgx: tuple[bytes, dict[str, Any]], tdx: tuple[bytes, dict[str, Any]]) -> None:
    with pytest.raises(AttestationError, match="not an SGX quote"):
        D.verify_sgx(tdx[0], tdx[1], policy=SGX_OK, now=T_2025, expected_report_data=None)
    with pytest.raises(AttestationError, match="not a TDX quote"):
        D.verify_tdx(sgx[0], sgx[1], policy=TDX_OK, now=T_2025, expected_report_data=None)
    # right type, other platform's collateral
    with pytest.raises(AttestationError, match="TDX quote refused"):
        D.verify_tdx(tdx[0], sgx[1], policy=TDX_OK, now=T_2025, expected_report_data=None)


def test_open_enclave_bad_sgx_report_is_refused(sgx: tuple[bytes, dict[str, Any]]) -> None:
    with pytest.raises(AttestationError, match="SGX quote format"):
        D.verify_sgx(_read("oe/sgx_report_bad.bin"), sgx[1], policy=SGX_OK, now=T_2025, expected_report_data=None)


# -- TDX ----------------------------------------------------------------------------------------------
def test_tdx_v4_quote_is_up_to_date_and_verifies(tdx: tuple[bytes, dict[str, Any]]) -> None:
    claims = D.verify_tdx(*tdx, policy=TDX_OK, now=T_2025, expected_report_data=TDX_REPORT_DATA[:32])
    assert claims.tcb_status == "UpToDate" and claims.advisory_ids == ()
    assert claims.mr_td == TDX_MRTD and claims.body.rtmrs[0] == TDX_RTMR0 and claims.body.quote_version == 4
    assert claims.report_data == TDX_REPORT_DATA and not claims.body.debug
    assert claims.body.td_attributes == bytes.fromhex("0000001000000000")  # SEPT_VE_DISABLE only
    pinned = dataclasses.replace(TDX_OK, td_attributes=bytes.fromhex("0000001000000000"))
    assert D.verify_tdx(*tdx, policy=pinned, now=T_2025, expected_report_data=TDX_REPORT_DATA) == claims


def test_tdx_policy_refusals(tdx: tuple[bytes, dict[str, Any]]) -> None:
    for policy, check in [(D.TdxPolicy(mr_tds={b"\1" * 48}), "MRTD"),
                          (D.TdxPolicy(), "MRTD"),
                          (dataclasses.replace(TDX_OK, rtmr2={b"\3" * 48}), "RTMR2"),
                          (dataclasses.replace(TDX_OK, td_attributes=bytes(8)), "TD_ATTRIBUTES")]:
        with pytest.raises(AttestationError, match=f"TDX {check} check failed"):
            D.verify_tdx(*tdx, policy=policy, now=T_2025, expected_report_data=None)
    with pytest.raises(AttestationError, match="TDX report_data check failed"):
        D.verify_tdx(*tdx, policy=TDX_OK, now=T_2025, expected_report_data=bytes(32))


def test_tdx_signed_region_flips_are_refused(tdx: tuple[bytes, dict[str, Any]]) -> None:
    quote, collateral = tdx
    for i in range(48):
        with pytest.raises(AttestationError):
            D.verify_tdx(_flip(quote, i), collateral, policy=TDX_OK, now=T_2025, expected_report_data=None)
    for i in range(48, 632, 7):  # TD report body
        with pytest.raises(AttestationError, match=r"quote signature \(attestation key"):
            D.verify_tdx(_flip(quote, i), collateral, policy=TDX_OK, now=T_2025, expected_report_data=None)
    for i in range(770, 1218, 7):  # QE report (770..1153) and its signature (1154..1217)
        with pytest.raises(AttestationError, match="QE report"):
            D.verify_tdx(_flip(quote, i), collateral, policy=TDX_OK, now=T_2025, expected_report_data=None)


def test_tdx_v5_outdated_quote_is_refused() -> None:
    quote = _read("dcapqvl/tdx_quote_outdated")
    body = D.parse_tdx_quote(quote)
    assert body.quote_version == 5 and body.body_type == D.V5_BODY_TD15
    any_status = D.TdxPolicy(mr_tds={body.mr_td}, allow_tcb_statuses=D.TCB_STATUSES)
    with pytest.raises(AttestationError, match=r"TDX quote refused: TCB level \(TCB info\) failed "
                                               r"\(.*No matching TCB level"):
        D.verify_tdx(quote, _collateral("dcapqvl/tdx_quote_outdated_collateral.json"), policy=any_status,
                     now=T_2026, expected_report_data=None)


# -- our parser agrees with dcap-qvl's on every recorded quote ----------------------------------------------------
TDX_QUOTES = ["dcapqvl/tdx_quote", "dcapqvl/tdx_quote_outdated", "tdx/tdx_prod_quote_SPR_E4.dat",
              "tdx/quote_v5_sample.dat", "tdx/cos-113-tdx-quote.dat", "oe/tdx_quote_v5.bin",
              "oe/tdx_quote-moduleupdate-seamldr5.dat", "trustee/tdx_quote_5.dat", "trustee/tdx_quote_6.dat"]


@pytest.mark.parametrize("rel", TDX_QUOTES)
def test_tdx_parser_matches_dcap_qvl(rel: str) -> None:
    quote = _read(rel)
    theirs = dcap_qvl.parse_quote(quote).report
    ours = D.parse_tdx_quote(quote)
    assert (ours.mr_td, ours.td_attributes, ours.report_data, ours.mr_seam, ours.xfam, ours.mr_config_id) == \
        (theirs.mr_td, theirs.td_attributes, theirs.report_data, theirs.mr_seam, theirs.xfam, theirs.mr_config_id)
    assert ours.rtmrs == (theirs.rt_mr0, theirs.rt_mr1, theirs.rt_mr2, theirs.rt_mr3)
    if ours.body_type == D.V5_BODY_TD15:
        assert (ours.tee_tcb_svn2, ours.mr_service_td) == (theirs.tee_tcb_svn2, theirs.mr_service_td)
    if rel == "tdx/cos-113-tdx-quote.dat":  # the COS quote carries the recorded nonce as its report_data
        assert ours.report_data == _read("tdx/nonce.dat")


def test_sgx_parser_matches_dcap_qvl(sgx: tuple[bytes, dict[str, Any]]) -> None:
    theirs = dcap_qvl.parse_quote(sgx[0]).report
    ours = D.parse_sgx_quote(sgx[0])
    assert (ours.mr_enclave, ours.mr_signer, ours.attributes, ours.report_data, ours.cpu_svn) == \
        (theirs.mr_enclave, theirs.mr_signer, theirs.attributes, theirs.report_data, theirs.cpu_svn)


# -- the policy functions on parsed bodies (the recordings are not debug enclaves) -------------------------------
def test_debug_is_refused_unless_allowed(sgx: tuple[bytes, dict[str, Any]],
                                         tdx: tuple[bytes, dict[str, Any]]) -> None:
    body = D.parse_sgx_quote(sgx[0])
    debug = dataclasses.replace(body, attributes=bytes([body.attributes[0] | 0x02]) + body.attributes[1:])
    assert debug.debug and not body.debug
    D.check_sgx_body(body, SGX_OK, expected_report_data=SGX_REPORT_DATA)
    with pytest.raises(AttestationError, match="SGX debug check failed"):
        D.check_sgx_body(debug, SGX_OK, expected_report_data=SGX_REPORT_DATA)
    D.check_sgx_body(debug, dataclasses.replace(SGX_OK, allow_debug=True), expected_report_data=SGX_REPORT_DATA)

    td = D.parse_tdx_quote(tdx[0])
    td_debug = dataclasses.replace(td, td_attributes=bytes([td.td_attributes[0] | 0x01]) + td.td_attributes[1:])
    assert td_debug.debug and not td.debug
    D.check_tdx_body(td, TDX_OK, expected_report_data=None)
    with pytest.raises(AttestationError, match="TDX debug check failed"):
        D.check_tdx_body(td_debug, TDX_OK, expected_report_data=None)
    D.check_tdx_body(td_debug, dataclasses.replace(TDX_OK, allow_debug=True), expected_report_data=None)


def test_policies_reject_bad_configuration() -> None:
    with pytest.raises(ValueError, match="never-acceptable"):
        D.SgxPolicy(allow_tcb_statuses={"Revoked"})
    with pytest.raises(TypeError):
        D.SgxPolicy(mr_enclaves=SGX_MRENCLAVE)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        D.TdxPolicy(mr_tds={SGX_MRENCLAVE})  # 32 bytes, not 48
    with pytest.raises(ValueError):
        D.TdxPolicy(root_ca_der=b"not a certificate")


def test_bad_arguments(sgx: tuple[bytes, dict[str, Any]]) -> None:
    with pytest.raises(TypeError):
        D.verify_sgx(*sgx, policy=SGX_OK, now=T_2025, expected_report_data=b"short")
    with pytest.raises(AttestationError, match="verification time"):
        D.verify_sgx(*sgx, policy=SGX_OK, now=float(T_2025), expected_report_data=None)  # type: ignore[arg-type]
    for bad in ({"tcb_info": 1}, b"\xff", b"{}", "text"):
        with pytest.raises(AttestationError, match="collateral"):
            D.verify_sgx(sgx[0], bad, policy=SGX_OK, now=T_2025, expected_report_data=None)  # type: ignore[arg-type]


# -- arbitrary bytes raise only AttestationError --------------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=1200), prefix=st.sampled_from([b"", b"\x03\x00\x02\x00\0\0\0\0",
                                                              b"\x04\x00\x02\x00\x81\0\0\0",
                                                              b"\x05\x00\x02\x00\x81\0\0\0"]))
def test_arbitrary_bytes_raise_only_attestation_error(sgx: tuple[bytes, dict[str, Any]],
                                                      tdx: tuple[bytes, dict[str, Any]],
                                                      data: bytes, prefix: bytes) -> None:
    blob = prefix + data
    with pytest.raises(AttestationError):
        D.verify_sgx(blob, sgx[1], policy=SGX_OK, now=T_2025, expected_report_data=None)
    with pytest.raises(AttestationError):
        D.verify_tdx(blob, tdx[1], policy=TDX_OK, now=T_2025, expected_report_data=None)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.integers(0, 5005), junk=st.binary(min_size=1, max_size=64))
def test_spliced_quotes_raise_only_attestation_error(tdx: tuple[bytes, dict[str, Any]], start: int,
                                                     junk: bytes) -> None:
    quote = tdx[0]
    spliced = quote[:start] + junk + quote[start + len(junk):]
    try:
        D.verify_tdx(spliced, tdx[1], policy=TDX_OK, now=T_2025, expected_report_data=None)
    except AttestationError:
        pass  # anything else propagates and fails the test
