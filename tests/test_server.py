"""The provider server, attack by attack, on SQLite and PostgreSQL.

Most tests drive the app through FastAPI's TestClient; the client tests use a real uvicorn
server on 127.0.0.1, and the ``serve`` test runs the real command in a subprocess.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from mlcapsule import errors as E
from mlcapsule.enclave._util import b64d, b64e
from mlcapsule.cli.main import cli
from mlcapsule.enclave.crypto.keys import ContentKey, load_provider_key
from mlcapsule.enclave.messages.license import verify_license
from mlcapsule.enclave.messages.receipts import GENESIS, entry_hash, verify_ack
from mlcapsule.enclave.messages.setup import open_payload
from mlcapsule.enclave.messages.voucher import verify_voucher
from mlcapsule.provider_client import ProviderClient
from mlcapsule.server.db import Account, Device, Nonce
from mlcapsule.server.settings import ServerSettings

from swtpm import other_swtpm, swtpm, tpm_ca, tpm_factory, tpm_policy  # noqa: F401  (fixtures)

from _server_support import (T0, FakeEnclave, Harness, ProviderFiles, db_url, harness, pg_server,  # noqa: F401
                             pg_url, platform, provider_files, serve_in_thread)


@pytest.fixture
def srv(db_url: str, provider_files: ProviderFiles, platform: Any) -> Any:
    with harness(db_url, provider_files, platform) as h:
        yield h


def error(r: Any) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["type"]


def devices(h: Harness) -> list[Device]:
    with h.service.sessions() as s:
        return list(s.scalars(select(Device)))


def provisioned(h: Harness, enc: FakeEnclave) -> dict[str, Any]:
    r = h.provision(enc)
    assert r.status_code == 200, r.text
    return r.json()


# -- basics -----------------------------------------------------------------------------------
def test_health_and_openapi_served(srv: Harness) -> None:
    assert srv.client.get("/v1/health").json() == {"status": "ok", "version": "0.1.0"}
    spec = srv.client.get("/openapi.json").json()
    assert {"/v1/health", "/v1/challenge", "/v1/provision", "/v1/usage"} <= set(spec["paths"])
    assert not any("voucher" in p for p in spec["paths"] if not p.startswith("/v1/admin/")), \
        "vouchers are admin-only: never on the clients' API (the admin API needs an admin token)"
    assert "ProvisionRequest" in spec["components"]["schemas"]
    assert "ProvisionResponse" in spec["components"]["schemas"]


def test_provision_delivers_content_key_and_signed_license(srv: Harness) -> None:
    enc = srv.enclave()
    nonce = srv.nonce()
    r = srv.provision(enc, nonce)
    assert r.status_code == 200, r.text
    body = r.json()
    content_key, envelope = open_payload(b64d(body["payload"]), enc.hpke, nonce)
    assert content_key == ContentKey.load(srv.files.content_key_path).key
    lic = verify_license(envelope, srv.provider_pub, capsule_id=uuid.UUID(srv.files.capsule_id),
                         version=srv.files.version, receipt_key=enc.receipt_pub)
    assert (lic.license_id, lic.device_id) == (body["license_id"], body["device_id"])
    assert (lic.budget, lic.lease_size, lic.account, lic.issued) == (1000, 25, "alice", T0)
    [dev] = devices(srv)
    assert (dev.receipt_pub, dev.evidence_type, dev.head_seq, dev.head_hash) == (enc.receipt_pub, "software", 0,
                                                                                 GENESIS)
    assert dev.measurement == srv.backend.measurement().hex()


def test_payload_opens_only_for_the_attested_enclave(srv: Harness) -> None:
    enc, nonce = srv.enclave(), srv.nonce()
    payload = b64d(srv.provision(enc, nonce).json()["payload"])
    with pytest.raises(E.IntegrityError):
        open_payload(payload, FakeEnclave(srv.backend).hpke, nonce)


# -- nonces -----------------------------------------------------------------------------------
def test_nonce_replay_refused(srv: Harness) -> None:
    """A used nonce serves no other request; the identical request (a client retrying after a
    lost answer) gets the same sealed answer again, without a second device."""
    enc, nonce = srv.enclave(), srv.nonce()
    first = srv.provision(enc, nonce)
    assert first.status_code == 200
    again = srv.provision(enc, nonce)
    assert again.status_code == 200 and again.json() == first.json()
    assert error(srv.provision(srv.enclave(), nonce)) == (409, "ProtocolError")
    other_evidence = srv.enclave().evidence(nonce)  # valid evidence, but another request
    assert error(srv.provision(enc, nonce, evidence=other_evidence)) == (409, "ProtocolError")
    bob = srv.add_account("bob")
    assert error(srv.provision(enc, nonce, token=bob)) == (403, "ProtocolError")
    assert len(devices(srv)) == 1


def test_failed_attestation_still_spends_the_nonce(srv: Harness) -> None:
    """An attacker cannot retry evidence against one challenge until something passes."""
    enc, nonce = srv.enclave(), srv.nonce()
    wrong = srv.enclave().evidence(nonce)  # evidence binding other keys
    assert error(srv.provision(enc, nonce, evidence=wrong)) == (403, "AttestationError")
    assert error(srv.provision(enc, nonce)) == (409, "ProtocolError")
    assert devices(srv) == []


def test_expired_nonce_refused(srv: Harness) -> None:
    enc, nonce = srv.enclave(), srv.nonce()
    srv.clock.advance(121)
    assert error(srv.provision(enc, nonce)) == (410, "ProtocolError")
    assert srv.provision(enc).status_code == 200  # a fresh challenge works


def test_zero_ttl_nonce_expires_at_once(db_url: str, provider_files: ProviderFiles, platform: Any) -> None:
    with harness(db_url, provider_files, platform, nonce_ttl=0) as h:
        assert error(h.provision(h.enclave())) == (410, "ProtocolError")


def test_forged_nonce_refused(srv: Harness) -> None:
    assert error(srv.provision(srv.enclave(), os.urandom(32))) == (403, "ProtocolError")


def test_nonce_of_another_account_refused(srv: Harness) -> None:
    bob = srv.add_account("bob")
    nonce = srv.nonce()  # alice's
    assert error(srv.provision(srv.enclave(), nonce, token=bob)) == (403, "ProtocolError")
    assert srv.provision(srv.enclave(), nonce).status_code == 200  # and alice can still use it


def test_expired_nonces_are_pruned(srv: Harness) -> None:
    srv.nonce()
    srv.clock.advance(2 * 86400)
    srv.nonce()
    with srv.service.sessions() as s:
        assert len(list(s.scalars(select(Nonce)))) == 1


def test_challenge_flood_is_bounded_per_account(srv: Harness) -> None:
    """An account cannot make the server store challenges without bound: after
    ``max_open_challenges`` open ones it gets 429 until they are used or expire; others are unaffected."""
    MAX_OPEN_CHALLENGES = srv.service.max_open_challenges = 8  # noqa: N806  (the setting, made small)
    with pytest.raises(E.UsageError, match="max_open_challenges"):
        ServerSettings(max_open_challenges=0)
    nonces = [srv.nonce() for _ in range(MAX_OPEN_CHALLENGES)]
    r = srv.challenge()
    assert error(r) == (429, "ServerError") and "open challenges" in r.json()["error"]["message"]
    bob = srv.add_account("bob")
    assert srv.challenge(token=bob).status_code == 200  # another account is unaffected
    assert srv.provision(srv.enclave(), nonces[0]).status_code == 200  # a used challenge frees a place
    assert srv.challenge().status_code == 200
    assert error(srv.challenge()) == (429, "ServerError")
    srv.clock.advance(121)  # expired challenges free every place
    assert srv.challenge().status_code == 200
    with srv.service.sessions() as s:
        assert len(list(s.scalars(select(Nonce)))) <= 2 * MAX_OPEN_CHALLENGES + 2


# -- accounts, grants, devices ----------------------------------------------------------------
def test_bad_or_missing_token_refused(srv: Harness) -> None:
    r = srv.client.post("/v1/challenge", json={"capsule_id": srv.files.capsule_id, "version": 1})
    assert error(r) == (401, "ServerError") and r.headers["www-authenticate"] == "Bearer"
    assert error(srv.challenge(token="mlc_" + "A" * 43)) == (401, "ServerError")


def test_token_stored_hashed(srv: Harness, db_url: str) -> None:
    with srv.service.sessions() as s:
        [acc] = s.scalars(select(Account))
    assert acc.token_hash == hashlib.sha256(srv.token.encode()).hexdigest()
    assert srv.token not in {acc.name, acc.token_hash}
    if db_url.startswith("sqlite"):
        srv.engine.dispose()  # checkpoint the WAL so the file holds everything
        db = Path(db_url.removeprefix("sqlite:///"))
        raw_bytes = b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name))
        assert srv.token.encode() not in raw_bytes
        assert acc.token_hash.encode() in raw_bytes
        assert db.stat().st_mode & 0o077 == 0, "the database holds content keys: 0600"


def test_unknown_capsule_404(srv: Harness) -> None:
    assert error(srv.challenge(capsule_id=str(uuid.uuid4()))) == (404, "ServerError")
    assert error(srv.challenge(version=7)) == (404, "ServerError")


def test_challenge_without_grant_refused(srv: Harness) -> None:
    _, token = srv.service.add_account("mallory")
    assert error(srv.challenge(token=token)) == (403, "PolicyError")


def test_revoked_grant_refused(srv: Harness) -> None:
    enc, nonce = srv.enclave(), srv.nonce()
    srv.service.revoke("alice", srv.files.capsule_id)
    assert error(srv.provision(enc, nonce)) == (403, "PolicyError")
    assert error(srv.challenge()) == (403, "PolicyError")
    assert devices(srv) == []


def test_expired_grant_refused(db_url: str, provider_files: ProviderFiles, platform: Any) -> None:
    with harness(db_url, provider_files, platform, expires=T0 + dt.timedelta(seconds=60)) as h:
        enc, nonce = h.enclave(), h.nonce()
        h.clock.advance(60)  # the grant expires while the nonce (120 s) is still fresh
        assert error(h.provision(enc, nonce)) == (403, "LicenseExpiredError")
        assert error(h.challenge()) == (403, "LicenseExpiredError")


def test_device_limit_provision_once(db_url: str, provider_files: ProviderFiles, platform: Any) -> None:
    """A fresh enclave (new keys, fresh nonce, valid evidence) cannot get a second license."""
    with harness(db_url, provider_files, platform, devices=1) as h:
        first = provisioned(h, h.enclave())
        r = h.provision(h.enclave())
        assert error(r) == (403, "PolicyError") and "1 of the 1 device" in r.json()["error"]["message"]
        assert error(h.provision(FakeEnclave(h.backend))) == (403, "PolicyError")
        assert [d.license_id for d in devices(h)] == [first["license_id"]]
        # Granting again with more devices lets exactly one more in.
        h.service.grant("alice", h.files.capsule_id, budget=1000, devices=2, expires=None)
        assert h.provision(h.enclave()).status_code == 200
        assert error(h.provision(h.enclave())) == (403, "PolicyError")


def test_software_evidence_refused_by_default(db_url: str, provider_files: ProviderFiles, platform: Any) -> None:
    with harness(db_url, provider_files, platform, allow_software=False) as h:
        r = h.provision(h.enclave())
        assert error(r) == (403, "AttestationError")
        assert "--UNSAFE-allow-software-evidence" in r.json()["error"]["message"]


def test_unlisted_measurement_refused(db_url: str, provider_files: ProviderFiles, platform: Any) -> None:
    with harness(db_url, provider_files, platform, measurements=frozenset(["ab" * 32])) as h:
        assert error(h.provision(h.enclave())) == (403, "AttestationError")


@pytest.mark.parametrize("change", [
    {"nonce": "AAAA"}, {"hpke_pub": b64e(b"x" * 31)}, {"receipt_pub": "%" * 44}, {"version": "1"},
    {"capsule_id": "not-a-uuid"}, {"evidence": []}, {"unexpected": 1}, {"hpke_pub": b64e(bytes(32))},
])
def test_malformed_provision_refused_with_422(srv: Harness, change: dict[str, Any]) -> None:
    enc, nonce = srv.enclave(), srv.nonce()
    body = {**enc.provision_body(srv.files.capsule_id, srv.files.version, nonce), **change}
    r = srv.client.post("/v1/provision", json=body, headers=srv.auth())
    assert error(r) == (422, "FormatError")
    assert srv.provision(enc, nonce).status_code == 200, "a malformed request does not spend the nonce"


@pytest.mark.tpm
def test_tpm_payload_opens_only_after_credential_activation(provider_files: ProviderFiles, platform: Any,
                                                           tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """With TPM evidence the server gates the payload on TPM2_ActivateCredential, so only the TPM
    holding both the certified EK and the quoting AK can open it; software evidence stays refused."""
    from swtpm import require_swtpm

    require_swtpm()
    swtpm, tpm_policy = request.getfixturevalue("swtpm"), request.getfixturevalue("tpm_policy")
    from mlcapsule.enclave.measurement import measurement
    from mlcapsule.enclave.messages.setup import report_data

    with harness(f"sqlite:///{tmp_path / 'tpm.db'}", provider_files, platform, allow_software=False,
                 measurements=frozenset([measurement().hex()]), tpm_policy=tpm_policy) as h, swtpm.backend() as b:
        enc, nonce = h.enclave(), h.nonce()
        ev = b.evidence(report_data(nonce, enc.hpke_pub, enc.receipt_pub))
        r = h.provision(enc, nonce, evidence=ev)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body["credential"]) == {"id_object", "encrypted_secret"}
        with pytest.raises(E.IntegrityError):  # the HPKE key alone does not open it
            open_payload(b64d(body["payload"]), enc.hpke, nonce)
        inner = b.activate_payload(body["credential"], b64d(body["payload"]))
        key, _ = open_payload(inner, enc.hpke, nonce)
        assert key == ContentKey.load(h.files.content_key_path).key
        [dev] = devices(h)
        assert dev.evidence_type == "tpm"
        assert error(h.provision(h.enclave())) == (403, "AttestationError")  # software evidence


# -- usage receipts ---------------------------------------------------------------------------
def upload(h: Harness, lic: dict[str, Any], receipts: list[dict[str, Any]], token: str | None = None) -> Any:
    return h.client.post("/v1/usage", json={"protocol": 2, "license_id": lic["license_id"],
                                            "device_id": lic["device_id"], "receipts": receipts}, headers=h.auth(token))


def head_of(h: Harness, r: Any, lic: dict[str, Any]) -> dict[str, int]:
    """The chain head in a usage answer, after checking its signed acknowledgement names it."""
    assert r.status_code == 200, r.text
    body = r.json()
    ack = verify_ack(body["ack"], h.provider_pub, license_id=lic["license_id"], device_id=lic["device_id"])
    assert ack.seq == body["seq"]
    return {k: body[k] for k in ("seq", "charged", "answered")}


def head(h: Harness) -> tuple[int, str, int, int]:
    [d] = devices(h)
    return d.head_seq, d.head_hash, d.charged, d.answered


def test_usage_upload_advances_the_chain(srv: Harness) -> None:
    enc = srv.enclave()
    lic = provisioned(srv, enc)
    chain = enc.chain(lic["license_id"], 5)
    r = upload(srv, lic, chain[:3])
    assert head_of(srv, r, lic) == {"seq": 3, "charged": 100, "answered": 60}
    r = upload(srv, lic, chain[3:])
    assert head_of(srv, r, lic) == {"seq": 5, "charged": 200, "answered": 120}
    assert head(srv) == (5, entry_hash(chain[-1]), 200, 120)
    [d] = devices(srv)
    assert d.last_sync == T0


def test_reuploaded_receipts_accepted_once(srv: Harness) -> None:
    """A lost response makes the enclave send acknowledged receipts again: nothing is counted twice."""
    enc = srv.enclave()
    lic = provisioned(srv, enc)
    chain = enc.chain(lic["license_id"], 6)
    assert upload(srv, lic, chain[:4]).json()["seq"] == 4
    assert head_of(srv, upload(srv, lic, chain[:4]), lic) == {"seq": 4, "charged": 200, "answered": 60}
    assert head_of(srv, upload(srv, lic, chain), lic) == {"seq": 6, "charged": 300, "answered": 120}


def test_tampered_receipt_chain_refused(srv: Harness) -> None:
    enc = srv.enclave()
    lic = provisioned(srv, enc)
    chain = enc.chain(lic["license_id"], 4)
    assert upload(srv, lic, chain[:2]).status_code == 200
    before = head(srv)
    tampered = [dict(e, body=dict(e["body"])) for e in chain[2:]]
    tampered[1]["body"]["answered"] = 0  # under-report the queries answered
    assert error(upload(srv, lic, tampered)) == (409, "IntegrityError")
    # Re-signing with another key (the client's own) does not help either.
    forged = FakeEnclave(srv.backend).chain(lic["license_id"], 2, seq=3, prev=before[1], charged=100)
    assert error(upload(srv, lic, forged)) == (409, "IntegrityError")
    # Rewriting already accepted history is refused too.
    rewritten = enc.chain(lic["license_id"], 4)
    rewritten[1]["body"]["charged"] = 1
    assert error(upload(srv, lic, rewritten)) == (409, "IntegrityError")
    assert head(srv) == before


def test_receipt_chain_with_gap_refused(srv: Harness) -> None:
    enc = srv.enclave()
    lic = provisioned(srv, enc)
    chain = enc.chain(lic["license_id"], 5)
    assert upload(srv, lic, chain[:2]).status_code == 200
    before = head(srv)
    assert error(upload(srv, lic, chain[3:])) == (409, "IntegrityError")  # receipt 3 dropped
    assert error(upload(srv, lic, [chain[2], chain[4], chain[3]])) == (409, "IntegrityError")  # reordered
    assert head(srv) == before
    assert upload(srv, lic, chain[2:]).json()["seq"] == 5


def test_receipts_of_another_license_refused(srv: Harness) -> None:
    a, b = srv.enclave(), srv.enclave()
    lic_a, lic_b = provisioned(srv, a), provisioned(srv, b)
    assert error(upload(srv, lic_a, b.chain(lic_b["license_id"], 2))) == (409, "IntegrityError")
    assert error(upload(srv, lic_a, a.chain(lic_b["license_id"], 2))) == (409, "IntegrityError")
    bob = srv.add_account("bob")
    assert error(upload(srv, lic_a, a.chain(lic_a["license_id"], 2), token=bob)) == (404, "ServerError")
    assert error(upload(srv, {**lic_a, "device_id": lic_b["device_id"]}, [])) == (404, "ServerError")


def test_malformed_receipts_refused(srv: Harness) -> None:
    enc = srv.enclave()
    lic = provisioned(srv, enc)
    assert error(upload(srv, lic, [{"body": {"seq": "x"}, "signature": "AA=="}])) == (422, "FormatError")
    assert error(upload(srv, lic, ["receipt"])) == (422, "FormatError")  # type: ignore[list-item]


def test_client_of_usage_protocol_1_gets_a_clear_error(srv: Harness) -> None:
    """Usage protocol 2 signs its acknowledgements; a client that would trust an unsigned one is
    told to upgrade (426), and nothing is stored."""
    enc = srv.enclave()
    lic = provisioned(srv, enc)
    r = srv.client.post("/v1/usage", json={"license_id": lic["license_id"], "device_id": lic["device_id"],
                                           "receipts": enc.chain(lic["license_id"], 2)}, headers=srv.auth())
    assert error(r) == (426, "ProtocolError"), r.text
    assert "upgrade mlcapsule" in r.json()["error"]["hint"]
    assert head(srv)[0] == 0


# -- the client, against a real uvicorn server ------------------------------------------------
def test_client_against_real_server_maps_errors_to_classes(srv: Harness) -> None:
    enc = srv.enclave()
    with serve_in_thread(srv.app) as url, ProviderClient(url + "/", srv.token) as c:
        assert c.health()["status"] == "ok"
        nonce, expires = c.challenge(srv.files.capsule_id, srv.files.version)
        assert expires == T0 + dt.timedelta(seconds=120)
        kw = dict(nonce=nonce, hpke_pub=enc.hpke_pub, receipt_pub=enc.receipt_pub, evidence=enc.evidence(nonce))
        got = c.provision(srv.files.capsule_id, srv.files.version, **kw)
        key, _ = open_payload(b64d(got["payload"]), enc.hpke, nonce)
        assert key == ContentKey.load(srv.files.content_key_path).key
        assert c.provision(srv.files.capsule_id, srv.files.version, **kw) == got  # a retry: the same answer
        other = FakeEnclave(srv.backend)
        with pytest.raises(E.ProtocolError) as replay:
            c.provision(srv.files.capsule_id, srv.files.version, nonce=nonce, hpke_pub=other.hpke_pub,
                        receipt_pub=other.receipt_pub, evidence=other.evidence(nonce))
        assert replay.value.status_code == 409 and "already used" in replay.value.message  # type: ignore[attr-defined]
        ack = c.upload_usage(got["license_id"], got["device_id"], enc.chain(got["license_id"], 3))
        assert {k: ack[k] for k in ("seq", "charged", "answered")} == {"seq": 3, "charged": 100, "answered": 60}
        assert verify_ack(ack["ack"], srv.provider_pub, license_id=got["license_id"], device_id=got["device_id"]).seq == 3
        with pytest.raises(E.IntegrityError):
            c.upload_usage(got["license_id"], got["device_id"], enc.chain(got["license_id"], 1))
        srv.service.revoke("alice", srv.files.capsule_id)
        with pytest.raises(E.PolicyError, match="revoked"):
            c.challenge(srv.files.capsule_id, srv.files.version)
        with ProviderClient(url, "wrong") as bad, pytest.raises(E.ServerError) as e:
            bad.challenge(srv.files.capsule_id, srv.files.version)
        assert e.value.status_code == 401  # type: ignore[attr-defined]


def test_oversized_body_refused_even_without_content_length(db_url: str, provider_files: ProviderFiles, platform: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory exhaustion by a huge request body: refused with 413 whether the client declares
    its size or streams it chunked; the server keeps serving."""
    import mlcapsule.server.app as app_module

    monkeypatch.setattr(app_module, "MAX_BODY", 4096)
    with harness(db_url, provider_files, platform) as h, serve_in_thread(h.app) as url, httpx.Client() as http:
        auth = h.auth(None)
        declared = http.post(url + "/v1/challenge", content=b"x" * 5000, headers=auth)
        assert declared.status_code == 413 and declared.json()["error"]["type"] == "FormatError"

        sent = 0

        def chunks() -> Any:  # no Content-Length: httpx sends this chunked
            nonlocal sent
            for _ in range(64):
                sent += 1024
                yield b'{"pad": "' + b"y" * 1014 if sent == 1024 else b"y" * 1024

        streamed = http.post(url + "/v1/challenge", content=chunks(), headers=auth)
        assert streamed.status_code == 413 and "larger than 4096" in streamed.json()["error"]["message"]
        ok = http.post(url + "/v1/challenge", json={"capsule_id": h.files.capsule_id, "version": 1}, headers=auth)
        assert ok.status_code == 200


