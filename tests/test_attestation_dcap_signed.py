"""SGX (DCAP v3) and TDX (v4/v5) verification end to end on quotes signed under a fake Intel root.

tests/dcap_signer.py builds a fake Intel PKI and platform (root, PCK CA, PCK leaf with the SGX
extension, TCB signing cert, QE, attestation key) with pyca ``cryptography``; the verifier is the
real one (:func:`mlcapsule.attestation.dcap.verify_sgx` / ``verify_tdx`` over dcap-qvl) with the
fake root injected into the policy. Unlike the recorded quotes (test_attestation_dcap.py), these
carry our report_data, any identity and any TCB status, so the binding, identity, status, time
and tampering checks are tested on quotes the verifier accepts cryptographically.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import struct
import time
from typing import Any

import dcap_qvl
import pytest
from hypothesis import given, settings, strategies as st

from dcap_signer import ISSUE_DATE, NEXT_UPDATE, VALID_AT, FakeIntel
from mlcapsule.attestation import dcap as D
from mlcapsule.enclave.errors import AttestationError

INTEL = FakeIntel(seed=0)
OTHER = FakeIntel(seed=1)
NOW = VALID_AT

REPORT_DATA = bytes(range(64))
MR_ENCLAVE = bytes([0x11]) * 32
MR_SIGNER = bytes([0x22]) * 32
MR_TD = bytes([0x33]) * 48
RTMRS = tuple(bytes([0x40 + i]) * 48 for i in range(4))
TD_ATTRIBUTES = bytes.fromhex("0000001000000000")

SGX_POLICY = D.SgxPolicy(mr_enclaves={MR_ENCLAVE}, root_ca_der=INTEL.root_ca_der)
TDX_POLICY = D.TdxPolicy(mr_tds={MR_TD}, rtmr0={RTMRS[0]}, rtmr1={RTMRS[1]}, rtmr2={RTMRS[2]}, rtmr3={RTMRS[3]},
                         td_attributes=TD_ATTRIBUTES, root_ca_der=INTEL.root_ca_der)
SGX_COLLATERAL = INTEL.collateral("sgx")
TDX_COLLATERAL = INTEL.collateral("tdx")
# (version, body_type): v4 (TDX 1.0 body), v5 with a TDX 1.5 body, v5 with a TDX 1.0 body
TDX_FORMATS = [(4, None), (5, 3), (5, 2)]

# Offsets in an SGX v3 quote: header 48, report body 384, auth data length 4, then the auth data.
SGX_AUTH = 48 + 384 + 4
SGX_SIG, SGX_ATT_KEY, SGX_QE_REPORT = SGX_AUTH, SGX_AUTH + 64, SGX_AUTH + 128
SGX_QE_SIG, SGX_QE_AUTH = SGX_QE_REPORT + 384, SGX_QE_REPORT + 384 + 64 + 2


def sgx_quote(**kw: Any) -> bytes:
    return INTEL.sgx_quote(REPORT_DATA, **{"mr_enclave": MR_ENCLAVE, "mr_signer": MR_SIGNER, **kw})


def tdx_quote(version: int = 4, body_type: int | None = None, **kw: Any) -> bytes:
    return INTEL.tdx_quote(REPORT_DATA, **{"mr_td": MR_TD, "rtmrs": RTMRS, "td_attributes": TD_ATTRIBUTES,
                                           "version": version, "body_type": body_type, **kw})


def tdx_offsets(quote: bytes) -> dict[str, int]:
    """Where the signed region ends and the QE report starts in a v4/v5 TDX quote."""
    version = struct.unpack_from("<H", quote)[0]
    signed = 48 + (6 + struct.unpack_from("<I", quote, 50)[0] if version == 5 else 584)
    auth = signed + 4
    # auth data: signature 64, attestation key 64, certification data type 6 (u16) and size (u32), QE report
    return {"signed": signed, "sig": auth, "att_key": auth + 64, "qe_report": auth + 128 + 6,
            "qe_sig": auth + 128 + 6 + 384}


def flip(data: bytes, i: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[i] ^= 1 << bit
    return bytes(b)


def verify_sgx(quote: bytes, collateral: Any = None, *, policy: D.SgxPolicy = SGX_POLICY, now: int = NOW,
               expected: bytes | None = REPORT_DATA) -> D.SgxClaims:
    return D.verify_sgx(quote, SGX_COLLATERAL if collateral is None else collateral, policy=policy, now=now,
                        expected_report_data=expected)


def verify_tdx(quote: bytes, collateral: Any = None, *, policy: D.TdxPolicy = TDX_POLICY, now: int = NOW,
               expected: bytes | None = REPORT_DATA) -> D.TdxClaims:
    return D.verify_tdx(quote, TDX_COLLATERAL if collateral is None else collateral, policy=policy, now=now,
                        expected_report_data=expected)


def ts(d: dt.datetime) -> int:
    return int(d.timestamp())


# -- the signer itself -----------------------------------------------------------------------------------------
def test_fake_intel_is_deterministic_per_seed_and_distinct_across_seeds() -> None:
    assert FakeIntel(0).root_ca_der == INTEL.root_ca_der != OTHER.root_ca_der
    assert FakeIntel(0).ppid == INTEL.ppid != OTHER.ppid
    # RFC 6979 signatures: another FakeIntel(0) (e.g. in a fake configfs-tsm tree) signs the same bytes
    assert FakeIntel(0).sgx_quote(REPORT_DATA, mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER) == sgx_quote()
    assert FakeIntel(0).collateral("tdx") == TDX_COLLATERAL
    assert INTEL.root_ca_der != D.INTEL_SGX_ROOT_CA_DER


def test_pck_certificate_carries_the_sgx_extension_dcap_qvl_reads() -> None:
    ext = dcap_qvl.parse_pck_extension_from_pem(INTEL.pck_chain_pem.encode())
    assert bytes(ext.ppid) == INTEL.ppid and len(INTEL.ppid) == 16
    assert bytes(ext.fmspc).hex().upper() == json.loads(SGX_COLLATERAL["tcb_info"])["fmspc"]
    assert bytes(ext.cpu_svn) == bytes([4, 4, 2, 2, 3, 1, 0, 5] + [0] * 8) and ext.pce_svn == 13
    assert bytes(ext.pce_id) == b"\0\0" and ext.sgx_type == 0


def test_default_collateral_window_holds_valid_at_and_the_clock() -> None:
    # The server verifies at its own clock: the default window must hold it (until 2040).
    assert ts(ISSUE_DATE) < VALID_AT < ts(NEXT_UPDATE)
    assert ts(ISSUE_DATE) < int(time.time()) < ts(NEXT_UPDATE)
    assert verify_sgx(sgx_quote(), now=int(time.time())).tcb_status == "UpToDate"


def test_signer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mr_enclave must be 32 bytes"):
        INTEL.sgx_quote(REPORT_DATA, mr_enclave=b"\0" * 31)
    with pytest.raises(ValueError, match="report_data"):
        INTEL.sgx_quote(b"\0" * 65)
    with pytest.raises(ValueError, match="version must be 4 or 5"):
        INTEL.tdx_quote(REPORT_DATA, version=3)
    with pytest.raises(ValueError, match="rtmrs"):
        INTEL.tdx_quote(REPORT_DATA, rtmrs=RTMRS[:3])
    with pytest.raises(ValueError, match="kind"):
        INTEL.collateral("snp")
    with pytest.raises(ValueError, match="tcb_status"):
        INTEL.collateral("sgx", tcb_status="Fine")


# -- accepted quotes and their claims --------------------------------------------------------------------------
def test_signed_sgx_quote_verifies_with_its_claims() -> None:
    quote = sgx_quote(isv_prod_id=3, isv_svn=7)
    claims = verify_sgx(quote)
    assert claims.tcb_status == "UpToDate" and claims.advisory_ids == ()
    assert claims.mr_enclave == MR_ENCLAVE and claims.body.mr_signer == MR_SIGNER
    assert (claims.body.isv_prod_id, claims.body.isv_svn) == (3, 7) and not claims.body.debug
    assert claims.report_data == REPORT_DATA and claims.ppid == INTEL.ppid
    # collateral as bytes, and a 32-byte binding compared as a prefix
    assert verify_sgx(quote, json.dumps(SGX_COLLATERAL).encode(), expected=REPORT_DATA[:32]) == claims
    by_signer = D.SgxPolicy(mr_signers={MR_SIGNER}, isv_prod_ids={3}, min_isv_svn=7, root_ca_der=INTEL.root_ca_der)
    assert verify_sgx(quote, policy=by_signer).body.isv_svn == 7


@pytest.mark.parametrize(("version", "body_type"), TDX_FORMATS)
def test_signed_tdx_quote_verifies_with_its_claims(version: int, body_type: int | None) -> None:
    claims = verify_tdx(tdx_quote(version, body_type))
    assert claims.tcb_status == "UpToDate" and claims.advisory_ids == ()
    assert claims.mr_td == MR_TD and claims.body.rtmrs == RTMRS and claims.report_data == REPORT_DATA
    assert claims.body.td_attributes == TD_ATTRIBUTES and not claims.body.debug
    assert claims.body.quote_version == version and claims.ppid == INTEL.ppid
    assert claims.body.body_type == (body_type or 2)
    if body_type == 3:
        assert claims.body.mr_service_td == bytes(48) and claims.body.tee_tcb_svn2 is not None
    else:
        assert claims.body.mr_service_td is None


def test_each_platform_verifies_under_its_own_root_only() -> None:
    quote = OTHER.sgx_quote(REPORT_DATA, mr_enclave=MR_ENCLAVE)
    policy = dataclasses.replace(SGX_POLICY, root_ca_der=OTHER.root_ca_der)
    assert verify_sgx(quote, OTHER.collateral("sgx"), policy=policy).ppid == OTHER.ppid
    with pytest.raises(AttestationError, match="SGX quote refused: PCK certificate chain to the Intel root"):
        verify_sgx(quote, OTHER.collateral("sgx"))


# -- TCB status --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", ["SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
                                    "OutOfDate", "OutOfDateConfigurationNeeded"])
def test_out_of_date_platform_is_refused_unless_the_policy_accepts_its_status(status: str) -> None:
    advisories = ("INTEL-SA-00615", "INTEL-SA-00828")
    sgx_col = INTEL.collateral("sgx", tcb_status=status, advisory_ids=advisories)
    tdx_col = INTEL.collateral("tdx", tcb_status=status, advisory_ids=advisories)
    with pytest.raises(AttestationError, match=f"SGX TCB status check failed: the platform is {status} "
                                               r"\(advisories: INTEL-SA-00615, INTEL-SA-00828\)"):
        verify_sgx(sgx_quote(), sgx_col)
    with pytest.raises(AttestationError, match=f"TDX TCB status check failed: the platform is {status}"):
        verify_tdx(tdx_quote(), tdx_col)
    claims = verify_sgx(sgx_quote(), sgx_col, policy=dataclasses.replace(SGX_POLICY, allow_tcb_statuses={status}))
    assert claims.tcb_status == status and claims.advisory_ids == advisories
    tclaims = verify_tdx(tdx_quote(5, 3), tdx_col, policy=dataclasses.replace(TDX_POLICY, allow_tcb_statuses={status}))
    assert tclaims.tcb_status == status and tclaims.advisory_ids == advisories
    # accepting another status does not accept this one
    other = "OutOfDate" if status != "OutOfDate" else "SWHardeningNeeded"
    with pytest.raises(AttestationError, match="TCB status check failed"):
        verify_sgx(sgx_quote(), sgx_col, policy=dataclasses.replace(SGX_POLICY, allow_tcb_statuses={other}))


def test_rejected_advisory_is_refused_even_when_its_status_is_accepted() -> None:
    col = INTEL.collateral("sgx", tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00615",))
    policy = dataclasses.replace(SGX_POLICY, allow_tcb_statuses={"SWHardeningNeeded"},
                                 reject_advisories={"INTEL-SA-00615"})
    with pytest.raises(AttestationError, match="SGX advisory check failed: the platform is affected by INTEL-SA-00615"):
        verify_sgx(sgx_quote(), col, policy=policy)


def test_revoked_tcb_is_never_accepted() -> None:
    with pytest.raises(ValueError, match="never-acceptable"):
        D.SgxPolicy(allow_tcb_statuses={"Revoked"})
    lax = dataclasses.replace(SGX_POLICY, allow_tcb_statuses=D.TCB_STATUSES)
    with pytest.raises(AttestationError, match=r"SGX quote refused: TCB status \(Revoked is never accepted\)"):
        verify_sgx(sgx_quote(), INTEL.collateral("sgx", tcb_status="Revoked"), policy=lax)
    with pytest.raises(AttestationError, match=r"TDX quote refused: TCB status \(Revoked is never accepted\)"):
        verify_tdx(tdx_quote(), INTEL.collateral("tdx", tcb_status="Revoked"),
                   policy=dataclasses.replace(TDX_POLICY, allow_tcb_statuses=D.TCB_STATUSES))


def test_tcb_info_edited_to_up_to_date_is_refused() -> None:
    # The attack: a platform behind on microcode rewrites its TCB info to claim UpToDate.
    col = INTEL.collateral("sgx", tcb_status="OutOfDate", advisory_ids=("INTEL-SA-00828",))
    forged = dict(col, tcb_info=col["tcb_info"].replace('"OutOfDate"', '"UpToDate"'))
    assert forged["tcb_info"] != col["tcb_info"]
    with pytest.raises(AttestationError, match="SGX quote refused: TCB info signature failed"):
        verify_sgx(sgx_quote(), forged)


def test_qe_identity_edited_is_refused() -> None:
    forged = dict(SGX_COLLATERAL, qe_identity=SGX_COLLATERAL["qe_identity"].replace('"isvsvn":8', '"isvsvn":7'))
    with pytest.raises(AttestationError, match="SGX quote refused: QE identity signature failed"):
        verify_sgx(sgx_quote(), forged)


def test_revoked_pck_certificate_is_refused() -> None:
    with pytest.raises(AttestationError, match=r"SGX quote refused: certificate revocation \(CRL\) failed"):
        verify_sgx(sgx_quote(), INTEL.collateral("sgx", revoke_pck=True))
    with pytest.raises(AttestationError, match=r"TDX quote refused: certificate revocation \(CRL\) failed"):
        verify_tdx(tdx_quote(), INTEL.collateral("tdx", revoke_pck=True))


# -- debug, identity, binding ----------------------------------------------------------------------------------------
def test_debug_enclave_is_refused() -> None:
    quote = sgx_quote(debug=True)
    assert D.parse_sgx_quote(quote).debug
    for policy in (SGX_POLICY, dataclasses.replace(SGX_POLICY, allow_debug=True)):  # dcap-qvl refuses it either way
        with pytest.raises(AttestationError, match="SGX quote refused: debug check"):
            verify_sgx(quote, policy=policy)


@pytest.mark.parametrize(("version", "body_type"), TDX_FORMATS)
def test_debug_td_is_refused(version: int, body_type: int | None) -> None:
    quote = tdx_quote(version, body_type, debug=True)
    assert D.parse_tdx_quote(quote).debug
    for policy in (TDX_POLICY, dataclasses.replace(TDX_POLICY, allow_debug=True, td_attributes=None)):
        with pytest.raises(AttestationError, match="TDX quote refused: debug check"):
            verify_tdx(quote, policy=policy)


def test_unlisted_enclave_is_refused() -> None:
    with pytest.raises(AttestationError, match="SGX MRENCLAVE check failed"):
        verify_sgx(sgx_quote(mr_enclave=b"\x12" * 32))
    by_signer = D.SgxPolicy(mr_signers={MR_SIGNER}, isv_prod_ids={0}, min_isv_svn=2, root_ca_der=INTEL.root_ca_der)
    for kw, check in [({"mr_signer": b"\x23" * 32, "isv_svn": 2}, "MRSIGNER"), ({"isv_prod_id": 1, "isv_svn": 2},
                                                                              "ISVPRODID"),
                      ({"isv_svn": 1}, "ISVSVN")]:
        with pytest.raises(AttestationError, match=f"SGX {check} check failed"):
            verify_sgx(sgx_quote(**kw), policy=by_signer)


@pytest.mark.parametrize(("version", "body_type"), TDX_FORMATS)
def test_unlisted_td_is_refused(version: int, body_type: int | None) -> None:
    with pytest.raises(AttestationError, match="TDX MRTD check failed"):
        verify_tdx(tdx_quote(version, body_type, mr_td=b"\x34" * 48))
    for i in range(4):
        rtmrs = list(RTMRS)
        rtmrs[i] = b"\x77" * 48  # e.g. another kernel or command line in RTMR1/2
        with pytest.raises(AttestationError, match=f"TDX RTMR{i} check failed"):
            verify_tdx(tdx_quote(version, body_type, rtmrs=tuple(rtmrs)))
    perfmon = bytes.fromhex("0000001000000080")  # SEPT_VE_DISABLE | PERFMON: allowed by dcap-qvl, not pinned
    with pytest.raises(AttestationError, match="TDX TD_ATTRIBUTES check failed"):
        verify_tdx(tdx_quote(version, body_type, td_attributes=perfmon))


def test_replayed_sgx_quote_for_another_challenge_is_refused() -> None:
    quote = sgx_quote()  # made for REPORT_DATA
    for expected in (bytes(64), REPORT_DATA[:63] + b"\xff", bytes(32)):
        with pytest.raises(AttestationError, match="SGX report_data check failed"):
            verify_sgx(quote, expected=expected)


@pytest.mark.parametrize(("version", "body_type"), TDX_FORMATS)
def test_replayed_tdx_quote_for_another_challenge_is_refused(version: int, body_type: int | None) -> None:
    quote = tdx_quote(version, body_type)
    for expected in (bytes(64), REPORT_DATA[:63] + b"\xff", bytes(32)):
        with pytest.raises(AttestationError, match="TDX report_data check failed"):
            verify_tdx(quote, expected=expected)


# -- time -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("now", [ts(ISSUE_DATE) - 1, ts(dt.datetime(2024, 6, 1, tzinfo=dt.UTC)),
                                 ts(NEXT_UPDATE) + 1, ts(dt.datetime(2045, 1, 1, tzinfo=dt.UTC))])
def test_time_outside_the_collateral_is_refused(now: int) -> None:
    with pytest.raises(AttestationError, match="SGX quote refused: collateral validity at the verification time"):
        verify_sgx(sgx_quote(), now=now)
    with pytest.raises(AttestationError, match="TDX quote refused: collateral validity at the verification time"):
        verify_tdx(tdx_quote(5, 3), now=now)


def test_stale_collateral_is_refused() -> None:
    # a month's collateral, as the PCS issues it, presented after it expired
    june = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
    col = INTEL.collateral("sgx", issue_date=june, next_update=june + dt.timedelta(days=30))
    assert verify_sgx(sgx_quote(), col, now=ts(june + dt.timedelta(days=10))).tcb_status == "UpToDate"
    with pytest.raises(AttestationError, match="collateral validity at the verification time"):
        verify_sgx(sgx_quote(), col, now=ts(june + dt.timedelta(days=31)))


# -- tampering ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("offset", "check"), [
    (30, "quote signature"),  # header: user data (QE ID)
    (48 + 64, "quote signature"),  # body: MRENCLAVE
    (48 + 320, "quote signature"),  # body: report_data
    (SGX_SIG + 5, "quote signature"),
    (SGX_ATT_KEY + 5, r"QE report \(binding of the attestation key\)"),
    (SGX_QE_REPORT + 40, r"QE report signature \(PCK certificate\)"),
    (SGX_QE_REPORT + 320, r"QE report signature \(PCK certificate\)"),  # the QE's report_data
    (SGX_QE_SIG + 5, r"QE report signature \(PCK certificate\)"),
    (SGX_QE_AUTH + 3, r"QE report \(binding of the attestation key\)"),
])
def test_flipped_byte_in_sgx_quote_is_refused(offset: int, check: str) -> None:
    quote = sgx_quote()
    with pytest.raises(AttestationError, match=f"SGX quote refused: {check}"):
        verify_sgx(flip(quote, offset))


@pytest.mark.parametrize(("version", "body_type"), TDX_FORMATS)
@pytest.mark.parametrize(("where", "delta", "check"), [
    ("header", 30, "quote signature"),
    ("body", 136, "quote signature"),  # MRTD
    ("body", 520 + 3, "quote signature"),  # report_data
    ("sig", 5, "quote signature"),
    ("att_key", 5, r"QE report \(binding of the attestation key\)"),
    ("qe_report", 40, r"QE report signature \(PCK certificate\)"),
    ("qe_sig", 5, r"QE report signature \(PCK certificate\)"),
])
def test_flipped_byte_in_tdx_quote_is_refused(version: int, body_type: int | None, where: str, delta: int,
                                              check: str) -> None:
    quote = tdx_quote(version, body_type)
    offsets = tdx_offsets(quote)
    body_start = 48 + (6 if version == 5 else 0)
    base = {"header": 0, "body": body_start}.get(where, offsets.get(where, 0))
    with pytest.raises(AttestationError, match=f"TDX quote refused: {check}"):
        verify_tdx(flip(quote, base + delta))


SGX_SIGNED = sgx_quote()
TDX_SIGNED = {fmt: tdx_quote(*fmt) for fmt in TDX_FORMATS}


@settings(max_examples=300)
@given(st.data())
def test_any_flipped_bit_in_a_signed_region_is_refused(data: st.DataObject) -> None:
    """Any bit from the header to the end of the QE authentication data (signed, or a length that frames them)."""
    kind = data.draw(st.sampled_from(["sgx", *TDX_FORMATS]))
    bit = data.draw(st.integers(0, 7))
    if kind == "sgx":
        i = data.draw(st.integers(0, SGX_QE_AUTH + 31))
        with pytest.raises(AttestationError, match="SGX"):
            verify_sgx(flip(SGX_SIGNED, i, bit))
    else:
        quote = TDX_SIGNED[kind]
        i = data.draw(st.integers(0, tdx_offsets(quote)["qe_sig"] + 64 + 2 + 31))
        with pytest.raises(AttestationError, match="TDX"):
            verify_tdx(flip(quote, i, bit))


def test_flipped_byte_in_collateral_signature_or_crl_is_refused() -> None:
    for field, index in [("tcb_info_signature", 10), ("qe_identity_signature", 10), ("root_ca_crl", 300),
                         ("pck_crl", 300)]:
        raw = bytes.fromhex(SGX_COLLATERAL[field])
        forged = dict(SGX_COLLATERAL, **{field: flip(raw, min(index, len(raw) - 8)).hex()})
        with pytest.raises(AttestationError, match="SGX"):
            verify_sgx(sgx_quote(), forged)


# -- the wrong trust anchor or the wrong platform's collateral -------------------------------------------------------
def test_real_intel_root_refuses_a_fake_chain() -> None:
    with pytest.raises(AttestationError, match="SGX quote refused: PCK certificate chain to the Intel root"):
        verify_sgx(sgx_quote(), policy=dataclasses.replace(SGX_POLICY, root_ca_der=D.INTEL_SGX_ROOT_CA_DER))
    with pytest.raises(AttestationError, match="TDX quote refused: PCK certificate chain to the Intel root"):
        verify_tdx(tdx_quote(), policy=dataclasses.replace(TDX_POLICY, root_ca_der=D.INTEL_SGX_ROOT_CA_DER))
    # the default policy pins Intel's root
    with pytest.raises(AttestationError, match="SGX quote refused: PCK certificate chain to the Intel root"):
        verify_sgx(sgx_quote(), policy=D.SgxPolicy(mr_enclaves={MR_ENCLAVE}))


def test_quote_with_another_platforms_collateral_is_refused() -> None:
    for root in (INTEL.root_ca_der, OTHER.root_ca_der):
        with pytest.raises(AttestationError, match="SGX quote refused: PCK certificate chain to the Intel root"):
            verify_sgx(sgx_quote(), OTHER.collateral("sgx"), policy=dataclasses.replace(SGX_POLICY, root_ca_der=root))
        with pytest.raises(AttestationError, match="TDX quote refused: PCK certificate chain to the Intel root"):
            verify_tdx(tdx_quote(), OTHER.collateral("tdx"), policy=dataclasses.replace(TDX_POLICY, root_ca_der=root))


def test_quote_with_the_other_tees_collateral_is_refused() -> None:
    with pytest.raises(AttestationError, match="SGX quote refused: QE identity failed"):
        verify_sgx(sgx_quote(), TDX_COLLATERAL)
    with pytest.raises(AttestationError, match="TDX quote refused: QE identity failed"):
        verify_tdx(tdx_quote(), SGX_COLLATERAL)


def test_sgx_quote_is_not_a_tdx_quote() -> None:
    with pytest.raises(AttestationError, match="TDX quote format: not a TDX quote"):
        verify_tdx(sgx_quote())
    with pytest.raises(AttestationError, match="SGX quote format: not an SGX quote"):
        verify_sgx(tdx_quote())


@pytest.mark.parametrize(("version", "body_type"), TDX_FORMATS)
def test_td_without_sept_ve_disable_is_refused(version: int, body_type: int | None) -> None:
    # Without SEPT_VE_DISABLE the host can make the TD take #VE on EPT faults (a known attack surface).
    quote = tdx_quote(version, body_type, td_attributes=bytes(8))
    with pytest.raises(AttestationError, match=r"TDX quote refused: TD attributes \(dcap-qvl's TD policy\)"):
        verify_tdx(quote, policy=dataclasses.replace(TDX_POLICY, td_attributes=None))


def test_collateral_times_may_be_unix_seconds() -> None:
    start = ts(dt.datetime(2025, 6, 1, tzinfo=dt.UTC))
    col = INTEL.collateral("tdx", issue_date=start, next_update=start + 30 * 86400)
    assert json.loads(col["tcb_info"])["nextUpdate"] == "2025-07-01T00:00:00Z"
    assert verify_tdx(tdx_quote(), col, now=start + 86400).tcb_status == "UpToDate"
    with pytest.raises(AttestationError, match="collateral validity at the verification time"):
        verify_tdx(tdx_quote(), col, now=start + 31 * 86400)
    with pytest.raises(TypeError, match="timezone-aware"):
        INTEL.collateral("sgx", issue_date=dt.datetime(2025, 6, 1))
