"""The pure evidence verifier, attack by attack, on evidence from the real SoftwareBackend."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

import mlcapsule.attestation as attestation
from mlcapsule.enclave._util import b64d, b64e, canonical_json
from mlcapsule.attestation import AttestationPolicy, VerifiedEvidence, verify_evidence
from mlcapsule.enclave.backends.software import SoftwareBackend
from mlcapsule.enclave.errors import AttestationError
from mlcapsule.enclave.messages.setup import report_data

from _server_support import raw


@pytest.fixture
def backend(tmp_path: Any) -> SoftwareBackend:
    return SoftwareBackend(platform_dir=tmp_path / "platform")


@pytest.fixture
def keys() -> tuple[bytes, bytes, bytes]:
    return os.urandom(32), raw(X25519PrivateKey.generate().public_key()), raw(Ed25519PrivateKey.generate().public_key())


@pytest.fixture
def rd(keys: tuple[bytes, bytes, bytes]) -> bytes:
    return report_data(*keys)


@pytest.fixture
def policy(backend: SoftwareBackend) -> AttestationPolicy:
    return AttestationPolicy(allow_software=True, measurements=frozenset([backend.measurement().hex()]))


def resign(evidence: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """What an attacker with their own platform key can do: edit the body and sign it again."""
    body = {k: v for k, v in evidence.items() if k != "signature"}
    body["platform_key"] = b64e(raw(key.public_key()))
    sig = key.sign(b"mlcapsule-evidence/software/v1\0" + canonical_json(body))
    return {**body, "signature": b64e(sig)}


def test_good_evidence_accepted(backend: SoftwareBackend, rd: bytes, policy: AttestationPolicy) -> None:
    v = verify_evidence(backend.evidence(rd), expected_report_data=rd, policy=policy)
    assert v == VerifiedEvidence("software", backend.measurement().hex(),
                                 hashlib.sha256(backend.platform_public_key()).hexdigest())


def test_software_evidence_refused_when_not_allowed(backend: SoftwareBackend, rd: bytes) -> None:
    strict = AttestationPolicy(allow_software=False, measurements=frozenset([backend.measurement().hex()]))
    with pytest.raises(AttestationError) as e:
        verify_evidence(backend.evidence(rd), expected_report_data=rd, policy=strict)
    assert "--UNSAFE-allow-software-evidence" in e.value.message


def test_default_policy_refuses_everything(backend: SoftwareBackend, rd: bytes) -> None:
    with pytest.raises(AttestationError):
        verify_evidence(backend.evidence(rd), expected_report_data=rd, policy=AttestationPolicy())


def test_evidence_with_wrong_measurement_refused(backend: SoftwareBackend, rd: bytes) -> None:
    other = AttestationPolicy(allow_software=True, measurements=frozenset(["ab" * 32]))
    with pytest.raises(AttestationError, match="not on the server's allow-list"):
        verify_evidence(backend.evidence(rd), expected_report_data=rd, policy=other)


def test_empty_measurement_allow_list_refuses_all(backend: SoftwareBackend, rd: bytes) -> None:
    with pytest.raises(AttestationError, match="no enclave measurements"):
        verify_evidence(backend.evidence(rd), expected_report_data=rd,
                        policy=AttestationPolicy(allow_software=True))


def test_measurement_edited_to_an_allowed_one_refused(backend: SoftwareBackend, rd: bytes) -> None:
    """A modified enclave claims an allowed measurement: the platform signature no longer verifies."""
    allowed = "cd" * 32
    ev = {**backend.evidence(rd), "measurement": allowed}
    with pytest.raises(AttestationError, match="signature"):
        verify_evidence(ev, expected_report_data=rd,
                        policy=AttestationPolicy(allow_software=True, measurements=frozenset([allowed])))


def test_evidence_not_binding_the_keys_refused(backend: SoftwareBackend, keys: tuple[bytes, bytes, bytes],
                                               policy: AttestationPolicy) -> None:
    """Evidence made for other HPKE/receipt keys (a man in the middle swapping keys) or another nonce."""
    nonce, hpke_pub, receipt_pub = keys
    expected = report_data(nonce, hpke_pub, receipt_pub)
    mitm_hpke = raw(X25519PrivateKey.generate().public_key())
    mitm_receipt = raw(Ed25519PrivateKey.generate().public_key())
    for other in (report_data(nonce, mitm_hpke, receipt_pub), report_data(nonce, hpke_pub, mitm_receipt),
                  report_data(os.urandom(32), hpke_pub, receipt_pub)):
        with pytest.raises(AttestationError, match="report_data"):
            verify_evidence(backend.evidence(other), expected_report_data=expected, policy=policy)


def test_report_data_edited_after_signing_refused(backend: SoftwareBackend, rd: bytes,
                                                  policy: AttestationPolicy) -> None:
    """Replaying old evidence with the new challenge's report_data pasted in."""
    old = backend.evidence(report_data(os.urandom(32), os.urandom(32), os.urandom(32)))
    with pytest.raises(AttestationError, match="signature"):
        verify_evidence({**old, "report_data": b64e(rd)}, expected_report_data=rd, policy=policy)


@pytest.mark.parametrize("index", [0, 1, 31, 32, 63])
def test_evidence_with_flipped_signature_byte_refused(backend: SoftwareBackend, rd: bytes,
                                                      policy: AttestationPolicy, index: int) -> None:
    ev = backend.evidence(rd)
    sig = bytearray(b64d(ev["signature"]))
    sig[index] ^= 1
    with pytest.raises(AttestationError, match="signature"):
        verify_evidence({**ev, "signature": b64e(bytes(sig))}, expected_report_data=rd, policy=policy)


