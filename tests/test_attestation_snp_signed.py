"""SEV-SNP reports signed by a fake AMD hierarchy (tests/snp_signer.py), through the real verifier.

Recorded reports (tests/test_attestation_snp.py) cannot carry our report_data; these can. Every
check of :func:`verify_snp` is exercised with evidence that differs from accepted evidence in one
respect, and each refusal is matched on the message naming the check.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mlcapsule.attestation.snp import PINNED_ARKS, SIGNED_SIZE, SnpClaims, SnpPolicy, SnpTcb, verify_snp
from mlcapsule.enclave.errors import AttestationError
from snp_signer import DEFAULT_MEASUREMENT, DEFAULT_TCB, PRODUCTS, FakeAmd, parse_cert_table

SHARED = Path(os.environ.get("MLCAPSULE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
VEC = SHARED / "attestation-vectors"
NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
BINDING = hashlib.sha512(b"nonce || enclave HPKE key || receipt key").digest()  # 64 bytes
POLICY = SnpPolicy(measurements=frozenset({DEFAULT_MEASUREMENT.hex()}))


def _verify(amd: FakeAmd, report: bytes, *, policy: SnpPolicy = POLICY, expected: bytes | None = BINDING,
            now: dt.datetime | None = NOW, vcek_der: bytes | None = None, chain_pem: bytes | None = None,
            roots: Mapping[str, bytes] | None = None) -> SnpClaims:
    """verify_snp with ``amd``'s leaf, chain and roots unless one is given."""
    return verify_snp(report, amd.vcek_der if vcek_der is None else vcek_der,
                      amd.chain_pem if chain_pem is None else chain_pem, policy=policy, expected_report_data=expected,
                      roots=amd.roots if roots is None else roots, now=now)


@pytest.fixture(scope="module")
def milan() -> FakeAmd:
    return FakeAmd("Milan")


# -- accepted evidence -----------------------------------------------------------------------------
@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("signer", ["vcek", "vlek"])
@pytest.mark.parametrize("product", PRODUCTS)
def test_signed_report_verifies_with_its_claims(product: str, signer: str, version: int) -> None:
    amd = FakeAmd(product, signer=signer)
    claims = _verify(amd, amd.report(BINDING, version=version, vmpl=1, host_data=b"h" * 32, guest_svn=7))
    assert claims.product == product and claims.signer == signer and claims.version == version
    assert claims.measurement == DEFAULT_MEASUREMENT.hex() and claims.report_data == BINDING
    assert claims.reported_tcb == DEFAULT_TCB[product] == claims.launch_tcb == claims.committed_tcb
    assert claims.chip_id == (bytes(64) if signer == "vlek" else amd.chip_id).hex()
    assert not claims.debug and claims.smt and claims.vmpl == 1 and claims.guest_svn == 7
    assert claims.host_data == b"h" * 32
    assert claims.signer_key_sha256 == hashlib.sha256(amd.vcek_der).hexdigest()


def test_chip_id_masked_report_verifies_without_a_chip_id(milan: FakeAmd) -> None:
    claims = _verify(milan, milan.report(BINDING, mask_chip_id=True))
    assert claims.chip_id == bytes(64).hex() and claims.signer == "vcek"
    with pytest.raises(AttestationError, match="another chip than the report's CHIP_ID"):  # not masked: must match
        _verify(milan, milan.report(BINDING, chip_id=bytes(64)))


def test_short_report_data_is_a_prefix_binding(milan: FakeAmd) -> None:
    nonce = hashlib.sha256(b"a fresh nonce").digest()
    claims = _verify(milan, milan.report(nonce), expected=nonce)
    assert claims.report_data == nonce + bytes(32)


def test_signed_evidence_verifies_at_the_current_time(milan: FakeAmd) -> None:
    assert _verify(milan, milan.report(BINDING), now=None).product == "Milan"


