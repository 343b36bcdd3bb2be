"""AMD SEV-SNP reports: the recorded vectors, and test-signed reports for the negatives (issue 14).

Recorded reports cannot carry our report_data, so a fake ARK/ASK/VCEK chain (built here, the ARK
injected through ``roots``) signs reports that do.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import struct
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, strategies as st

from mlcapsule.attestation.snp import (
    PINNED_ARKS,
    REPORT_SIZE,
    SnpPolicy,
    SnpTcb,
    parse_snp_report,
    verify_snp,
)
from mlcapsule.enclave.errors import AttestationError

# shared/ sits beside the checkout (as in CI); MLCAPSULE_SHARED points elsewhere.
SHARED = Path(os.environ.get("MLCAPSULE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
VEC = SHARED / "attestation-vectors"
NOW = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)  # inside every recorded certificate's validity (the VLEK ends 2025-12)

# report, leaf certificate, chain, debug guest?
RECORDED = {
    "go-sev-guest-milan": ("snp/attestation.bin", "snp/vcek.testcer", "snp/ask_ark_milan.pem", True),
    "virtee-milan": ("snp/virtee_report_milan.bin", "snp/virtee_vcek_milan.der", "snp/ask_ark_milan.pem", False),
    "trustee-vlek": ("trustee/test-vlek-report.bin", "trustee/test-vlek.der", "snp/ask_ark_milan_vlek.pem", False),
}


def _read(rel: str) -> bytes:
    path = VEC / rel
    if not path.exists():
        pytest.fail(f"the recorded SEV-SNP vector is missing: {path}")
    return path.read_bytes()


def _recorded(name: str) -> tuple[bytes, bytes, bytes, bool]:
    rep, leaf, chain, debug = RECORDED[name]
    return _read(rep), _read(leaf), _read(chain), debug


def _policy_for(report: bytes, **kw: object) -> SnpPolicy:
    return SnpPolicy(measurements={report[0x90:0xC0].hex()}, **kw)  # type: ignore[arg-type]


# -- recorded evidence -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RECORDED))
def test_recorded_reports_verify(name: str) -> None:
    report, leaf, chain, debug = _recorded(name)
    claims = verify_snp(report, leaf, chain, policy=_policy_for(report, allow_debug=debug),
                        expected_report_data=report[0x50:0x70], now=NOW)
    assert claims.product == "Milan"
    assert claims.signer == ("vlek" if "vlek" in name else "vcek")
    assert claims.debug is debug
    assert claims.measurement == report[0x90:0xC0].hex()
    assert claims.report_data == report[0x50:0x90]
    assert claims.version == struct.unpack_from("<I", report)[0]


def test_recorded_claims_detail() -> None:
    report, leaf, chain, _ = _recorded("go-sev-guest-milan")
    claims = verify_snp(report, leaf, chain, policy=_policy_for(report, allow_debug=True),
                        expected_report_data=bytes([1, 2, 3, 4, 5]), now=NOW)
    assert claims.policy == 0xB0000 and claims.smt and not claims.migrate_ma
    assert claims.reported_tcb == SnpTcb(bootloader=2, tee=0, snp=5, microcode=0x44)
    assert claims.chip_id.startswith("3ac3fe21e13fb099")
    vlek = _recorded("trustee-vlek")
    c2 = verify_snp(vlek[0], vlek[1], vlek[2], policy=_policy_for(vlek[0]), expected_report_data=None, now=NOW)
    assert c2.version == 3 and c2.vmpl == 1 and c2.reported_tcb == SnpTcb(4, 0, 0x18, 0xD9)


def test_pinned_arks_are_the_recorded_amd_roots() -> None:
    for product, rel in (("Milan", "snp/ask_ark_milan.pem"), ("Genoa", "snp/ask_ark_genoa.pem"),
                         ("Turin", "snp/ask_ark_turin_vcek.pem")):
        ark = x509.load_pem_x509_certificates(_read(rel))[1]
        assert ark.subject == ark.issuer
        assert hashlib.sha256(ark.public_bytes(Encoding.DER)).digest() == PINNED_ARKS[product]


def test_debug_guest_refused_by_default() -> None:
    report, leaf, chain, _ = _recorded("go-sev-guest-milan")
    with pytest.raises(AttestationError, match="DEBUG"):
        verify_snp(report, leaf, chain, policy=_policy_for(report), expected_report_data=None, now=NOW)


def test_wrong_measurement_refused() -> None:
    report, leaf, chain, _ = _recorded("virtee-milan")
    with pytest.raises(AttestationError, match="measurement .* allow-list"):
        verify_snp(report, leaf, chain, policy=SnpPolicy(measurements={"ab" * 48}), expected_report_data=None,
                   now=NOW)
    with pytest.raises(AttestationError, match="allow-list"):
        verify_snp(report, leaf, chain, policy=SnpPolicy(), expected_report_data=None, now=NOW)


def test_wrong_recorded_report_data_refused() -> None:
    report, leaf, chain, _ = _recorded("virtee-milan")
    with pytest.raises(AttestationError, match="report_data"):
        verify_snp(report, leaf, chain, policy=_policy_for(report), expected_report_data=b"\0" * 32, now=NOW)


@pytest.mark.parametrize("offset", [0x08, 0x10, 0x50, 0x6F, 0x90, 0xBF, 0xC0, 0x140, 0x1F0, 0x29F])
def test_flipped_byte_in_signed_region_refused(offset: int) -> None:
    report, leaf, chain, _ = _recorded("virtee-milan")
    bad = bytearray(report)
    bad[offset] ^= 0x01
    policy = SnpPolicy(measurements={report[0x90:0xC0].hex(), bytes(bad[0x90:0xC0]).hex()})
    with pytest.raises(AttestationError, match="signature does not verify"):
        verify_snp(bytes(bad), leaf, chain, policy=policy, expected_report_data=None, now=NOW)


def test_flipped_signature_refused() -> None:
    report, leaf, chain, _ = _recorded("virtee-milan")
    bad = bytearray(report)
    bad[0x2A0] ^= 0x01
    with pytest.raises(AttestationError, match="signature does not verify"):
        verify_snp(bytes(bad), leaf, chain, policy=_policy_for(report), expected_report_data=None, now=NOW)


@pytest.mark.parametrize("other", ["snp/ask_ark_genoa.pem", "snp/ask_ark_turin_vcek.pem", "snp/ask_ark_milan_vlek.pem",
                                   "snp/ask_ark_genoa_vlek.pem"])
def test_chain_of_another_generation_or_key_kind_refused(other: str) -> None:
    report, leaf, _, _ = _recorded("virtee-milan")
    with pytest.raises(AttestationError, match="certificate chain"):
        verify_snp(report, leaf, _read(other), policy=_policy_for(report), expected_report_data=None, now=NOW)


def test_vlek_report_with_vcek_chain_refused() -> None:
    report, leaf, _, _ = _recorded("trustee-vlek")
    with pytest.raises(AttestationError, match="certificate chain"):
        verify_snp(report, leaf, _read("snp/ask_ark_milan.pem"), policy=_policy_for(report),
                   expected_report_data=None, now=NOW)


def test_vcek_of_another_chip_or_tcb_refused() -> None:
    report, _, chain, _ = _recorded("go-sev-guest-milan")
    with pytest.raises(AttestationError, match="another TCB"):
        verify_snp(report, _read("snp/virtee_vcek_milan.der"), chain, policy=_policy_for(report, allow_debug=True),
                   expected_report_data=None, now=NOW)


def test_certificate_outside_validity_refused() -> None:
    report, leaf, chain, _ = _recorded("trustee-vlek")  # the VLEK is valid 2024-12-10 to 2025-12-10
    for when in (dt.datetime(2024, 1, 1, tzinfo=dt.UTC), dt.datetime(2026, 1, 1, tzinfo=dt.UTC)):
        with pytest.raises(AttestationError, match="VLEK is not valid at"):
            verify_snp(report, leaf, chain, policy=_policy_for(report), expected_report_data=None, now=when)


def test_minimum_tcb() -> None:
    report, leaf, chain, _ = _recorded("virtee-milan")  # reported TCB: BL 3, TEE 0, SNP 8, microcode 115
    ok = _policy_for(report, min_tcb=SnpTcb(bootloader=3, tee=0, snp=8, microcode=115))
    assert verify_snp(report, leaf, chain, policy=ok, expected_report_data=None, now=NOW).reported_tcb.snp == 8
    low = _policy_for(report, min_tcb=SnpTcb(bootloader=3, tee=0, snp=9, microcode=0))
    with pytest.raises(AttestationError, match="below the policy's minimum"):
        verify_snp(report, leaf, chain, policy=low, expected_report_data=None, now=NOW)


def test_vmpl_limit() -> None:
    report, leaf, chain, _ = _recorded("trustee-vlek")  # VMPL 1
    with pytest.raises(AttestationError, match="VMPL 1"):
        verify_snp(report, leaf, chain, policy=_policy_for(report, max_vmpl=0), expected_report_data=None, now=NOW)


def test_bad_policy_measurement_rejected() -> None:
    with pytest.raises(AttestationError, match="96 hex digits"):
        SnpPolicy(measurements={"ab" * 32})


# -- test-signed reports carrying our report_data --------------------------------------------------
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])


def _int_ext(v: int) -> bytes:
    body = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


class FakeAmd:
    """A fake Milan ARK → ASK → VCEK, and a signer of v3 reports with it."""

    CHIP = bytes(range(64))
    TCB = SnpTcb(bootloader=7, tee=1, snp=20, microcode=200)

    def __init__(self) -> None:
        t0, t1 = dt.datetime(2020, 1, 1, tzinfo=dt.UTC), dt.datetime(2040, 1, 1, tzinfo=dt.UTC)
        ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.vcek_key = ec.generate_private_key(ec.SECP384R1())

        def cert(subject: str, issuer: str, pub: object, signer: rsa.RSAPrivateKey,
                 exts: list[tuple[str, bytes]] = ()) -> x509.Certificate:  # type: ignore[assignment]
            b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
                 .public_key(pub).serial_number(x509.random_serial_number())  # type: ignore[arg-type]
                 .not_valid_before(t0).not_valid_after(t1))
            for oid, value in exts:
                b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
            return b.sign(signer, hashes.SHA384(), rsa_padding=PSS)

        self.ark = cert("ARK-Milan", "ARK-Milan", ark_key.public_key(), ark_key)
        self.ask = cert("SEV-Milan", "ARK-Milan", ask_key.public_key(), ark_key)
        tcb = self.TCB
        self.vcek = cert("SEV-VCEK", "SEV-Milan", self.vcek_key.public_key(), ask_key, [
            ("1.3.6.1.4.1.3704.1.3.1", _int_ext(tcb.bootloader)), ("1.3.6.1.4.1.3704.1.3.2", _int_ext(tcb.tee)),
            ("1.3.6.1.4.1.3704.1.3.3", _int_ext(tcb.snp)), ("1.3.6.1.4.1.3704.1.3.8", _int_ext(tcb.microcode)),
            ("1.3.6.1.4.1.3704.1.4", self.CHIP)])
        self.vcek_der = self.vcek.public_bytes(Encoding.DER)
        self.chain_pem = self.ask.public_bytes(Encoding.PEM) + self.ark.public_bytes(Encoding.PEM)
        self.roots = {"Milan": hashlib.sha256(self.ark.public_bytes(Encoding.DER)).digest()}

    def report(self, report_data: bytes, *, measurement: bytes = b"\x42" * 48, policy: int = 0x30000) -> bytes:
        r = bytearray(REPORT_SIZE)
        t = self.TCB
        tcb = bytes([t.bootloader, t.tee, 0, 0, 0, 0, t.snp, t.microcode])
        struct.pack_into("<IIQ", r, 0, 3, 1, policy)
        struct.pack_into("<II", r, 0x30, 0, 1)  # VMPL 0, ECDSA P-384 / SHA-384
        r[0x38:0x40] = tcb
        r[0x50:0x50 + len(report_data)] = report_data
        r[0x90:0xC0] = measurement
        r[0x180:0x188] = tcb
        r[0x188:0x18B] = bytes([0x19, 0x01, 0x01])  # Milan
        r[0x1A0:0x1E0] = self.CHIP
        r[0x1E0:0x1E8] = tcb
        r[0x1F0:0x1F8] = tcb
        der = self.vcek_key.sign(bytes(r[:0x2A0]), ec.ECDSA(hashes.SHA384()))
        rr, ss = decode_dss_signature(der)
        r[0x2A0:0x2E8] = rr.to_bytes(72, "little")
        r[0x2E8:0x330] = ss.to_bytes(72, "little")
        return bytes(r)


@pytest.fixture(scope="module")
def amd() -> FakeAmd:
    return FakeAmd()


BINDING = hashlib.sha256(b"nonce || hpke key || receipt key").digest()
FAKE_POLICY = SnpPolicy(measurements={"42" * 48})


def test_fake_report_bound_to_our_report_data_verifies(amd: FakeAmd) -> None:
    claims = verify_snp(amd.report(BINDING), amd.vcek_der, amd.chain_pem, policy=FAKE_POLICY,
                        expected_report_data=BINDING, roots=amd.roots, now=NOW)
    assert claims.report_data[:32] == BINDING and claims.product == "Milan" and claims.signer == "vcek"
    assert claims.version == 3 and not claims.debug and claims.reported_tcb == FakeAmd.TCB


def test_fake_report_with_another_binding_refused(amd: FakeAmd) -> None:
    other = hashlib.sha256(b"a replayed setup").digest()
    with pytest.raises(AttestationError, match="report_data is not bound"):
        verify_snp(amd.report(other), amd.vcek_der, amd.chain_pem, policy=FAKE_POLICY,
                   expected_report_data=BINDING, roots=amd.roots, now=NOW)


def test_fake_debug_and_measurement_refused(amd: FakeAmd) -> None:
    with pytest.raises(AttestationError, match="DEBUG"):
        verify_snp(amd.report(BINDING, policy=0xB0000), amd.vcek_der, amd.chain_pem, policy=FAKE_POLICY,
                   expected_report_data=BINDING, roots=amd.roots, now=NOW)
    with pytest.raises(AttestationError, match="allow-list"):
        verify_snp(amd.report(BINDING, measurement=b"\x43" * 48), amd.vcek_der, amd.chain_pem,
                   policy=FAKE_POLICY, expected_report_data=BINDING, roots=amd.roots, now=NOW)


def test_fake_chain_is_not_an_amd_root(amd: FakeAmd) -> None:
    with pytest.raises(AttestationError, match="pinned AMD roots"):
        verify_snp(amd.report(BINDING), amd.vcek_der, amd.chain_pem, policy=FAKE_POLICY,
                   expected_report_data=BINDING, now=NOW)


def test_fake_report_with_a_real_chain_refused(amd: FakeAmd) -> None:
    with pytest.raises(AttestationError, match="certificate chain"):
        verify_snp(amd.report(BINDING), amd.vcek_der, _read("snp/ask_ark_milan.pem"), policy=FAKE_POLICY,
                   expected_report_data=BINDING, now=NOW)


# -- the parser and the verifier raise only AttestationError ---------------------------------------
@given(st.binary(max_size=2 * REPORT_SIZE))
def test_parser_on_arbitrary_bytes(data: bytes) -> None:
    try:
        parse_snp_report(data)
    except AttestationError:
        pass


@given(st.binary(min_size=REPORT_SIZE, max_size=REPORT_SIZE), st.binary(max_size=64), st.binary(max_size=64))
def test_verifier_on_arbitrary_bytes(report: bytes, leaf: bytes, chain: bytes) -> None:
    real_leaf, real_chain = _read("snp/vcek.testcer"), _read("snp/ask_ark_milan.pem")
    for lf, ch in ((real_leaf, real_chain), (leaf, real_chain), (real_leaf, chain)):
        try:
            verify_snp(report, lf, ch, policy=SnpPolicy(allow_debug=True), expected_report_data=None, now=NOW)
        except AttestationError:
            pass


@given(st.integers(min_value=0, max_value=REPORT_SIZE - 1), st.integers(min_value=1, max_value=255))
def test_verifier_on_mutated_recorded_report(offset: int, xor: int) -> None:
    report, leaf, chain, _ = _recorded("go-sev-guest-milan")
    bad = bytearray(report)
    bad[offset] ^= xor
    try:
        verify_snp(bytes(bad), leaf, chain, policy=_policy_for(report, allow_debug=True), expected_report_data=None,
                   now=NOW)
    except AttestationError:
        return
    assert offset >= 0x330  # only the reserved bytes after the signature are unsigned
