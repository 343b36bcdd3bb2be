"""AWS Nitro Enclaves attestation documents: the recorded vectors, and test-signed documents (issue 14).

Recorded documents cannot carry our report_data, so a fake Nitro root (injected through
``root_der``) and a fake NSM sign documents that do.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, strategies as st

from mlcapsule.attestation.nitro import (
    AWS_NITRO_ROOT_DER,
    AWS_NITRO_ROOT_SHA256,
    NitroPolicy,
    parse_nitro_document,
    verify_nitro,
)
from mlcapsule.enclave.errors import AttestationError

# shared/ sits beside the checkout (as in CI); MLCAPSULE_SHARED points elsewhere.
SHARED = Path(os.environ.get("MLCAPSULE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
VEC = SHARED / "attestation-vectors" / "nitro"
ZERO = "00" * 48
DEBUG_POLICY = NitroPolicy(pcrs={0: {ZERO}, 1: {ZERO}, 2: {ZERO}}, allow_debug=True)


def _read(name: str) -> bytes:
    path = VEC / name
    if not path.exists():
        pytest.fail(f"the recorded Nitro vector is missing: {path}")
    return path.read_bytes()


def _doc(name: str) -> bytes:
    return base64.b64decode(_read(name))


# -- recorded evidence -----------------------------------------------------------------------------
def test_pinned_root_is_the_recorded_aws_root() -> None:
    pem_root = x509.load_pem_x509_certificate(_read("aws_nitro_root.pem"))
    assert pem_root.public_bytes(Encoding.DER) == AWS_NITRO_ROOT_DER
    assert hashlib.sha256(AWS_NITRO_ROOT_DER).hexdigest() == AWS_NITRO_ROOT_SHA256


def test_recorded_example_verifies() -> None:
    doc = _doc("example_attestation.b64")
    claims = verify_nitro(doc, policy=DEBUG_POLICY, expected_report_data=None)
    assert claims.module_id == "i-0bbf1bfe232b8c2ce-enc0191ba35c9d1b77a"
    assert claims.timestamp == dt.datetime(2024, 9, 9, 19, 49, 12, 400000, tzinfo=dt.UTC)
    assert claims.debug and claims.measurement == ZERO and len(claims.pcrs) == 16
    assert claims.public_key == b"dummy" and claims.user_data is not None and len(claims.user_data) == 68
    # the recorded user_data and nonce, as bindings
    bound = verify_nitro(doc, policy=DEBUG_POLICY, expected_report_data=claims.user_data[:34])
    assert bound.user_data == claims.user_data
    assert claims.nonce is not None
    nonce_policy = NitroPolicy(pcrs=DEBUG_POLICY.pcrs, allow_debug=True, bind_to="nonce")
    verify_nitro(doc, policy=nonce_policy, expected_report_data=claims.nonce)


def test_recorded_invalid_document_fails() -> None:
    with pytest.raises(AttestationError, match="signature does not verify"):
        verify_nitro(_doc("invalid_attestation.b64"), policy=DEBUG_POLICY, expected_report_data=None)


def test_debug_enclave_refused_by_default() -> None:
    policy = NitroPolicy(pcrs={0: {ZERO}, 1: {ZERO}, 2: {ZERO}})
    with pytest.raises(AttestationError, match="debug mode"):
        verify_nitro(_doc("example_attestation.b64"), policy=policy, expected_report_data=None)


def test_wrong_pcrs_refused() -> None:
    doc = _doc("example_attestation.b64")
    for index in (0, 1, 2):
        pcrs = {0: {ZERO}, 1: {ZERO}, 2: {ZERO}}
        pcrs[index] = {"ab" * 48}
        with pytest.raises(AttestationError, match=f"PCR{index} .* allow-list"):
            verify_nitro(doc, policy=NitroPolicy(pcrs=pcrs, allow_debug=True), expected_report_data=None)
    with pytest.raises(AttestationError, match="PCR8"):
        verify_nitro(doc, policy=NitroPolicy(pcrs={**DEBUG_POLICY.pcrs, 8: {"ab" * 48}}, allow_debug=True),
                     expected_report_data=None)
    with pytest.raises(AttestationError, match="PCR0, PCR1 and PCR2"):
        verify_nitro(doc, policy=NitroPolicy(pcrs={0: {ZERO}}, allow_debug=True), expected_report_data=None)


def test_recorded_wrong_binding_refused() -> None:
    with pytest.raises(AttestationError, match="user_data is not bound"):
        verify_nitro(_doc("example_attestation.b64"), policy=DEBUG_POLICY, expected_report_data=b"\x01" * 32)


def test_flipped_byte_in_signed_payload_refused() -> None:
    doc = _doc("example_attestation.b64")
    claims = verify_nitro(doc, policy=DEBUG_POLICY, expected_report_data=None)
    for needle in (claims.user_data, claims.module_id.encode(), claims.nonce):
        assert needle
        at = doc.find(needle)
        assert at > 0
        bad = bytearray(doc)
        bad[at + 3] ^= 0x01
        with pytest.raises(AttestationError, match="signature does not verify"):
            verify_nitro(bytes(bad), policy=DEBUG_POLICY, expected_report_data=None)
    bad = bytearray(doc)
    bad[-5] ^= 0x01  # the signature itself
    with pytest.raises(AttestationError, match="signature does not verify"):
        verify_nitro(bytes(bad), policy=DEBUG_POLICY, expected_report_data=None)


def test_another_root_refused() -> None:
    other = x509.load_pem_x509_certificates(
        (SHARED / "attestation-vectors" / "snp" / "ask_ark_milan.pem").read_bytes())[1]
    with pytest.raises(AttestationError, match="pinned AWS Nitro root"):
        verify_nitro(_doc("example_attestation.b64"), policy=DEBUG_POLICY, expected_report_data=None,
                     root_der=other.public_bytes(Encoding.DER))


# -- test-signed documents carrying our report_data -------------------------------------------------
T0 = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)
PCRS = {i: bytes([i + 1]) * 48 for i in range(16)}
GOOD = NitroPolicy(pcrs={i: {PCRS[i].hex()} for i in (0, 1, 2, 8)})


def _sign_raw(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA384())))
    return r.to_bytes(48, "big") + s.to_bytes(48, "big")


class FakeNitro:
    """A fake AWS root → zonal CA → enclave leaf (valid 3 hours from T0), and an NSM that signs with it."""

    def __init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP384R1())
        ca_key = ec.generate_private_key(ec.SECP384R1())
        self.leaf_key = ec.generate_private_key(ec.SECP384R1())

        def cert(cn: str, issuer: str, pub: Any, signer: ec.EllipticCurvePrivateKey, ca: bool,
                 start: dt.datetime, end: dt.datetime) -> bytes:
            name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])
            iss = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, issuer)])
            b = (x509.CertificateBuilder().subject_name(name).issuer_name(iss).public_key(pub)
                 .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                 .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
            return b.sign(signer, hashes.SHA384()).public_bytes(Encoding.DER)

        far = dt.datetime(2049, 1, 1, tzinfo=dt.UTC)
        self.root_der = cert("fake.nitro-enclaves", "fake.nitro-enclaves", self.root_key.public_key(),
                             self.root_key, True, dt.datetime(2020, 1, 1, tzinfo=dt.UTC), far)
        self.ca_der = cert("zonal.fake", "fake.nitro-enclaves", ca_key.public_key(), self.root_key, True,
                           T0 - dt.timedelta(days=1), T0 + dt.timedelta(days=5))
        self.leaf_der = cert("i-0fake-enc0fake", "zonal.fake", self.leaf_key.public_key(), ca_key, False,
                             T0, T0 + dt.timedelta(hours=3))

    def document(self, *, user_data: bytes | None = None, nonce: bytes | None = None,
                 pcrs: dict[int, bytes] = PCRS, at: dt.datetime = T0 + dt.timedelta(minutes=1),
                 tag: bool = True) -> bytes:
        payload = cbor2.dumps({
            "module_id": "i-0fake-enc0fake", "digest": "SHA384", "timestamp": int(at.timestamp() * 1000),
            "pcrs": pcrs, "certificate": self.leaf_der, "cabundle": [self.root_der, self.ca_der],
            "public_key": None, "user_data": user_data, "nonce": nonce})
        protected = cbor2.dumps({1: -35})
        sig = _sign_raw(self.leaf_key, cbor2.dumps(["Signature1", protected, b"", payload]))
        body = [protected, {}, payload, sig]
        return cbor2.dumps(cbor2.CBORTag(18, body) if tag else body)


@pytest.fixture(scope="module")
def nsm() -> FakeNitro:
    return FakeNitro()


BINDING = hashlib.sha256(b"nonce || hpke key || receipt key").digest()


@pytest.mark.parametrize("tag", [True, False])
def test_fake_document_bound_to_our_report_data_verifies(nsm: FakeNitro, tag: bool) -> None:
    claims = verify_nitro(nsm.document(user_data=BINDING, tag=tag), policy=GOOD, expected_report_data=BINDING,
                          root_der=nsm.root_der)
    assert claims.user_data == BINDING and not claims.debug and claims.measurement == PCRS[0].hex()
    by_nonce = NitroPolicy(pcrs=GOOD.pcrs, bind_to="nonce")
    verify_nitro(nsm.document(nonce=BINDING + b"extra"), policy=by_nonce, expected_report_data=BINDING,
                 root_der=nsm.root_der)


def test_fake_document_with_another_binding_refused(nsm: FakeNitro) -> None:
    other = hashlib.sha256(b"a replayed setup").digest()
    with pytest.raises(AttestationError, match="user_data is not bound"):
        verify_nitro(nsm.document(user_data=other), policy=GOOD, expected_report_data=BINDING, root_der=nsm.root_der)
    with pytest.raises(AttestationError, match="user_data is not bound"):
        verify_nitro(nsm.document(nonce=BINDING), policy=GOOD, expected_report_data=BINDING, root_der=nsm.root_der)


def test_fake_document_outside_certificate_validity_refused(nsm: FakeNitro) -> None:
    for at in (T0 - dt.timedelta(minutes=1), T0 + dt.timedelta(hours=3, minutes=1)):
        with pytest.raises(AttestationError, match="enclave certificate is not valid at the document's timestamp"):
            verify_nitro(nsm.document(user_data=BINDING, at=at), policy=GOOD, expected_report_data=BINDING,
                         root_der=nsm.root_der)
    with pytest.raises(AttestationError, match=r"cabundle\[1\] is not valid"):
        verify_nitro(nsm.document(user_data=BINDING, at=T0 + dt.timedelta(days=6)), policy=GOOD,
                     expected_report_data=BINDING, root_der=nsm.root_der)


def test_fake_debug_and_wrong_pcr_refused(nsm: FakeNitro) -> None:
    debug = {**PCRS, 0: bytes(48), 1: bytes(48), 2: bytes(48)}
    with pytest.raises(AttestationError, match="debug mode"):
        verify_nitro(nsm.document(user_data=BINDING, pcrs=debug), policy=GOOD, expected_report_data=BINDING,
                     root_der=nsm.root_der)
    with pytest.raises(AttestationError, match="PCR8"):
        verify_nitro(nsm.document(user_data=BINDING, pcrs={**PCRS, 8: b"\x99" * 48}), policy=GOOD,
                     expected_report_data=BINDING, root_der=nsm.root_der)


def test_fake_document_not_under_the_aws_root(nsm: FakeNitro) -> None:
    with pytest.raises(AttestationError, match="pinned AWS Nitro root"):
        verify_nitro(nsm.document(user_data=BINDING), policy=GOOD, expected_report_data=BINDING)


def test_fake_leaf_signed_by_another_key_refused(nsm: FakeNitro) -> None:
    doc = cbor2.loads(nsm.document(user_data=BINDING, tag=False))
    doc[3] = _sign_raw(nsm.root_key, cbor2.dumps(["Signature1", doc[0], b"", doc[2]]))  # not the leaf's key
    with pytest.raises(AttestationError, match="signature does not verify"):
        verify_nitro(cbor2.dumps(doc), policy=GOOD, expected_report_data=BINDING, root_der=nsm.root_der)


# -- the parser and the verifier raise only AttestationError ---------------------------------------
@given(st.binary(max_size=512))
def test_parser_on_arbitrary_bytes(data: bytes) -> None:
    for doc in (data, b"\x84" + data, b"\xd2\x84" + data):  # also as the start of a (tagged) 4-array
        try:
            parse_nitro_document(doc)
        except AttestationError:
            pass


@given(st.integers(min_value=0, max_value=4553), st.integers(min_value=1, max_value=255))
def test_verifier_on_mutated_recorded_document(offset: int, xor: int) -> None:
    doc = bytearray(_doc("example_attestation.b64"))
    doc[offset % len(doc)] ^= xor
    with pytest.raises(AttestationError):
        verify_nitro(bytes(doc), policy=DEBUG_POLICY, expected_report_data=None)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.binary(max_size=64) | st.text(max_size=16),
                    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=12), kids, max_size=9),
                    max_leaves=30))
def test_verifier_on_arbitrary_cbor(obj: Any) -> None:
    for doc in (obj, [cbor2.dumps({1: -35}), {}, cbor2.dumps(obj), b"\0" * 96]):
        try:
            verify_nitro(cbor2.dumps(doc), policy=DEBUG_POLICY, expected_report_data=None)
        except AttestationError:
            pass