def test_client_unreachable_server_is_transport_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}"
    with ProviderClient(url, "t", timeout=5) as c, pytest.raises(E.TransportError, match=url):
        c.health()


def test_client_non_mlcapsule_server_is_server_error() -> None:
    transport = httpx.MockTransport(lambda req: httpx.Response(502, text="<html>bad gateway</html>"))
    with ProviderClient("https://example.invalid", "t", transport=transport) as c, pytest.raises(E.ServerError):
        c.health()


# -- administration CLI -----------------------------------------------------------------------
def run_cli(*args: str) -> Any:
    r = CliRunner().invoke(cli, list(args), catch_exceptions=True)
    return r


def test_admin_cli_full_cycle(db_url: str, provider_files: ProviderFiles, platform: Any, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCAPSULE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLCAPSULE_SERVER_PROVIDER_KEY_PATH", str(provider_files.key_path))
    db = ["--database-url", db_url]
    r = run_cli("admin", "account", "add", "alice", *db)
    assert r.exit_code == 0, r.output
    token = r.output.strip().splitlines()[-1]
    assert token.startswith("mlc_")
    r = run_cli("admin", "account", "add", "alice", *db)
    assert isinstance(r.exception, E.UsageError)
    assert "alice" in run_cli("admin", "account", "list", *db).output
    r = run_cli("admin", "capsule", "add", str(provider_files.capsule_path), "--key",
                str(provider_files.content_key_path), *db)
    assert r.exit_code == 0 and "registered" in r.output, r.output
    r = run_cli("admin", "grant", "alice", str(provider_files.capsule_path), "--budget", "500", "--devices", "1",
                "--expires", "30d", *db)
    assert r.exit_code == 0, r.output

    settings = ServerSettings(database_url=db_url, provider_key_path=provider_files.key_path,
                              allow_software_evidence=True,
                              allowed_measurements=frozenset([platform.measurement().hex()]))
    from fastapi.testclient import TestClient

    from mlcapsule.server.app import create_app

    app = create_app(settings)
    enc = FakeEnclave(platform)
    try:
        with TestClient(app) as client:
            h = {"Authorization": f"Bearer {token}"}
            nonce = b64d(client.post("/v1/challenge", json={"capsule_id": provider_files.capsule_id,
                                                            "version": 1}, headers=h).json()["nonce"])
            r = client.post("/v1/provision", json=enc.provision_body(provider_files.capsule_id, 1, nonce), headers=h)
            assert r.status_code == 200, r.text
            lic = r.json()
            _, envelope = open_payload(b64d(lic["payload"]), enc.hpke, nonce)
            issued = verify_license(envelope, load_provider_key(provider_files.key_path).public_key(),
                                    capsule_id=uuid.UUID(provider_files.capsule_id), version=1)
            assert issued.budget == 500 and issued.expires is not None
            r = client.post("/v1/usage", json={"protocol": 2, **{k: lic[k] for k in ("license_id", "device_id")},
                                               "receipts": enc.chain(lic["license_id"], 3)}, headers=h)
            assert r.status_code == 200, r.text
            # Vouchers: provider-signed, numbered in sequence, bound to the device.
            pub = load_provider_key(provider_files.key_path).public_key()
            for seq, ref in ((1, lic["license_id"]), (2, lic["license_id"][:8])):  # full id, or a prefix
                out = tmp_path / f"v{seq}.json"
                r = run_cli("admin", "voucher", ref, "--queries", "250", "-o", str(out), *db)
                assert r.exit_code == 0, r.output
                v = verify_voucher(json.loads(out.read_text()), pub, license_id=lic["license_id"],
                                   device_id=lic["device_id"])
                assert (v.seq, v.queries) == (seq, 250)
            assert isinstance(run_cli("admin", "voucher", "nope", "--queries", "1", "-o", str(tmp_path / "x"),
                                      *db).exception, E.UsageError)
            r = run_cli("admin", "usage", *db)
            assert r.exit_code == 0 and "alice" in r.output and lic["license_id"][:8] in r.output, r.output
            r = run_cli("admin", "usage", "--json", *db)
            [row] = json.loads(r.output)
            assert (row["charged"], row["answered"], row["budget"], row["vouchers"]) == (100, 60, 500, 500)
            r = run_cli("admin", "revoke", "alice", f"{provider_files.capsule_id}:1", *db)
            assert r.exit_code == 0 and "revoked" in r.output, r.output
            r = client.post("/v1/challenge", json={"capsule_id": provider_files.capsule_id, "version": 1}, headers=h)
            assert r.status_code == 403
    finally:
        app.state.engine.dispose()


def test_admin_capsule_add_refuses_a_key_for_another_capsule(provider_files: ProviderFiles, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCAPSULE_HOME", str(tmp_path / "home"))
    db = ["--database-url", f"sqlite:///{tmp_path / 's.db'}", "--provider-key", str(provider_files.key_path)]
    ck = ContentKey.load(provider_files.content_key_path)
    wrong_id = tmp_path / "wrong-id.key"
    ContentKey(uuid.uuid4(), ck.version, ck.key).save(wrong_id)
    wrong_key = tmp_path / "wrong-key.key"
    ContentKey(ck.capsule_id, ck.version, os.urandom(32)).save(wrong_key)
    for key in (wrong_id, wrong_key):
        r = run_cli("admin", "capsule", "add", str(provider_files.capsule_path), "--key", str(key), *db)
        assert isinstance(r.exception, E.UsageError), r.output
    from mlcapsule.enclave.crypto.keys import generate_provider_key

    other = tmp_path / "other-provider.pem"
    generate_provider_key(other)
    r = run_cli("admin", "capsule", "add", str(provider_files.capsule_path), "--key",
                str(provider_files.content_key_path), "--database-url", f"sqlite:///{tmp_path / 's.db'}",
                "--provider-key", str(other))
    assert isinstance(r.exception, E.UsageError) and "another provider key" in str(r.exception)


def test_settings_precedence_flags_env_toml(tmp_path: Path) -> None:
    toml = tmp_path / "server.toml"
    toml.write_text('[server]\ndatabase_url = "sqlite:///from-toml.db"\nport = 9000\nhost = "0.0.0.0"\n'
                    f'allowed_measurements = ["{"AB" * 32}"]\nnonce_ttl_seconds = 30\n'
                    'passphrase_file = "pass.txt"\n')
    (tmp_path / "pass.txt").write_text("secret\n")
    env = {"MLCAPSULE_SERVER_PORT": "9100", "MLCAPSULE_SERVER_ALLOW_SOFTWARE_EVIDENCE": "yes"}
    s = ServerSettings.load(config_file=toml, environ=env, host="127.0.0.2")
    assert (s.database_url, s.port, s.host, s.nonce_ttl_seconds) == ("sqlite:///from-toml.db", 9100, "127.0.0.2", 30)
    assert s.allow_software_evidence and s.allowed_measurements == frozenset(["ab" * 32])
    assert s.passphrase == b"secret"
    assert ServerSettings.load(config_file=toml, environ={"MLCAPSULE_SERVER_PASSPHRASE": "env"}).passphrase == b"env"
    d = ServerSettings.load(environ={"MLCAPSULE_HOME": str(tmp_path)})
    assert not d.allow_software_evidence and d.allowed_measurements == frozenset() and d.nonce_ttl_seconds == 120
    for bad_env in ({"MLCAPSULE_SERVER_PORT": "eighty"}, {"MLCAPSULE_SERVER_ALLOW_SOFTWARE_EVIDENCE": "maybe"},
                    {"MLCAPSULE_SERVER_ALLOWED_MEASUREMENTS": "abc"}):
        with pytest.raises(E.UsageError):
            ServerSettings.load(config_file=toml, environ=bad_env)
    (tmp_path / "bad.toml").write_text("unknown_key = 1\n")
    with pytest.raises(E.UsageError, match="unknown_key"):
        ServerSettings.load(config_file=tmp_path / "bad.toml", environ={})


def test_serve_command_runs_a_real_server(provider_files: ProviderFiles, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLCAPSULE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlcapsule", "serve", "--port", str(port), "--database-url",
         f"sqlite:///{tmp_path / 'serve.db'}", "--provider-key", str(provider_files.key_path),
         "--UNSAFE-allow-software-evidence", "--allow-measurement", "local"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with ProviderClient(f"http://127.0.0.1:{port}", None, timeout=2) as c:
                    assert c.health()["status"] == "ok"
                break
            except E.TransportError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "UNSAFE" in err
