"""The server's verifier for `tpm` evidence, and the credential activation that binds the AK.

Evidence is made by the real tpm backend on a private swtpm whose EK certificates come from a
CA made for the test session (tests/swtpm.py); the real GCP vTPM recording checks the parser
and the signature code against a TPM that is not swtpm.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from swtpm import other_swtpm, require_swtpm, swtpm, tpm_ca, tpm_factory, tpm_policy  # noqa: F401  (fixtures)

from mlcapsule.enclave._util import b64d, b64e
from mlcapsule.attestation import AttestationPolicy, EvidenceVerifier, verify_evidence
from mlcapsule.attestation import tpm as T
from mlcapsule.enclave.errors import AttestationError, IntegrityError
from mlcapsule.enclave.messages.setup import report_data

pytestmark = pytest.mark.tpm

# shared/ sits beside the checkout (as in CI); MLCAPSULE_SHARED points elsewhere.
SHARED = Path(os.environ.get("MLCAPSULE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
GCP = SHARED / "attestation-vectors" / "tpm" / "windows_gcp_shielded_vm.json"


def _gcp() -> dict[str, Any]:
    if not GCP.exists():
        pytest.fail(f"the recorded GCP vTPM quote is missing: {GCP}")
    return json.loads(GCP.read_text())


def _gcp_parts() -> tuple[T.TpmPublic, bytes, bytes, dict[str, dict[int, bytes]]]:
    d = _gcp()
    ak = T.parse_public(base64.b64decode(d["AK"]["Public"]))
    quote = base64.b64decode(d["Quote"]["Quote"])
    sig = base64.b64decode(d["Quote"]["Signature"])
    assert all(p["DigestAlg"] == 3 for p in d["Log"]["PCRs"])  # Go's crypto.SHA1
    pcrs = {"sha1": {p["Index"]: base64.b64decode(p["Digest"]) for p in d["Log"]["PCRs"]}}
    return ak, quote, sig, pcrs


# -- the real GCP vTPM recording ----------------------------------------------------------------------
def test_gcp_vtpm_quote_parses_and_verifies() -> None:
    ak, quote, sig, pcrs = _gcp_parts()
    assert ak.type == T.ALG_RSA and ak.key_bits == 2048 and ak.scheme == (T.ALG_RSASSA, T.ALG_SHA1)
    T.check_ak(ak)
    attest = T.verify_quote(ak, quote, sig, pcr_values=pcrs)
    assert attest.type == T.TPM_ST_ATTEST_QUOTE and attest.extra_data == b""  # the recording's nonce is empty
    assert [s.bank for s in attest.pcr_select] == ["sha1"] and attest.pcr_select[0].pcrs == tuple(range(24))
    assert T.parse_signature(sig).alg == T.ALG_RSASSA and T.parse_signature(sig).hash_alg == T.ALG_SHA1
    # The AK's creation attestation names the same key, and is signed by it.
    d = _gcp()
    creation = T.parse_attest(base64.b64decode(d["AK"]["CreateAttestation"]))
    assert creation.type == T.TPM_ST_ATTEST_CREATION and creation.object_name == ak.name
    T.verify_signature(ak, creation.raw, T.parse_signature(base64.b64decode(d["AK"]["CreateSignature"])))


@pytest.mark.parametrize("where", ["magic", "extra_data_len", "clock", "pcr_digest", "last", "signature", "pcr_value"])
def test_gcp_vtpm_quote_with_a_flipped_byte_fails(where: str) -> None:
    ak, quote, sig, pcrs = _gcp_parts()
    q, s = bytearray(quote), bytearray(sig)
    attest = T.parse_attest(quote)
    if where == "magic":
        q[0] ^= 1
    elif where == "extra_data_len":
        q[6 + 2 + len(attest.qualified_signer) + 1] ^= 1
    elif where == "clock":
        q[6 + 2 + len(attest.qualified_signer) + 2 + 3] ^= 1
    elif where == "pcr_digest":
        q[-5] ^= 1
    elif where == "last":
        q[-1] ^= 0x80
    elif where == "signature":
        s[len(s) // 2] ^= 1
    else:
        pcrs["sha1"][7] = bytes([pcrs["sha1"][7][0] ^ 1]) + pcrs["sha1"][7][1:]
    with pytest.raises(AttestationError):
        T.verify_quote(ak, bytes(q), bytes(s), pcr_values=pcrs)


def test_gcp_vtpm_quote_for_another_key_fails() -> None:
    ak, quote, sig, pcrs = _gcp_parts()
    raw = bytearray(ak.raw)
    raw[-1] ^= 1  # the last byte of the RSA modulus
    with pytest.raises(AttestationError, match="does not verify"):
        T.verify_quote(T.parse_public(bytes(raw)), quote, sig, pcr_values=pcrs)


# -- evidence from swtpm --------------------------------------------------------------------------------
def _evidence(backend: Any) -> tuple[dict[str, Any], bytes, bytes]:
    nonce = os.urandom(32)
    rd = report_data(nonce, os.urandom(32), os.urandom(32))
    return backend.evidence(rd), rd, nonce


def _policy(ev: dict[str, Any]) -> AttestationPolicy:
    return AttestationPolicy(measurements={ev["measurement"]})


def test_extra_data_and_wrap_contexts_agree_between_enclave_and_verifier() -> None:
    require_swtpm()
    from mlcapsule.enclave.backends import tpm as B

    assert B.EXTRA_DATA_CONTEXT == T.EXTRA_DATA_CONTEXT and B.WRAP_CONTEXT == T.WRAP_CONTEXT
    rd, m = os.urandom(32), os.urandom(32).hex()
    assert B.quote_extra_data(rd, m) == T.quote_extra_data(rd, m)


@pytest.mark.parametrize("kind", [{}, {"ak": "rsa"}, {"ek": "EK-HIGH-ECC384"}], ids=["ecc-ak", "rsa-ak", "ecc-ek"])
def test_swtpm_evidence_verifies_and_its_credential_activates(swtpm, tpm_policy, kind) -> None:  # noqa: F811
    with swtpm.backend(**kind) as b:
        ev, rd, _ = _evidence(b)
        verified = T.verify_tpm(ev, expected_report_data=rd, policy=_policy(ev), tpm_policy=tpm_policy)
        assert verified.type == "tpm" and verified.measurement == ev["measurement"]
        ak = T.parse_public(b64d(ev["ak_public"]))
        assert ak.type == (T.ALG_RSA if kind.get("ak") == "rsa" else T.ALG_ECC)
        ek = T.parse_public(b64d(ev["ek_public"]))
        assert ek.type == (T.ALG_ECC if kind.get("ek") else T.ALG_RSA)
        answer = T.credential_challenge(ev, b"the HPKE payload")
        assert b.activate_payload(answer["credential"], b64d(answer["payload"])) == b"the HPKE payload"


def test_platform_id_is_stable_per_tpm_and_differs_between_tpms(swtpm, other_swtpm, tpm_policy) -> None:  # noqa: F811
    ids = []
    for t in (swtpm, swtpm, other_swtpm):
        with t.backend() as b:
            ev, rd, _ = _evidence(b)
            ids.append(T.verify_tpm(ev, expected_report_data=rd, policy=_policy(ev), tpm_policy=tpm_policy).platform_id)
    assert ids[0] == ids[1] != ids[2]


def test_verifier_dispatches_tpm_evidence(swtpm, tpm_policy) -> None:  # noqa: F811
    with swtpm.backend() as b:
        ev, rd, _ = _evidence(b)
    with pytest.raises(AttestationError, match="no TPM EK roots are configured"):
        verify_evidence(ev, expected_report_data=rd, policy=_policy(ev))
    bound = EvidenceVerifier(_policy(ev), verifiers={"tpm": T.TpmVerifier(tpm_policy)})
    assert bound.verify(ev, expected_report_data=rd).type == "tpm"
    assert EvidenceVerifier(replace(_policy(ev), tpm=tpm_policy)).verify(ev, expected_report_data=rd).type == "tpm"
    with pytest.raises(AttestationError, match="allow-list"):
        EvidenceVerifier(AttestationPolicy(measurements={"ab" * 32}, tpm=tpm_policy)).verify(
            ev, expected_report_data=rd)
    with pytest.raises(AttestationError, match="no TPM EK roots are configured"):  # nothing leaked into the defaults
        verify_evidence(ev, expected_report_data=rd, policy=_policy(ev))


def test_quote_with_a_wrong_nonce_refused(swtpm, tpm_policy) -> None:  # noqa: F811
    with swtpm.backend() as b:
        ev, rd, _ = _evidence(b)
    other = report_data(os.urandom(32), os.urandom(32), os.urandom(32))
    with pytest.raises(AttestationError, match="extraData differs"):
        T.verify_tpm(ev, expected_report_data=other, policy=_policy(ev), tpm_policy=tpm_policy)
    # The measurement is bound too: evidence claiming another enclave build does not verify.
    forged = {**ev, "measurement": "ab" * 32}
    with pytest.raises(AttestationError, match="extraData differs"):
        T.verify_tpm(forged, expected_report_data=rd, policy=_policy(forged), tpm_policy=tpm_policy)


def _flip_b64(value: str, pos: float) -> str:
    raw = bytearray(b64d(value))
    raw[int(len(raw) * pos)] ^= 0x01
    return b64e(bytes(raw))


@pytest.mark.parametrize("field,pos", [
    ("quote", 0.0), ("quote", 0.5), ("quote", 0.99), ("signature", 0.5), ("signature", 0.99),
    ("ak_public", 0.05), ("ak_public", 0.9), ("ek_public", 0.9), ("ek_certificate", 0.5), ("ek_certificate", 0.99),
    ("pcrs", 0.0)])
def test_evidence_with_a_flipped_byte_refused(swtpm, tpm_policy, field, pos) -> None:  # noqa: F811
    """Refused by the verifier; and if a change passed it (a field of the AK's public area that the
    signature does not cover), the credential for that name could not be activated by the TPM."""
    with swtpm.backend() as b:
        ev, rd, _ = _evidence(b)
        bad = json.loads(json.dumps(ev))
        if field == "pcrs":
            v = bytearray(bytes.fromhex(bad["pcrs"]["sha256"]["0"]))
            v[0] ^= 1
            bad["pcrs"]["sha256"]["0"] = v.hex()
        else:
            bad[field] = _flip_b64(bad[field], pos)
        try:
            T.verify_tpm(bad, expected_report_data=rd, policy=_policy(ev), tpm_policy=tpm_policy)
        except AttestationError:
            return
        assert field == "ak_public", "only the AK's public area has bytes the quote does not sign"
        answer = T.credential_challenge(bad, b"payload")
        with pytest.raises(IntegrityError):
            b.activate_payload(answer["credential"], b64d(answer["payload"]))


def test_malformed_tpm_evidence_refused(swtpm, tpm_policy) -> None:  # noqa: F811
    with swtpm.backend() as b:
        ev, rd, _ = _evidence(b)
    for bad in ({k: v for k, v in ev.items() if k != "pcrs"}, {**ev, "extra": 1}, {**ev, "version": 2},
                {**ev, "quote": "not base64!"}, {**ev, "pcrs": {"md5": {}}}, {**ev, "ek_chain": "x"},
                {**ev, "pcrs": {"sha256": {**ev["pcrs"]["sha256"], "9": "00" * 32}}}):
        with pytest.raises(AttestationError):
            T.verify_tpm(bad, expected_report_data=rd, policy=_policy(ev), tpm_policy=tpm_policy)


def _self_signed_ca() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a TPM maker")])
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=9))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))


def test_ek_certificate_from_an_unknown_ca_refused(swtpm, tpm_policy) -> None:  # noqa: F811
    with swtpm.backend() as b:
        ev, rd, _ = _evidence(b)
    for roots, intermediates in (((_self_signed_ca(),), ()), ((), ()),
                                 ((_self_signed_ca(),), tpm_policy.intermediates)):
        policy = T.TpmPolicy(roots=roots, intermediates=intermediates)
        with pytest.raises(AttestationError, match="(does not chain|trusts no TPM manufacturer roots)"):
            T.verify_tpm(ev, expected_report_data=rd, policy=_policy(ev), tpm_policy=policy)
    # Trusting only the issuing CA as a root is enough; a chain the client sends is used but not trusted.
    only_issuer = T.TpmPolicy(roots=tpm_policy.intermediates)
    T.verify_tpm(ev, expected_report_data=rd, policy=_policy(ev), tpm_policy=only_issuer)
    with_chain = {**ev, "ek_chain": [b64e(c.public_bytes(T.Encoding.DER)) for c in tpm_policy.intermediates]}
    T.verify_tpm(with_chain, expected_report_data=rd, policy=_policy(ev), tpm_policy=T.TpmPolicy(roots=tpm_policy.roots))
    with pytest.raises(AttestationError, match="not valid at"):
        late = T.TpmPolicy(roots=tpm_policy.roots, intermediates=tpm_policy.intermediates,
                           now=dt.datetime(2001, 1, 1, tzinfo=dt.UTC))  # before the certificates
        T.verify_tpm(ev, expected_report_data=rd, policy=_policy(ev), tpm_policy=late)


def test_ek_certificate_of_another_tpm_refused(swtpm, other_swtpm, tpm_policy) -> None:  # noqa: F811
    with swtpm.backend() as a, other_swtpm.backend() as b:
        ev, rd, _ = _evidence(a)
        ev_b, _, _ = _evidence(b)
    mixed = {**ev, "ek_certificate": ev_b["ek_certificate"]}
    with pytest.raises(AttestationError, match="does not certify this endorsement key"):
        T.verify_tpm(mixed, expected_report_data=rd, policy=_policy(ev), tpm_policy=tpm_policy)


def test_pcrs_outside_the_policy_refused(swtpm, tpm_policy) -> None:  # noqa: F811
    with swtpm.backend() as b:
        ev, rd, _ = _evidence(b)
    pcr7 = ev["pcrs"]["sha256"]["7"]
    good = T.TpmPolicy(roots=tpm_policy.roots, intermediates=tpm_policy.intermediates,
                       pcrs={"sha256": {7: [pcr7, "11" * 32], 0: ev["pcrs"]["sha256"]["0"]}})
    T.verify_tpm(ev, expected_report_data=rd, policy=_policy(ev), tpm_policy=good)
    swtpm.extend_pcr(7, b"a boot loader the provider did not approve")
    with swtpm.backend() as b:
        ev2, rd2, _ = _evidence(b)
    assert ev2["pcrs"]["sha256"]["7"] != pcr7
    with pytest.raises(AttestationError, match="PCR sha256:7 holds a value"):
        T.verify_tpm(ev2, expected_report_data=rd2, policy=_policy(ev2), tpm_policy=good)
    # A policy on a PCR the quote does not cover is refused too.
    uncovered = T.TpmPolicy(roots=tpm_policy.roots, intermediates=tpm_policy.intermediates,
                            pcrs={"sha256": {12: "00" * 32}})
    with pytest.raises(AttestationError, match="does not cover PCR sha256:12"):
        T.verify_tpm(ev, expected_report_data=rd, policy=_policy(ev), tpm_policy=uncovered)
    # Lying about PCR values does not help: they must hash to the signed digest.
    lie = json.loads(json.dumps(ev2))
    lie["pcrs"]["sha256"]["7"] = pcr7
    with pytest.raises(AttestationError, match="do not match the quote's PCR digest"):
        T.verify_tpm(lie, expected_report_data=rd2, policy=_policy(ev2), tpm_policy=good)


def test_sha1_quotes_refused_unless_allowed() -> None:
    with pytest.raises(ValueError):
        T.TpmPolicy(pcrs={"sha1": {0: "00"}})  # wrong digest length
    assert T.TpmPolicy().allow_sha1 is False


def test_ak_not_activated_against_the_ek_refused(swtpm, other_swtpm, tpm_policy) -> None:  # noqa: F811
    """A quote from TPM A presented with the (genuine, certified) EK of TPM B passes every check on
    the evidence, but the credential the server makes for B's EK cannot be activated on A: A never
    gets the payload. Nor can a credential made for another key's name be activated."""
    with other_swtpm.backend() as b:
        ev_b, _, _ = _evidence(b)
    with swtpm.backend() as a:
        ev, rd, _ = _evidence(a)
        mixed = {**ev, "ek_public": ev_b["ek_public"], "ek_certificate": ev_b["ek_certificate"]}
        T.verify_tpm(mixed, expected_report_data=rd, policy=_policy(ev), tpm_policy=tpm_policy)  # all checks pass
        answer = T.credential_challenge(mixed, b"payload")
        with pytest.raises(IntegrityError, match="not bound to this TPM's endorsement key"):
            a.activate_payload(answer["credential"], b64d(answer["payload"]))
        # A credential for another object's name (an AK the server never saw) is refused by the TPM.
        earlier, _, _ = _evidence(a)
        ev2, _, _ = _evidence(a)  # the enclave now holds this evidence's AK
        other_name = {**ev2, "ak_public": earlier["ak_public"]}
        answer = T.credential_challenge(other_name, b"payload")
        with pytest.raises(IntegrityError):
            a.activate_payload(answer["credential"], b64d(answer["payload"]))
        # And a payload wrapped for another credential does not open with this one.
        ev3, _, _ = _evidence(a)
        ok, wrong = T.credential_challenge(ev3, b"payload"), T.credential_challenge(ev3, b"payload")
        with pytest.raises(IntegrityError, match="does not open the payload"):
            a.activate_payload(ok["credential"], b64d(wrong["payload"]))
