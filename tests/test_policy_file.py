"""The provider's evidence policy file (`serve --policy`): parsed strictly, never loosened by a typo."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mlcapsule.attestation import AttestationPolicy, EvidenceVerifier
from mlcapsule.attestation.dcap import INTEL_SGX_ROOT_CA_DER
from mlcapsule.attestation.policy_file import parse_policy
from mlcapsule.attestation.snp import PINNED_ARKS, SnpTcb
from mlcapsule.enclave.errors import AttestationError, UsageError
from mlcapsule.enclave.measurement import measurement

M = "ab" * 32
CAP = "6f1c0d2e-0000-4000-8000-000000000042"


def parse(text: str, base: AttestationPolicy | None = None):  # type: ignore[no-untyped-def]
    return parse_policy(tomllib.loads(text), base=base or AttestationPolicy(measurements={M}))


def test_every_section_maps_to_its_policy() -> None:
    f = parse(f'''
        accept = ["sgx", "tdx", "snp", "nitro"]
        measurements = ["local"]
        [sgx]
        mr_signer = ["{"11" * 32}"]
        isv_prod_id = [3]
        min_isv_svn = 2
        allow_tcb_status = ["SWHardeningNeeded"]
        [tdx]
        mr_td = ["{"22" * 48}"]
        rtmr2 = ["{"33" * 48}"]
        td_attributes = "0000001000000000"
        [snp]
        measurement = ["{"44" * 48}"]
        min_tcb = {{bootloader = 1, tee = 2, snp = 3, microcode = 4}}
        [nitro]
        pcr0 = ["{"55" * 48}"]
        pcr1 = ["{"66" * 48}"]
        pcr2 = ["{"77" * 48}"]
    ''')
    p = f.policy
    assert p.measurements == {M, measurement().hex()}  # added to the server's list, `local` resolved
    assert p.sgx.mr_signers == {bytes.fromhex("11" * 32)} and p.sgx.isv_prod_ids == {3} and p.sgx.min_isv_svn == 2
    assert p.sgx.allow_tcb_statuses == {"SWHardeningNeeded"} and p.sgx.root_ca_der == INTEL_SGX_ROOT_CA_DER
    assert not p.sgx.allow_debug and not p.tdx.allow_debug and not p.snp.allow_debug and not p.nitro.allow_debug
    assert p.tdx.mr_tds == {bytes.fromhex("22" * 48)} and p.tdx.rtmr2 == {bytes.fromhex("33" * 48)}
    assert p.tdx.td_attributes == bytes.fromhex("0000001000000000") and not p.tdx.allow_tcb_statuses
    assert p.snp.min_tcb == SnpTcb(1, 2, 3, 4) and p.snp.max_vmpl == 0 and p.snp_roots == PINNED_ARKS
    assert p.nitro.pcrs[0] == {"55" * 48} and 8 not in p.nitro.pcrs
    assert p.accepted() == {"sgx", "tdx", "snp", "nitro"}


def test_without_accept_only_configured_types_are_accepted() -> None:
    f = parse(f'[tdx]\nmr_td = ["{"22" * 48}"]\n')
    v = EvidenceVerifier(f.policy)
    assert v.types() == ("tdx",)
    with pytest.raises(AttestationError, match="does not accept SGX evidence"):
        v.verify({"type": "sgx", "version": 1, "quote": "AA==", "collateral": None}, expected_report_data=bytes(32))


@pytest.mark.parametrize("text, needle", [
    ('[tdx]\nmr_td = ["abcd"]\n', "96 hex"),
    ('[sgx]\nmr_enclave = ["zz"]\n', "64 hex"),
    ('accept = ["sgxx"]\n', "unknown evidence type"),
    ('[tdx]\nallow_debug = "yes"\n', "true or false"),
    ('[tdx]\nmr_tds = []\n', "unknown key"),
    ('[capsule.notauuid]\naccept = []\n', "not a capsule ID"),
    ('measurements = ["123"]\n', "64 hex"),
    ('[snp]\nmin_tcb = {bootloader = 1}\n', "min_tcb"),
    ('[sgx]\nroot_ca = "missing.der"\n', "cannot read"),
    ('[dcap]\ncollateral_dir = "nowhere"\n', "collateral"),
])
def test_malformed_policy_is_refused_with_the_key_named(text: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse(text)


def test_capsule_section_replaces_only_what_it_names(tmp_path: Path) -> None:
    f = parse(f'''
        [tdx]
        mr_td = ["{"22" * 48}"]
        [sgx]
        mr_enclave = ["{"11" * 32}"]
        [capsule."{CAP}"]
        accept = ["tdx"]
        [capsule."{CAP}".tdx]
        mr_td = ["{"99" * 48}"]
    ''')
    v = EvidenceVerifier(f.policy, capsules=f.capsules)
    assert v.types() == ("sgx", "tdx") and v.types(CAP) == ("tdx",)
    assert v.policy_for(CAP.upper()).tdx.mr_tds == {bytes.fromhex("99" * 48)}
    assert v.policy_for(CAP).sgx is f.policy.sgx  # inherited, though not accepted for this capsule
    assert v.policy_for("00000000-0000-4000-8000-000000000000") is f.policy
    with pytest.raises(AttestationError, match="not accepted by this server for this capsule"):
        v.verify({"type": "sgx", "version": 1, "quote": "AA==", "collateral": None}, expected_report_data=bytes(32),
                 capsule_id=CAP)


def test_show_prints_the_identities_to_copy_into_the_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from dcap_signer import FakeIntel

    from mlcapsule.attestation.show import main

    mr_td = bytes(range(48))
    quote = FakeIntel(seed=0).tdx_quote(bytes(64), mr_td=mr_td)
    (tmp_path / "quote.bin").write_bytes(quote)
    assert main([str(tmp_path / "quote.bin")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["type"] == "tdx" and shown["mr_td"] == mr_td.hex()
    # the same through an evidence object, and the value round-trips into a policy that accepts it
    import base64

    (tmp_path / "ev.json").write_text(json.dumps({"type": "tdx", "version": 1, "collateral": None,
                                                  "quote": base64.b64encode(quote).decode()}))
    assert main([str(tmp_path / "ev.json")]) == 0
    assert json.loads(capsys.readouterr().out)["mr_td"] == mr_td.hex()
    assert parse(f'[tdx]\nmr_td = ["{shown["mr_td"]}"]\n').policy.tdx.mr_tds == {mr_td}
    (tmp_path / "junk").write_bytes(b"\x00junk")
    assert main([str(tmp_path / "junk")]) == 1
    assert "not an SGX or TDX quote" in capsys.readouterr().err