def test_signed_evidence_is_reproducible_across_processes() -> None:
    """The cvm backend may sign in another process than the server's: the roots and chain must agree."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from snp_signer import FakeAmd; a = FakeAmd('Genoa', 1); "
            "sys.stdout.write(a.roots['Genoa'].hex() + a.chain_pem.hex() + a.report(bytes(64)).hex())")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    here = FakeAmd("Genoa", 1)
    assert out == here.roots["Genoa"].hex() + here.chain_pem.hex() + here.report(bytes(64)).hex()
    assert FakeAmd("Genoa", 0).roots != here.roots


@pytest.mark.parametrize("signer", ["vcek", "vlek"])
def test_certificate_table_carries_the_chain(signer: str) -> None:
    """What a fake configfs-tsm ``auxblob`` holds: ARK, ASK (ASVK) and leaf, enough to verify the report."""
    amd = FakeAmd("Turin", signer=signer)
    certs = parse_cert_table(amd.cert_table())
    assert set(certs) == {"ark", "ask", signer} and certs[signer] == amd.vcek_der
    pem = b"".join(x509.load_der_x509_certificate(certs[k]).public_bytes(Encoding.PEM) for k in ("ask", "ark"))
    assert pem == amd.chain_pem
    assert _verify(amd, amd.report(BINDING), vcek_der=certs[signer], chain_pem=pem).signer == signer


# -- the provider's policy -------------------------------------------------------------------------
def test_debug_guest_refused(milan: FakeAmd) -> None:
    report = milan.report(BINDING, debug=True)
    with pytest.raises(AttestationError, match="DEBUG bit set"):
        _verify(milan, report)
    assert _verify(milan, report, policy=SnpPolicy(measurements=POLICY.measurements, allow_debug=True)).debug


def test_wrong_measurement_refused(milan: FakeAmd) -> None:
    report = milan.report(BINDING, measurement=hashlib.sha384(b"a patched enclave").digest())
    with pytest.raises(AttestationError, match="measurement .* not on the server's allow-list"):
        _verify(milan, report)


def test_replayed_report_for_another_nonce_refused(milan: FakeAmd) -> None:
    old = milan.report(hashlib.sha512(b"last week's nonce").digest())
    with pytest.raises(AttestationError, match="report_data is not bound"):
        _verify(milan, old)
    with pytest.raises(AttestationError, match="report_data is not bound"):  # a one-bit difference
        _verify(milan, milan.report(BINDING[:-1] + bytes([BINDING[-1] ^ 1])))


@pytest.mark.parametrize("product", PRODUCTS)
def test_reported_tcb_below_minimum_refused(product: str) -> None:
    amd = FakeAmd(product)
    t = DEFAULT_TCB[product]
    report = amd.report(BINDING)
    at = SnpPolicy(measurements=POLICY.measurements, min_tcb=t)
    assert _verify(amd, report, policy=at).reported_tcb == t
    bumps = [{"bootloader": t.bootloader + 1}, {"tee": t.tee + 1}, {"snp": t.snp + 1},
             {"microcode": t.microcode + 1}]
    if product == "Turin":
        bumps.append({"fmc": (t.fmc or 0) + 1})
    for bump in bumps:
        above = SnpPolicy(measurements=POLICY.measurements, min_tcb=SnpTcb(**{**t.__dict__, **bump}))
        with pytest.raises(AttestationError, match="reported TCB .* below the policy's minimum"):
            _verify(amd, report, policy=above)


def test_report_for_another_tcb_than_the_vcek_refused(milan: FakeAmd) -> None:
    """A host cannot pair an old VCEK with a report claiming a newer TCB (or the reverse)."""
    newer = SnpTcb(**{**DEFAULT_TCB["Milan"].__dict__, "snp": 30})
    with pytest.raises(AttestationError, match="another TCB than the report's REPORTED_TCB"):
        _verify(milan, milan.report(BINDING, reported_tcb=newer))


def test_vmpl_above_maximum_refused(milan: FakeAmd) -> None:
    report = milan.report(BINDING, vmpl=2)
    assert _verify(milan, report, policy=SnpPolicy(measurements=POLICY.measurements, max_vmpl=2)).vmpl == 2
    with pytest.raises(AttestationError, match="VMPL 2; the policy accepts up to 0"):
        _verify(milan, report, policy=SnpPolicy(measurements=POLICY.measurements, max_vmpl=0))


# -- tampering with the signed report --------------------------------------------------------------
@pytest.mark.parametrize("offset", [0x04, 0x08, 0x0A, 0x10, 0x30, 0x38, 0x40, 0x50, 0x8F, 0x90, 0xBF, 0xC0, 0x140,
                                    0x1E0, 0x1F0, 0x29F])
def test_flipped_byte_in_signed_region_refused(milan: FakeAmd, offset: int) -> None:
    bad = bytearray(milan.report(BINDING))
    bad[offset] ^= 0x01
    measurements = frozenset({DEFAULT_MEASUREMENT.hex(), bytes(bad[0x90:0xC0]).hex()})
    policy = SnpPolicy(measurements=measurements, allow_debug=True, max_vmpl=3)
    with pytest.raises(AttestationError, match="report signature does not verify with the VCEK"):
        _verify(milan, bytes(bad), policy=policy, expected=None)


def _first_failing_check(offset: int) -> str:
    """What refuses a Milan v3 report with bit 0 of ``offset`` flipped: checks before the signature, or it."""
    if offset in (1, 2, 3):
        return "version .* is not supported"  # (byte 0: version 3 becomes 2, which only the signature catches)
    if 0x34 <= offset < 0x38:
        return "signature algorithm .* is not ECDSA P-384"
    if offset in (0x180, 0x181, 0x186, 0x187):  # Milan's BL, TEE, SNP, microcode bytes (the others are reserved)
        return "another TCB than the report's REPORTED_TCB"
    if offset == 0x188:  # family 0x19 -> 0x18 (a model change 0x01 -> 0x00 is still Milan)
        return "CPUID .* is not a Milan processor"
    if 0x1A0 <= offset < 0x1E0:
        return "another chip than the report's CHIP_ID"
    return "report signature does not verify with the VCEK"


def test_every_flipped_bit_in_signed_region_refused(milan: FakeAmd) -> None:
    """Exhaustive over the 0x2A0 signed bytes, under a policy that accepts anything the report could claim."""
    good = milan.report(BINDING)
    policy = SnpPolicy(measurements=POLICY.measurements, allow_debug=True, max_vmpl=2**32)
    _verify(milan, good, policy=policy, expected=None)
    for offset in range(SIGNED_SIZE):
        bad = bytearray(good)
        bad[offset] ^= 0x01
        with pytest.raises(AttestationError, match=_first_failing_check(offset)):
            _verify(milan, bytes(bad), policy=policy, expected=None)


@pytest.mark.parametrize("offset", [0x2A0, 0x2E7, 0x2E8, 0x32F])
def test_flipped_signature_byte_refused(milan: FakeAmd, offset: int) -> None:
    bad = bytearray(milan.report(BINDING))
    bad[offset] ^= 0x01
    with pytest.raises(AttestationError, match="report signature does not verify"):
        _verify(milan, bytes(bad))


def test_report_signed_as_vlek_with_a_vcek_chain_refused() -> None:
    vcek, vlek = FakeAmd("Milan"), FakeAmd("Milan", signer="vlek")
    assert vcek.roots == vlek.roots  # one ARK signs both the ASK and the ASVK
    with pytest.raises(AttestationError, match="the ASK is 'SEV-Milan', not 'SEV-VLEK-Milan'"):
        _verify(vcek, vlek.report(BINDING), vcek_der=vlek.vcek_der)
    with pytest.raises(AttestationError, match="the leaf is 'SEV-VLEK', not 'SEV-VCEK'"):
        _verify(vcek, vcek.report(BINDING), vcek_der=vlek.vcek_der)


# -- swapped chains, foreign roots, validity -------------------------------------------------------
@pytest.mark.parametrize(("leaf_product", "chain_product"), [("Genoa", "Milan"), ("Milan", "Genoa"),
                                                             ("Turin", "Milan"), ("Genoa", "Turin")])
def test_chain_of_another_product_refused(leaf_product: str, chain_product: str) -> None:
    leaf, chain = FakeAmd(leaf_product), FakeAmd(chain_product)
    both = {**leaf.roots, **chain.roots}
    report = leaf.report(BINDING)
    with pytest.raises(AttestationError, match="the VCEK is not issued by the expected AMD key"):
        _verify(leaf, report, chain_pem=chain.chain_pem, roots=both)
    with pytest.raises(AttestationError, match="the ARK is not one of the pinned AMD roots"):
        _verify(leaf, report, chain_pem=chain.chain_pem)  # only the leaf's own product is trusted


def test_chain_of_another_seed_refused() -> None:
    """Same product, same names, other keys: only the signatures tell them apart."""
    a, b = FakeAmd("Milan", 0), FakeAmd("Milan", 1)
    assert a.chain_pem != b.chain_pem and a.vcek_der != b.vcek_der
    report = a.report(BINDING)
    with pytest.raises(AttestationError, match="the ARK is not one of the pinned AMD roots"):
        _verify(a, report, chain_pem=b.chain_pem)  # a's root trusted, b's chain
    with pytest.raises(AttestationError, match="the VCEK's signature does not verify"):  # b's root trusted
        _verify(a, report, chain_pem=b.chain_pem, roots=b.roots)
    with pytest.raises(AttestationError, match="the VCEK's signature does not verify"):  # b's VCEK, a's chain
        _verify(a, report, vcek_der=b.vcek_der)
    with pytest.raises(AttestationError, match="another chip than the report's CHIP_ID"):  # b's chain and VCEK
        _verify(b, report)
    with pytest.raises(AttestationError, match="report signature does not verify"):  # b's chip ID, a's key
        _verify(b, a.report(BINDING, chip_id=b.chip_id))
    # an ASK from b's hierarchy spliced under a's ARK
    spliced = b.chain_pem[:b.chain_pem.index(b"-----END CERTIFICATE-----") + 26] + \
        a.chain_pem[a.chain_pem.index(b"-----END CERTIFICATE-----") + 26:]
    with pytest.raises(AttestationError, match="the ASK's signature does not verify"):
        _verify(a, report, chain_pem=spliced)


def test_fake_evidence_refused_under_the_real_amd_roots(milan: FakeAmd) -> None:
    report = milan.report(BINDING)
    with pytest.raises(AttestationError, match="the ARK is not one of the pinned AMD roots"):
        _verify(milan, report, roots=PINNED_ARKS)
    real_chain = VEC / "snp" / "ask_ark_milan.pem"
    if not real_chain.exists():
        pytest.fail(f"the recorded AMD chain is missing: {real_chain}")
    # AMD's real ASK has the very names of the fake one: its signature is what refuses the fake VCEK
    with pytest.raises(AttestationError, match="the VCEK's signature does not verify"):
        _verify(milan, report, chain_pem=real_chain.read_bytes(), roots=PINNED_ARKS)


def test_expired_certificates_refused() -> None:
    old = (dt.datetime(2016, 1, 1, tzinfo=dt.UTC), dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    leaf = FakeAmd("Milan", leaf_validity=old)
    with pytest.raises(AttestationError, match="the VCEK is not valid at"):
        _verify(leaf, leaf.report(BINDING), now=None)
    cas = FakeAmd("Genoa", signer="vlek", ca_validity=old, leaf_validity=old)
    assert cas.roots != FakeAmd("Genoa").roots  # another ARK certificate (same key)
    with pytest.raises(AttestationError, match="the ARK is not valid at"):
        _verify(cas, cas.report(BINDING), now=None)
    assert _verify(cas, cas.report(BINDING), now=dt.datetime(2020, 1, 1, tzinfo=dt.UTC)).signer == "vlek"


@pytest.mark.parametrize("signer", ["vcek", "vlek"])
@pytest.mark.parametrize("when", [dt.datetime(2020, 12, 31, tzinfo=dt.UTC), dt.datetime(2044, 1, 2, tzinfo=dt.UTC)])
def test_verification_time_outside_the_leaf_validity_refused(signer: str, when: dt.datetime) -> None:
    amd = FakeAmd("Turin", signer=signer)  # the CAs are valid 2020-10-22 to 2045-10-22, the leaf 2021 to 2044
    with pytest.raises(AttestationError, match=f"the {signer.upper()} is not valid at {when.date()}"):
        _verify(amd, amd.report(BINDING), now=when)


def test_signer_rejects_bad_arguments(milan: FakeAmd) -> None:
    with pytest.raises(ValueError, match="product"):
        FakeAmd("Naples")
    with pytest.raises(ValueError, match="signer"):
        FakeAmd("Milan", signer="vcek2")
    with pytest.raises(ValueError, match="at most 64"):
        milan.report(bytes(65))
    with pytest.raises(ValueError, match="48 bytes"):
        milan.report(BINDING, measurement=bytes(32))
