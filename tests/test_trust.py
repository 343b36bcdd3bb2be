"""Issue 10, item 4: explicit trust.

* Opening a capsule needs a trust decision: a pinned provider key, or the loudly named
  ``UnsafeTrustManifestKey``. There is no default that trusts the key the manifest names.
* The server owns its ``EvidenceVerifier``, built from its settings: two servers in one process
  decide independently.
* Declared limits are enforced (``signed.MAX_ENVELOPE``) or gone (``CLOCK_TOLERANCE``,
  ``AttestationPolicy.allow_debug``).
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import numpy as np
import pytest

import mlcapsule
from mlcapsule.cli.main import PIN_FILE, main
from mlcapsule.client import default_state_dir
from mlcapsule.enclave.errors import FormatError, SignatureError, UsageError
from mlcapsule.enclave.format import CapsuleFile, TrustProviderKey, UnsafeTrustManifestKey, verify_capsule
from mlcapsule.enclave.format.trust import HEADER_LEN, SIG_LEN, UntrustedProviderKey

from conftest import assert_one_line_error, layout, resign

from _server_support import db_url, harness, pg_server, pg_url, platform, provider_files, serve_in_thread  # noqa: F401


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _pieces(path: Path) -> tuple[bytes, bytes, bytes]:
    blob = path.read_bytes()
    mlen = layout(path).manifest_length
    return blob[:HEADER_LEN], blob[HEADER_LEN:HEADER_LEN + mlen], blob[HEADER_LEN + mlen:HEADER_LEN + mlen + SIG_LEN]


@pytest.fixture
def rekeyed(tmp_path, capsule_copy, other_provider_key):
    """The attack: the provider's capsule with the provider key replaced by the attacker's, edited
    (a bigger budget) and re-signed. Self-consistent: only a pin tells it apart."""
    def edit(m):
        m["provider"]["key"] = _b64(other_provider_key.raw)
        m["policy"]["budget"] = 10**9

    resign(capsule_copy.path, edit, other_provider_key)
    return capsule_copy


# -- a trust decision is required --------------------------------------------------------------
def test_opening_a_capsule_without_a_trust_decision_is_a_type_error(mlp_capsule, tmp_path):
    with pytest.raises(TypeError):
        CapsuleFile(mlp_capsule.path)  # type: ignore[call-arg]
    for not_a_decision in (None, mlp_capsule.manifest.provider_key, "provider.pem.pub", True):
        with pytest.raises(TypeError, match="trust decision"):
            CapsuleFile(mlp_capsule.path, trust=not_a_decision)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        mlcapsule.open_capsule(mlp_capsule.path, unsafe_dev_key=mlp_capsule.key_path)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="trust decision"):
        mlcapsule.open_capsule(mlp_capsule.path, trust=None, unsafe_dev_key=mlp_capsule.key_path,  # type: ignore[arg-type]
                               **mlp_capsule.dirs(tmp_path))
    with pytest.raises(TypeError, match="trust decision"):
        verify_capsule(*_pieces(mlp_capsule.path), trust=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TrustProviderKey(b"short")


def test_verify_capsule_is_pure_and_agrees_with_capsulefile(mlp_capsule, provider_key):
    header, manifest, sig = _pieces(mlp_capsule.path)
    m = verify_capsule(header, manifest, sig, trust=TrustProviderKey(provider_key.raw))
    with CapsuleFile(mlp_capsule.path, trust=TrustProviderKey(provider_key.raw)) as cf:
        assert cf.manifest == m and cf.origin_verified
    assert verify_capsule(header, manifest, sig, trust=UnsafeTrustManifestKey()) == m
    with pytest.raises(SignatureError):  # one flipped signature bit
        verify_capsule(header, manifest, bytes([sig[0] ^ 1]) + sig[1:], trust=TrustProviderKey(provider_key.raw))
    with pytest.raises(FormatError):  # a manifest of another length than the header gives
        verify_capsule(header, manifest + b" ", sig, trust=TrustProviderKey(provider_key.raw))


# -- the attack: a capsule re-signed by another key ----------------------------------------------
def test_capsule_resigned_by_another_key_is_refused_under_the_pinned_key(rekeyed, provider_key, other_provider_key,
                                                                         tmp_path):
    with pytest.raises(UntrustedProviderKey):
        CapsuleFile(rekeyed.path, trust=TrustProviderKey(provider_key.raw))
    with pytest.raises(UntrustedProviderKey):
        verify_capsule(*_pieces(rekeyed.path), trust=TrustProviderKey(provider_key.raw))
    # the client API, pinned at pack time (conftest's Packed.open): refused before any worker runs
    with pytest.raises(UntrustedProviderKey):
        rekeyed.open(tmp_path)
    # accepted only when the caller says, by name, that it trusts the manifest's key
    with CapsuleFile(rekeyed.path, trust=UnsafeTrustManifestKey()) as cf:
        assert cf.manifest.provider_key == other_provider_key.raw and not cf.origin_verified
        assert cf.manifest.policy.budget == 10**9


def test_cli_refuses_a_resigned_capsule_unless_the_unsafe_flag_is_given_and_then_warns(rekeyed, provider_key, cli):
    r = cli("verify", rekeyed.path, "--trust", provider_key.pub_path)
    assert r.code == SignatureError.exit_code and "not the trusted one" in assert_one_line_error(r.err)
    r = cli("verify", rekeyed.path)  # no decision: refused, not trusted silently
    assert r.code == UsageError.exit_code and "--trust" in r.err
    r = cli("inspect", rekeyed.path)
    assert r.code == UsageError.exit_code and "OK" not in r.out
    r = cli("verify", rekeyed.path, "--unsafe-trust-manifest-key")
    assert r.code == 0 and "NOT checked" in " ".join(r.out.split())
    assert "warning:" in r.err and "integrity only" in " ".join(r.err.split())
    r = cli("verify", rekeyed.path, "--unsafe-trust-manifest-key", "--trust", provider_key.pub_path)
    assert r.code == UsageError.exit_code


# -- the client's pin: given with --trust, or trusted on first use and remembered ---------------------
@pytest.fixture
def device(tmp_path, provider_files, platform, mlcapsule_home):  # noqa: F811
    """A device set up with the CLI, no --trust: the key is trusted on first use."""
    cap = tmp_path / "tiny.capsule"
    shutil.copy(provider_files.capsule_path, cap)
    db = f"sqlite:///{tmp_path / 'server.db'}"
    with harness(db, provider_files, platform, budget=1000, devices=1) as h, serve_in_thread(h.app) as url:
        assert main(["setup", str(cap), "--token", h.token, "--server", url]) == 0
        yield {"capsule": cap, "files": provider_files}


def test_first_setup_pins_the_provider_key_and_a_rekeyed_capsule_is_then_refused(device, tmp_path, capsys,
                                                                                   other_provider_key):
    from mlcapsule.enclave.crypto.keys import load_provider_key, raw_public

    cap: Path = device["capsule"]
    with CapsuleFile(cap, trust=UnsafeTrustManifestKey()) as cf:
        pin = default_state_dir(cf.manifest) / PIN_FILE
    provider_raw = raw_public(load_provider_key(device["files"].key_path).public_key())
    assert pin.read_bytes() == Path(str(device["files"].key_path) + ".pub").read_bytes()
    x = tmp_path / "x.npy"
    np.save(x, np.ones((2, 4), np.float32))
    capsys.readouterr()
    assert main(["predict", str(cap), str(x)]) == 0
    assert "first use" not in capsys.readouterr().err  # the remembered pin, silently
    # The attacker swaps in the capsule re-keyed and re-signed with its own key.
    resign(cap, lambda m: m["provider"].update(key=_b64(other_provider_key.raw)), other_provider_key)
    assert main(["predict", str(cap), str(x)]) == SignatureError.exit_code
    assert "not the trusted one" in capsys.readouterr().err
    # Even when the user trusts the manifest's key, the enclave refuses: its sealed license is
    # signed by the provider's key, not the one the manifest now names.
    assert main(["predict", str(cap), str(x), "--unsafe-trust-manifest-key"]) == SignatureError.exit_code
    err = capsys.readouterr().err
    assert "warning:" in err and "--unsafe-trust-manifest-key" in err
    assert pin.read_bytes() == Path(str(device["files"].key_path) + ".pub").read_bytes()  # the pin is unchanged
    assert provider_raw != other_provider_key.raw


def test_setup_with_the_wrong_trust_key_is_refused_before_the_server_is_asked(tmp_path, provider_files, platform,  # noqa: F811
                                                                              mlcapsule_home, other_provider_key, capsys):
    db = f"sqlite:///{tmp_path / 'server.db'}"
    with harness(db, provider_files, platform, budget=10, devices=1) as h, serve_in_thread(h.app) as url:
        rc = main(["setup", str(provider_files.capsule_path), "--token", h.token, "--server", url,
                   "--trust", str(other_provider_key.pub_path)])
        assert rc == SignatureError.exit_code
        assert h.app.state.service.usage() == []  # no device slot used
    with CapsuleFile(provider_files.capsule_path, trust=UnsafeTrustManifestKey()) as cf:
        assert not (default_state_dir(cf.manifest) / PIN_FILE).exists()


# -- the server's evidence verifier --------------------------------------------------------------
def test_two_apps_with_different_settings_verify_evidence_independently(tmp_path, provider_files, platform):  # noqa: F811
    """No global registry or configuration: the second app's settings change nothing for the first."""
    from mlcapsule.enclave.errors import AttestationError
    from mlcapsule.enclave.messages.setup import report_data
    from mlcapsule.server.app import create_app
    from mlcapsule.server.settings import ServerSettings

    measurement = platform.measurement().hex()
    lax = create_app(ServerSettings(database_url=f"sqlite:///{tmp_path / 'a.db'}", provider_key_path=provider_files.key_path,
                                    allow_software_evidence=True, allowed_measurements=frozenset([measurement])))
    strict = create_app(ServerSettings(database_url=f"sqlite:///{tmp_path / 'b.db'}",
                                       provider_key_path=provider_files.key_path, allow_software_evidence=False,
                                       allowed_measurements=frozenset(["ab" * 32])))
    try:
        rd = report_data(b"n" * 32, b"h" * 32, b"r" * 32)
        evidence = platform.evidence(rd)
        assert lax.state.verifier is not strict.state.verifier
        assert lax.state.service.verifier is lax.state.verifier
        assert lax.state.verifier.verify(evidence, expected_report_data=rd).measurement == measurement
        with pytest.raises(AttestationError, match="software"):
            strict.state.verifier.verify(evidence, expected_report_data=rd)
        # and again in the other order, after the strict app was used
        assert lax.state.verifier.verify(evidence, expected_report_data=rd).type == "software"
        assert lax.state.verifier.policy.tpm is None and strict.state.verifier.policy.tpm is None
    finally:
        lax.state.engine.dispose()
        strict.state.engine.dispose()