def test_evidence_with_swapped_platform_key_refused(backend: SoftwareBackend, rd: bytes,
                                                    policy: AttestationPolicy) -> None:
    ev = {**backend.evidence(rd), "platform_key": b64e(raw(Ed25519PrivateKey.generate().public_key()))}
    with pytest.raises(AttestationError, match="signature"):
        verify_evidence(ev, expected_report_data=rd, policy=policy)


def test_forged_software_evidence_passes_which_is_why_it_is_off_by_default(
        backend: SoftwareBackend, rd: bytes, policy: AttestationPolicy) -> None:
    """Software evidence proves nothing against the machine's owner: anyone can make a platform
    key and sign any allowed measurement. This is why the server refuses it unless told loudly."""
    forged = resign(backend.evidence(rd), Ed25519PrivateKey.generate())
    assert verify_evidence(forged, expected_report_data=rd, policy=policy).type == "software"
    with pytest.raises(AttestationError):
        verify_evidence(forged, expected_report_data=rd,
                        policy=AttestationPolicy(measurements=policy.measurements))


@pytest.mark.parametrize("kind", ["tpm", "sgx", "Software", "", "software\0"])
def test_evidence_of_wrong_or_unknown_type_refused(backend: SoftwareBackend, rd: bytes,
                                                   policy: AttestationPolicy, kind: str) -> None:
    with pytest.raises(AttestationError):
        verify_evidence({**backend.evidence(rd), "type": kind}, expected_report_data=rd, policy=policy)


@pytest.mark.parametrize("version", [0, 2, True, "1", 1.0, None])
def test_evidence_of_unknown_version_refused(backend: SoftwareBackend, rd: bytes, policy: AttestationPolicy,
                                             version: Any) -> None:
    key = Ed25519PrivateKey.generate()  # re-signed, so only the version check can refuse it
    ev = resign({**backend.evidence(rd), "version": version}, key)
    with pytest.raises(AttestationError):
        verify_evidence(ev, expected_report_data=rd, policy=policy)


def _mutations(ev: dict[str, Any]) -> list[Any]:
    drop = [{k: v for k, v in ev.items() if k != name} for name in ev]
    return [
        None, [], "evidence", 42, {}, *drop, {**ev, "extra": 1}, {**ev, 7: "x"},
        {**ev, "signature": "not base64!"}, {**ev, "signature": b64e(b"short")},
        {**ev, "signature": 12345}, {**ev, "platform_key": b64e(b"\0" * 31)},
        {**ev, "platform_key": "A" * 10_000}, {**ev, "report_data": b64e(b"\0" * 33)},
        {**ev, "measurement": ev["measurement"].upper()}, {**ev, "measurement": "zz" * 32},
        {**ev, "measurement": None}, {**ev, "measurement": ev["measurement"] + " "},
        {**ev, "type": None}, {**ev, "type": ["software"]}, {**ev, "type": "x" * 1000},
    ]


def test_malformed_evidence_refused(backend: SoftwareBackend, rd: bytes, policy: AttestationPolicy) -> None:
    for bad in _mutations(backend.evidence(rd)):
        with pytest.raises(AttestationError):
            verify_evidence(bad, expected_report_data=rd, policy=policy)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                  max_size=6), max_leaves=20)
_FIELDS = st.sampled_from(["type", "version", "measurement", "report_data", "platform_key", "signature"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(_json, st.dictionaries(_FIELDS, _json, max_size=6),
                 st.dictionaries(_FIELDS, st.text(max_size=90), max_size=6).map(lambda d: {**d, "type": "software"})))
def test_arbitrary_input_raises_only_attestation_error(evidence: Any) -> None:
    policy = AttestationPolicy(allow_software=True, measurements=frozenset(["ab" * 32]))
    with pytest.raises(AttestationError):
        verify_evidence(evidence, expected_report_data=b"\0" * 32, policy=policy)


def test_policy_normalizes_and_checks_measurements() -> None:
    p = AttestationPolicy(measurements=frozenset(["AB" * 32]))
    assert p.measurements == frozenset(["ab" * 32])
    for bad in ("ab", "zz" * 32, "ab" * 33):
        with pytest.raises(AttestationError):
            AttestationPolicy(measurements=frozenset([bad]))
    with pytest.raises(TypeError):
        verify_evidence({}, expected_report_data=b"\0" * 32, policy=None)  # type: ignore[arg-type]


def test_verifier_dispatches_by_type_and_rechecks_the_measurement() -> None:
    """A verifier for a new evidence type plugs into one EvidenceVerifier (no global registry); a
    verifier that forgets the allow-list is caught."""
    allowed, other = "ab" * 32, "cd" * 32

    def careless(evidence: Any, *, expected_report_data: bytes, policy: AttestationPolicy,
                 now: Any = None) -> VerifiedEvidence:
        return VerifiedEvidence("test", evidence["m"], "p")

    policy = AttestationPolicy(measurements=frozenset([allowed]))
    v = attestation.EvidenceVerifier(policy, verifiers={**attestation.DEFAULT_VERIFIERS, "test": careless})
    assert v.verify({"type": "test", "m": allowed}, expected_report_data=b"\0" * 32).measurement == allowed
    with pytest.raises(AttestationError, match="allow-list"):
        v.verify({"type": "test", "m": other}, expected_report_data=b"\0" * 32)
    # the plug-in is this verifier's only: the defaults and other verifiers do not know "test"
    with pytest.raises(AttestationError, match="not supported"):
        verify_evidence({"type": "test", "m": allowed}, expected_report_data=b"\0" * 32, policy=policy)
    assert "test" not in attestation.DEFAULT_VERIFIERS and not hasattr(attestation, "register_verifier")
