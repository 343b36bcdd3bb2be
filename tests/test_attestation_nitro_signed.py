"""AWS Nitro Enclaves documents signed by a fake NSM (tests/nitro_signer.py), through the real verifier.

Recorded documents (tests/test_attestation_nitro.py) cannot carry our nonce; these can. Every check
of :func:`verify_nitro` is exercised with a document that differs from an accepted one in one
respect, and each refusal is matched on the message naming the check.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import cbor2
import pytest

from mlcapsule.attestation.nitro import AWS_NITRO_ROOT_DER, NitroClaims, NitroPolicy, verify_nitro
from mlcapsule.enclave.errors import AttestationError
from nitro_signer import FakeNitro

T = dt.datetime(2026, 6, 1, 12, 0, 0, 250_000, tzinfo=dt.UTC)
PCRS = {i: hashlib.sha384(f"PCR{i} of the mlcapsule enclave image".encode()).digest() for i in (0, 1, 2, 3, 4, 8)}
POLICY = NitroPolicy(pcrs={i: frozenset({PCRS[i].hex()}) for i in (0, 1, 2)})
BINDING = hashlib.sha512(b"nonce || enclave HPKE key || receipt key").digest()  # 64 bytes
ZERO = bytes(48)


def _verify(nsm: FakeNitro, document: bytes, *, policy: NitroPolicy = POLICY, expected: bytes | None = BINDING,
            root_der: bytes | None = None) -> NitroClaims:
    return verify_nitro(document, policy=policy, expected_report_data=expected,
                        root_der=nsm.root_der if root_der is None else root_der)


def _doc(nsm: FakeNitro, **kw: Any) -> bytes:
    args: dict[str, Any] = {"pcrs": PCRS, "user_data": BINDING, "timestamp": T, **kw}
    return nsm.document(**args)


@pytest.fixture(scope="module")
def nsm() -> FakeNitro:
    return FakeNitro()


# -- accepted evidence -----------------------------------------------------------------------------
@pytest.mark.parametrize("tag", [False, True])
def test_signed_document_verifies_with_its_claims(nsm: FakeNitro, tag: bool) -> None:
    hpke = b"\x04" + bytes(range(64))
    claims = _verify(nsm, _doc(nsm, nonce=b"n" * 32, public_key=hpke, tag=tag))
    assert claims.measurement == PCRS[0].hex() and not claims.debug
    assert {i: claims.pcrs[i] for i in PCRS} == {i: v.hex() for i, v in PCRS.items()}
    assert all(claims.pcrs[i] == ZERO.hex() for i in range(16) if i not in PCRS)  # an NSM reports PCR0-15
    assert claims.user_data == BINDING and claims.nonce == b"n" * 32 and claims.public_key == hpke
    assert claims.timestamp == T.replace(microsecond=250_000) and claims.module_id == nsm.module_id
    assert cbor2.loads(_doc(nsm))[0] == cbor2.dumps({1: -35})


def test_binding_by_nonce(nsm: FakeNitro) -> None:
    by_nonce = NitroPolicy(pcrs=POLICY.pcrs, bind_to="nonce")
    nonce = hashlib.sha256(b"a fresh nonce").digest()
    assert _verify(nsm, _doc(nsm, user_data=None, nonce=nonce), policy=by_nonce, expected=nonce).nonce == nonce
    with pytest.raises(AttestationError, match="nonce is not bound to this setup"):
        _verify(nsm, _doc(nsm, user_data=nonce, nonce=None), policy=by_nonce, expected=nonce)


def test_signed_document_verifies_at_the_current_time() -> None:
    nsm = FakeNitro(3)
    claims = _verify(nsm, nsm.document(pcrs=PCRS, user_data=BINDING, nonce=None))  # timestamp: now
    assert abs(claims.timestamp - dt.datetime.now(dt.UTC)) < dt.timedelta(hours=1)


def test_signed_documents_are_reproducible_across_processes() -> None:
    code = ("import sys, datetime as dt; sys.path.insert(0, sys.argv[1]); from nitro_signer import FakeNitro; "
            "n = FakeNitro(2); t = dt.datetime(2026, 6, 1, tzinfo=dt.UTC); "
            "sys.stdout.write(n.root_der.hex() + n.document(pcrs={0: b'a' * 48}, user_data=b'u', nonce=None, "
            "timestamp=t).hex())")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    here = FakeNitro(2)
    t = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    assert out == here.root_der.hex() + here.document(pcrs={0: b"a" * 48}, user_data=b"u", nonce=None,
                                                      timestamp=t).hex()
    assert FakeNitro(0).root_der != here.root_der


# -- the provider's policy -------------------------------------------------------------------------
def test_debug_enclave_refused(nsm: FakeNitro) -> None:
    doc = _doc(nsm, pcrs={**PCRS, 0: ZERO, 1: ZERO, 2: ZERO})
    with pytest.raises(AttestationError, match=r"debug mode \(PCR0-2 are zero\)"):
        _verify(nsm, doc)
    debug_ok = NitroPolicy(pcrs={i: frozenset({ZERO.hex()}) for i in (0, 1, 2)}, allow_debug=True)
    assert _verify(nsm, doc, policy=debug_ok).debug
    # one register zero is not debug mode: it is a wrong measurement
    with pytest.raises(AttestationError, match="PCR0 0000000000000000... is not on the server's allow-list"):
        _verify(nsm, _doc(nsm, pcrs={**PCRS, 0: ZERO}))


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4, 8])
def test_wrong_pcr_refused(nsm: FakeNitro, index: int) -> None:
    policy = NitroPolicy(pcrs={i: frozenset({v.hex()}) for i, v in PCRS.items()})
    assert _verify(nsm, _doc(nsm), policy=policy).measurement == PCRS[0].hex()
    other = hashlib.sha384(b"a patched image").digest()
    with pytest.raises(AttestationError, match=f"PCR{index} {other.hex()[:16]}... is not on the server's allow-list"):
        _verify(nsm, _doc(nsm, pcrs={**PCRS, index: other}), policy=policy)


def test_replayed_document_for_another_binding_refused(nsm: FakeNitro) -> None:
    with pytest.raises(AttestationError, match="user_data is not bound to this setup"):
        _verify(nsm, _doc(nsm, user_data=hashlib.sha512(b"last week's nonce").digest()))
    with pytest.raises(AttestationError, match="user_data is not bound to this setup"):  # one bit
        _verify(nsm, _doc(nsm, user_data=BINDING[:-1] + bytes([BINDING[-1] ^ 1])))
    with pytest.raises(AttestationError, match="user_data is not bound to this setup"):  # none at all
        _verify(nsm, _doc(nsm, user_data=None, nonce=BINDING))


# -- tampering with the signed document ------------------------------------------------------------
def _flip(doc: bytes, value: bytes, index: int = 0) -> bytes:
    at = doc.index(value) + index
    return doc[:at] + bytes([doc[at] ^ 0x01]) + doc[at + 1:]


@pytest.mark.parametrize("field", ["user_data", "pcr0", "pcr8", "timestamp", "module_id", "public_key"])
def test_flipped_byte_in_payload_refused(nsm: FakeNitro, field: str) -> None:
    doc = _doc(nsm, public_key=b"K" * 97)
    value = {"user_data": BINDING, "pcr0": PCRS[0], "pcr8": PCRS[8], "module_id": nsm.module_id.encode(),
             "public_key": b"K" * 97, "timestamp": int(T.timestamp() * 1000).to_bytes(8, "big")}[field]
    policy = NitroPolicy(pcrs={i: frozenset({PCRS[i].hex(), bytes([PCRS[i][0] ^ 1]).hex() + PCRS[i][1:].hex()})
                               for i in (0, 1, 2, 8)})
    with pytest.raises(AttestationError, match="the Nitro attestation document signature does not verify"):
        _verify(nsm, _flip(doc, value, 7 if field == "timestamp" else 0), policy=policy, expected=None)


def test_flipped_bytes_anywhere_refused(nsm: FakeNitro) -> None:
    """Every 7th byte of the document (envelope, headers, payload, certificates, signature)."""
    doc = _doc(nsm, nonce=b"n" * 20)
    _verify(nsm, doc)
    for offset in range(0, len(doc), 7):
        bad = bytearray(doc)
        bad[offset] ^= 0x01
        with pytest.raises(AttestationError):
            _verify(nsm, bytes(bad), expected=None)


@pytest.mark.parametrize("index", [0, 47, 48, 95])
def test_flipped_signature_byte_refused(nsm: FakeNitro, index: int) -> None:
    doc = _doc(nsm)
    sig = cbor2.loads(doc)[3]
    assert len(sig) == 96 and doc.endswith(sig)
    bad = doc[:len(doc) - 96 + index] + bytes([sig[index] ^ 0x01]) + doc[len(doc) - 96 + index + 1:]
    with pytest.raises(AttestationError, match="the Nitro attestation document signature does not verify"):
        _verify(nsm, bad)


def test_other_algorithm_header_refused(nsm: FakeNitro) -> None:
    p = nsm.payload(pcrs=PCRS, user_data=BINDING, timestamp=T)
    doc = nsm.sign(p, nsm.leaf_key(T), protected=cbor2.dumps({1: -7}))  # ES256
    with pytest.raises(AttestationError, match=r"protected header is not \{alg: ES384\}"):
        _verify(nsm, doc)


def test_document_signed_by_another_key_than_the_leaf_refused(nsm: FakeNitro) -> None:
    p = nsm.payload(pcrs=PCRS, user_data=BINDING, timestamp=T)
    other = FakeNitro(1).leaf_key(T)
    with pytest.raises(AttestationError, match="the Nitro attestation document signature does not verify"):
        _verify(nsm, nsm.sign(p, other))


# -- swapped chains, foreign roots, validity -------------------------------------------------------
def test_chain_of_another_seed_refused(nsm: FakeNitro) -> None:
    other = FakeNitro(1)
    doc = _doc(nsm)
    with pytest.raises(AttestationError, match="the cabundle does not start with the pinned AWS Nitro root"):
        _verify(nsm, doc, root_der=other.root_der)
    # our leaf under the other hierarchy's CAs, the payload re-signed with our leaf key
    spliced = {**nsm.payload(pcrs=PCRS, user_data=BINDING, timestamp=T), "cabundle": other.cabundle}
    with pytest.raises(AttestationError, match="the enclave certificate is not signed by its issuer"):
        _verify(other, nsm.sign(spliced, nsm.leaf_key(T)))
    # the other hierarchy's intermediates under our root
    mixed = {**nsm.payload(pcrs=PCRS, user_data=BINDING, timestamp=T), "cabundle": [nsm.root_der,
                                                                                     *other.cabundle[1:]]}
    with pytest.raises(AttestationError, match=r"cabundle\[1\] is not signed by its issuer"):
        _verify(nsm, nsm.sign(mixed, nsm.leaf_key(T)))
    # a leaf of the other hierarchy carried in our payload
    foreign_leaf = {**nsm.payload(pcrs=PCRS, user_data=BINDING, timestamp=T), "certificate": other.leaf_der(T)}
    with pytest.raises(AttestationError, match="the enclave certificate is not signed by its issuer"):
        _verify(nsm, nsm.sign(foreign_leaf, other.leaf_key(T)))


def test_missing_intermediate_refused(nsm: FakeNitro) -> None:
    p = nsm.payload(pcrs=PCRS, user_data=BINDING, timestamp=T)
    cut = {**p, "cabundle": [p["cabundle"][0], p["cabundle"][1], p["cabundle"][3]]}
    with pytest.raises(AttestationError, match=r"cabundle\[2\] is not signed by its issuer"):
        _verify(nsm, nsm.sign(cut, nsm.leaf_key(T)))


def test_fake_documents_refused_under_the_real_aws_root(nsm: FakeNitro) -> None:
    with pytest.raises(AttestationError, match="the cabundle does not start with the pinned AWS Nitro root"):
        _verify(nsm, _doc(nsm), root_der=AWS_NITRO_ROOT_DER)
    # a fake hierarchy named exactly like AWS's, its bundle starting with the real root
    lookalike = FakeNitro(0, aws_names=True)
    p = lookalike.payload(pcrs=PCRS, user_data=BINDING, timestamp=T)
    doc = lookalike.sign({**p, "cabundle": [AWS_NITRO_ROOT_DER, *p["cabundle"][1:]]}, lookalike.leaf_key(T))
    with pytest.raises(AttestationError, match=r"cabundle\[1\] is not signed by its issuer"):
        _verify(lookalike, doc, root_der=AWS_NITRO_ROOT_DER)


def test_expired_certificates_refused() -> None:
    expired = FakeNitro(0, ca_validity=(dt.datetime(2024, 1, 1, tzinfo=dt.UTC), dt.datetime(2025, 1, 1, tzinfo=dt.UTC)))
    assert expired.root_der == FakeNitro(0).root_der
    with pytest.raises(AttestationError, match=r"cabundle\[1\] is not valid at the document's timestamp"):
        _verify(expired, _doc(expired))
    assert _verify(expired, _doc(expired, timestamp=dt.datetime(2024, 6, 1, tzinfo=dt.UTC))).debug is False
    nsm = FakeNitro(0)
    old_leaf = (T - dt.timedelta(days=2), T - dt.timedelta(days=1))
    with pytest.raises(AttestationError, match="the enclave certificate is not valid at the document's timestamp"):
        _verify(nsm, _doc(nsm, leaf_validity=old_leaf))


@pytest.mark.parametrize("offset", [dt.timedelta(seconds=-4), dt.timedelta(hours=3, seconds=1)])
def test_timestamp_outside_the_leaf_validity_refused(nsm: FakeNitro, offset: dt.timedelta) -> None:
    """A leaf issued at T (valid T-3 s to T+3 h) in a document claiming another time."""
    p = {**nsm.payload(pcrs=PCRS, user_data=BINDING, timestamp=T + offset),
         "certificate": nsm.leaf_der(T)}
    with pytest.raises(AttestationError, match="the enclave certificate is not valid at the document's timestamp"):
        _verify(nsm, nsm.sign(p, nsm.leaf_key(T)))
    inside = {**nsm.payload(pcrs=PCRS, user_data=BINDING, timestamp=T + offset / 2), "certificate": nsm.leaf_der(T)}
    assert _verify(nsm, nsm.sign(inside, nsm.leaf_key(T))).timestamp.date() == T.date()


def test_signer_rejects_bad_arguments(nsm: FakeNitro) -> None:
    with pytest.raises(ValueError, match="48-byte"):
        nsm.document(pcrs={0: b"short"}, user_data=None, nonce=None, timestamp=T)
    with pytest.raises(ValueError, match="timezone-aware"):
        nsm.document(pcrs=PCRS, user_data=None, nonce=None, timestamp=dt.datetime(2026, 1, 1))


def test_verification_time_outside_the_leaf_validity_refused(nsm: FakeNitro) -> None:
    """``now=``: a document older than its 3-hour leaf is refused even though it was valid when made."""
    doc = _doc(nsm)
    assert _verify(nsm, doc).timestamp == _verify_at(nsm, doc, T + dt.timedelta(hours=2)).timestamp
    for now in (T - dt.timedelta(seconds=10), T + dt.timedelta(hours=3, seconds=1)):
        with pytest.raises(AttestationError, match="the enclave certificate is not valid at the verification time"):
            _verify_at(nsm, doc, now)
    with pytest.raises(AttestationError, match="is not valid at the verification time 2020-01-01T00:00:00[+]00:00"):
        _verify_at(nsm, nsm.document(pcrs=PCRS, user_data=BINDING, nonce=None), dt.datetime(2020, 1, 1))  # naive: UTC
    assert _verify_at(nsm, nsm.document(pcrs=PCRS, user_data=BINDING, nonce=None), dt.datetime.now(dt.UTC))


def _verify_at(nsm: FakeNitro, doc: bytes, now: dt.datetime) -> NitroClaims:
    return verify_nitro(doc, policy=POLICY, expected_report_data=BINDING, root_der=nsm.root_der, now=now)


@pytest.mark.parametrize("junk", [b"\x00", b"\xa0", b"xx"])
def test_trailing_bytes_after_the_document_refused(nsm: FakeNitro, junk: bytes) -> None:
    """One document, one encoding: junk appended (or inside the signed payload's bytes) is refused."""
    with pytest.raises(AttestationError, match="COSE_Sign1 envelope has trailing bytes"):
        _verify(nsm, _doc(nsm) + junk)
    body = cbor2.dumps(nsm.payload(pcrs=PCRS, user_data=BINDING, timestamp=T)) + junk
    with pytest.raises(AttestationError, match="payload has trailing bytes"):
        _verify(nsm, nsm.sign(body, nsm.leaf_key(T)))