def test_the_attestation_package_has_no_global_registry_or_configuration():
    import mlcapsule.attestation as attestation
    from mlcapsule.attestation import tpm

    assert not hasattr(attestation, "register_verifier") and not hasattr(attestation, "_VERIFIERS")
    assert not hasattr(tpm, "configure") and not hasattr(tpm, "_configured")
    with pytest.raises(TypeError):
        attestation.DEFAULT_VERIFIERS["evil"] = lambda *a, **k: None  # type: ignore[index]


# -- declared limits: enforced or gone -----------------------------------------------------------
def test_oversized_signed_envelope_is_refused_before_its_signature_is_checked(provider_key):
    from mlcapsule.enclave.messages import signed

    body = {"pad": "x" * signed.MAX_ENVELOPE}
    with pytest.raises(FormatError, match="too large"):
        signed.sign("voucher/v1", body, provider_key.private)
    # made by hand around the check: verify refuses it from its size, before any signature math
    envelope = {"type": "voucher/v1", "body": body, "signature": _b64(bytes(64))}
    with pytest.raises(FormatError, match="too large"):
        signed.verify("voucher/v1", envelope, provider_key.private.public_key())
    huge_sig = {"type": "voucher/v1", "body": {"a": 1}, "signature": "A" * (signed.MAX_ENVELOPE + 1)}
    with pytest.raises(FormatError, match="too large"):
        signed.verify("voucher/v1", huge_sig, provider_key.private.public_key())
    # just under the limit still signs and verifies
    small = {"pad": "x" * (signed.MAX_ENVELOPE - 100)}
    assert signed.verify("voucher/v1", signed.sign("voucher/v1", small, provider_key.private),
                         provider_key.private.public_key()) == small


def test_declared_but_unenforced_limits_are_gone():
    from mlcapsule.attestation import AttestationPolicy
    from mlcapsule.enclave import state

    assert not hasattr(state, "CLOCK_TOLERANCE")
    with pytest.raises(TypeError):
        AttestationPolicy(allow_debug=True)  # type: ignore[call-arg]

