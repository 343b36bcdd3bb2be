"""The provider's side of the defenses (issue 12), on SQLite and PostgreSQL: grants that tighten
the capsule's defense policy and travel in the signed license, unlock vouchers numbered per
device, and the alarms and defense gaps of the receipt chain reaching `admin usage`,
`admin alarms` and the Python API."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from _server_support import (  # noqa: F401
    T0,
    FakeEnclave,
    Harness,
    ProviderFiles,
    _tiny_model,
    db_url,
    harness,
    pg_server,
    pg_url,
    platform,
    provider_files,
)
from mlcapsule import errors as E
from mlcapsule.cli.main import cli
from mlcapsule.enclave._util import b64d
from mlcapsule.enclave.crypto.keys import load_provider_key, raw_public
from mlcapsule.enclave.messages import signed
from mlcapsule.enclave.messages.license import License, verify_license
from mlcapsule.enclave.messages.receipts import GENESIS, entry_hash, make_entry
from mlcapsule.enclave.messages.setup import open_payload
from mlcapsule.enclave.messages.unlock import KIND as UNLOCK_KIND, Unlock, verify_unlock
from mlcapsule.enclave.messages.voucher import verify_voucher

CAPSULE_DEFENSES = ["prada:delta=0.95,action=degrade", "round:3"]


@pytest.fixture
def srv(db_url: str, provider_files: ProviderFiles, platform: Any) -> Any:  # noqa: F811
    with harness(db_url, provider_files, platform) as h:
        yield h


@pytest.fixture(scope="module")
def defended(provider_files: ProviderFiles, tmp_path_factory: pytest.TempPathFactory) -> Any:  # noqa: F811
    """A capsule whose manifest signs a defense policy, by the same provider key."""
    import mlcapsule
    from mlcapsule.enclave.format.manifest import Policy

    d = tmp_path_factory.mktemp("defended")
    return mlcapsule.pack(_tiny_model(), d / "defended.capsule", provider_key=provider_files.key_path,
                          name="defended", policy=Policy(lease_size=25), defenses=CAPSULE_DEFENSES)


def register(h: Harness, packed: Any) -> str:
    pub = raw_public(load_provider_key(h.files.key_path).public_key())
    h.service.register_capsule(packed.capsule_path, packed.key_path, provider_public=pub)
    return str(packed.manifest.capsule_id)


def provision_license(h: Harness, enc: FakeEnclave, capsule_id: str | None = None) -> tuple[dict[str, Any], License]:
    cid = capsule_id or h.files.capsule_id
    r = h.client.post("/v1/challenge", json={"capsule_id": cid, "version": 1}, headers=h.auth())
    assert r.status_code == 200, r.text
    nonce = b64d(r.json()["nonce"])
    r = h.client.post("/v1/provision", json=enc.provision_body(cid, 1, nonce), headers=h.auth())
    assert r.status_code == 200, r.text
    body = r.json()
    _, envelope = open_payload(b64d(body["payload"]), enc.hpke, nonce)
    lic = verify_license(envelope, h.provider_pub, capsule_id=uuid.UUID(cid), version=1,
                         receipt_key=enc.receipt_pub)
    return body, lic


def chain(enc: FakeEnclave, license_id: str, entries: list[tuple[str, dict[str, Any]]], *, seq: int = 1,
          prev: str = GENESIS, charged: int = 0, answered: int = 0) -> list[dict[str, Any]]:
    """Receipts of the given (kind, data), continuing (seq - 1, prev): a lease adds 100 charged
    queries, a report or an alarm 10 answered ones."""
    out = []
    for i, (kind, data) in enumerate(entries):
        if kind == "lease":
            charged += 100
        elif kind in ("report", "alarm"):
            answered = min(charged, answered + 10)
        e = make_entry(enc.receipt, seq=seq + i, prev=prev, kind=kind, license_id=license_id,
                       time=(T0 + dt.timedelta(minutes=seq + i)).isoformat(), charged=charged, answered=answered,
                       data=data)
        out.append(e)
        prev = entry_hash(e)
    return out


def upload(h: Harness, body: dict[str, Any], receipts: list[dict[str, Any]]) -> Any:
    return h.client.post("/v1/usage", json={"protocol": 2, "license_id": body["license_id"],
                                            "device_id": body["device_id"], "receipts": receipts},
                         headers=h.auth())


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=True)


ALARM = {"alarms": [{"detector": "prada", "query": 123, "statistic": 0.87, "threshold": 0.9, "action": "lock"},
                    {"detector": "ood", "query": 130, "statistic": 41, "threshold": None, "action": "record"}],
         "defense": {"queries": 131, "refused": 0, "locked": True, "alarms": {"prada": 1, "ood": 1}}}
GAP = {"queries": 7, "reason": "crash"}


# -- grants -----------------------------------------------------------------------------------
def test_grant_defenses_are_carried_in_the_signed_license(srv: Harness) -> None:
    r = srv.service.grant("alice", srv.files.capsule_id, budget=100, devices=2, expires=None,
                          defenses=[" prada:delta=0.95,action=lock ", "round:2"])
    assert r["defenses"] == ["prada:delta=0.95,action=lock", "round:2"] and r["checked"]
    assert any("PRADA" in line for line in r["policy"])
    _, lic = provision_license(srv, srv.enclave())
    assert lic.policy == {"defenses": ["prada:delta=0.95,action=lock", "round:2"]}
    assert lic.defenses == ["prada:delta=0.95,action=lock", "round:2"]
    assert srv.service.usage()[0]["defenses"] == lic.defenses
    # Granting again replaces the terms: without --defense, later licenses carry none.
    srv.service.grant("alice", srv.files.capsule_id, budget=100, devices=2, expires=None)
    _, lic2 = provision_license(srv, srv.enclave())
    assert lic2.policy == {} and lic2.defenses == []


def test_a_grant_that_loosens_the_capsules_policy_is_refused(srv: Harness, defended: Any) -> None:
    cid = register(srv, defended)
    for loosening in (["prada:delta=0.9"], ["prada:action=record"], ["round:4"], ["prada:window=1000"]):
        with pytest.raises(E.DefenseGrantError, match="loosen"):
            srv.service.grant("alice", cid, budget=10, devices=1, expires=None, defenses=loosening)
    with pytest.raises(E.DefenseSpecError, match="unknown defense"):
        srv.service.grant("alice", cid, budget=10, devices=1, expires=None, defenses=["noise:1"])
    with pytest.raises(E.DefenseSpecError, match="twice"):
        srv.service.grant("alice", cid, budget=10, devices=1, expires=None, defenses=["round:2", "round:1"])
    with pytest.raises(E.UsageError, match="at most 32"):
        srv.service.grant("alice", cid, budget=10, devices=1, expires=None, defenses=["round:2"] * 33)
    # Tightening (and adding a defense) is accepted, and the enclave gets the specs as given.
    tight = ["prada:delta=0.97,action=lock", "round:2", "top-k:1"]
    r = srv.service.grant("alice", cid, budget=10, devices=1, expires=None, defenses=tight)
    assert r["checked"] and any("top 1" in line for line in r["policy"])
    _, lic = provision_license(srv, srv.enclave(), cid)
    assert lic.defenses == tight


def test_a_capsule_registered_before_the_server_kept_policies(srv: Harness, defended: Any) -> None:
    """Its policy is unknown (NULL): a grant by capsule id is only parsed; by the capsule file it
    is checked against the file's manifest (which must be the registered one), and remembered."""
    from sqlalchemy import update

    from mlcapsule.server.db import Capsule

    cid = register(srv, defended)
    with srv.service.sessions() as s, s.begin():
        s.execute(update(Capsule).where(Capsule.capsule_id == cid).values(defense_policy=None))
    r = srv.service.grant("alice", cid, budget=10, devices=1, expires=None, defenses=["prada:delta=0.5"])
    assert not r["checked"]
    with pytest.raises(E.DefenseGrantError):
        srv.service.grant("alice", str(defended.capsule_path), budget=10, devices=1, expires=None,
                          defenses=["prada:delta=0.5"])
    srv.service.grant("alice", str(defended.capsule_path), budget=10, devices=1, expires=None)
    with pytest.raises(E.DefenseGrantError):  # now known from the file
        srv.service.grant("alice", cid, budget=10, devices=1, expires=None, defenses=["prada:delta=0.5"])


def test_admin_grant_defense_option(db_url: str, provider_files: ProviderFiles, defended: Any,  # noqa: F811
                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCAPSULE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLCAPSULE_SERVER_PROVIDER_KEY_PATH", str(provider_files.key_path))
    db = ["--database-url", db_url]
    assert run_cli("admin", "account", "add", "alice", *db).exit_code == 0
    r = run_cli("admin", "capsule", "add", str(defended.capsule_path), "--key", str(defended.key_path), *db)
    assert r.exit_code == 0, r.output
    r = run_cli("admin", "grant", "alice", str(defended.capsule_path), "--defense", "prada:delta=0.8", *db)
    assert isinstance(r.exception, E.DefenseGrantError), r.output
    assert "loosen prada: delta 0.95 -> 0.8" in str(r.exception)
    r = run_cli("admin", "grant", "alice", str(defended.capsule_path), "--defense", "nope", *db)
    assert isinstance(r.exception, E.DefenseSpecError)
    r = run_cli("admin", "grant", "alice", str(defended.capsule_path), "--budget", "50",
                "--defense", "prada:action=lock", "--defense", "mi-noise:c=0.5", *db)
    assert r.exit_code == 0, r.output
    assert "tightened by this grant" in r.output and "noised" in r.output
    r = run_cli("admin", "usage", "--json", *db)
    assert r.exit_code == 0 and json.loads(r.output) == []


# -- unlock vouchers --------------------------------------------------------------------------
def test_unlock_vouchers_are_numbered_per_device_and_signed(srv: Harness) -> None:
    """Per device, in one sequence with the top-ups (the enclave's voucher counter counts both)."""
    a, _ = provision_license(srv, srv.enclave())
    b, _ = provision_license(srv, srv.enclave())
    pub = srv.provider_pub
    got = []
    for body, reset in ((a, False), (a, True), (b, False), (a, False)):
        env = srv.service.issue_unlock(body["license_id"], reset_detectors=reset)
        u = verify_unlock(env, pub, license_id=body["license_id"], device_id=body["device_id"])
        got.append((body is a, u.seq, u.reset))
    assert got == [(True, 1, False), (True, 2, True), (False, 1, False), (True, 3, False)]
    # A prefix of the license id, and the device named for a check.
    env = srv.service.issue_unlock(b["license_id"][:8], device_id=b["device_id"][:8])
    assert env["type"] == UNLOCK_KIND and env["body"]["seq"] == 2
    with pytest.raises(E.UsageError, match="belongs to device"):
        srv.service.issue_unlock(b["license_id"], device_id=a["device_id"])
    with pytest.raises(E.UsageError, match="no license"):
        srv.service.issue_unlock(str(uuid.uuid4()))
    assert {r["license_id"]: r["unlock_seq"] for r in srv.service.usage()} == {a["license_id"]: 3,
                                                                                b["license_id"]: 2}
    # Unlocks and top-up vouchers share the sequence; only top-ups add to the budget.
    v = verify_voucher(srv.service.issue_voucher(a["license_id"], 10), pub, license_id=a["license_id"],
                       device_id=a["device_id"])
    assert v.seq == 4
    assert srv.service.issue_unlock(a["license_id"])["body"]["seq"] == 5
    row = {r["license_id"]: r for r in srv.service.usage()}[a["license_id"]]
    assert (row["vouchers"], row["unlock_seq"]) == (10, 5)
    srv.service.revoke("alice", srv.files.capsule_id)
    with pytest.raises(E.UsageError, match="revoked"):
        srv.service.issue_unlock(a["license_id"])


def test_verify_unlock_refuses_another_licenses_voucher_and_a_tampered_one(srv: Harness) -> None:
    a, _ = provision_license(srv, srv.enclave())
    b, _ = provision_license(srv, srv.enclave())
    pub = srv.provider_pub
    env = srv.service.issue_unlock(a["license_id"])
    with pytest.raises(E.IntegrityError, match="another license or device"):
        verify_unlock(env, pub, license_id=b["license_id"], device_id=b["device_id"])
    with pytest.raises(E.IntegrityError, match="another license or device"):
        verify_unlock(env, pub, license_id=a["license_id"], device_id=b["device_id"])
    for change in ({"seq": 2}, {"reset": True}, {"license_id": b["license_id"]}):
        tampered = {**env, "body": {**env["body"], **change}}
        with pytest.raises(E.SignatureError):
            verify_unlock(tampered, pub, license_id=tampered["body"]["license_id"], device_id=a["device_id"])
    # Another provider's key, another message type, malformed bodies (validly signed).
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    with pytest.raises(E.SignatureError):
        verify_unlock(Unlock(a["license_id"], a["device_id"], 1).sign(Ed25519PrivateKey.generate()), pub,
                      license_id=a["license_id"], device_id=a["device_id"])
    voucher = srv.service.issue_voucher(a["license_id"], 5)
    assert voucher["body"]["seq"] == 2
    with pytest.raises(E.FormatError, match="expected a unlock/v1"):
        verify_unlock(voucher, pub, license_id=a["license_id"], device_id=a["device_id"])
    key = load_provider_key(srv.files.key_path)
    good = Unlock(a["license_id"], a["device_id"], 1).to_dict()
    for bad in ({**good, "seq": 0}, {**good, "seq": True}, {**good, "seq": "1"}, {**good, "reset": 1},
                {**good, "extra": 1}, {k: v for k, v in good.items() if k != "reset"}):
        with pytest.raises(E.FormatError, match="unlock voucher is malformed"):
            verify_unlock(signed.sign(UNLOCK_KIND, bad, key), pub, license_id=a["license_id"],
                          device_id=a["device_id"])


def test_admin_unlock_command(db_url: str, provider_files: ProviderFiles, platform: Any,  # noqa: F811
                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCAPSULE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLCAPSULE_SERVER_PROVIDER_KEY_PATH", str(provider_files.key_path))
    with harness(db_url, provider_files, platform) as h:
        a, _ = provision_license(h, h.enclave())
        db = ["--database-url", db_url]
        out = tmp_path / "unlock-1.json"
        r = run_cli("admin", "unlock", "--license", a["license_id"][:8], "-o", str(out), *db)
        assert r.exit_code == 0, r.output
        assert "unlock voucher 1" in r.output
        u = verify_unlock(json.loads(out.read_text()), h.provider_pub, license_id=a["license_id"],
                          device_id=a["device_id"])
        assert (u.seq, u.reset) == (1, False)
        r = run_cli("admin", "unlock", "--license", a["license_id"], "--device", a["device_id"],
                    "--reset-detectors", *db)
        assert r.exit_code == 0, r.output
        env = json.loads(r.stdout)
        u = verify_unlock(env, h.provider_pub, license_id=a["license_id"], device_id=a["device_id"])
        assert (u.seq, u.reset) == (2, True)
        r = run_cli("admin", "unlock", "--license", a["license_id"], "--device", "0" * 36, *db)
        assert isinstance(r.exception, E.UsageError)


# -- alarms and defense gaps in the receipts --------------------------------------------------
def test_alarm_and_defense_gap_receipts_reach_the_provider(srv: Harness, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    enc = srv.enclave()
    body, _ = provision_license(srv, enc)
    other, _ = provision_license(srv, srv.enclave())
    lid = body["license_id"]
    receipts = chain(enc, lid, [("setup", {}), ("lease", {}), ("report", {}), ("alarm", ALARM),
                                ("defense-gap", {**GAP, "locked": True}), ("report", {})])
    r = upload(srv, body, receipts[:4])
    assert r.status_code == 200, r.text
    r = upload(srv, body, receipts)  # a retry that repeats what the server holds, then more
    assert r.status_code == 200, r.text
    assert r.json()["seq"] == 6
    rows = {u["license_id"]: u for u in srv.service.usage()}
    row = rows[lid]
    assert (row["alarms"], row["defense_gaps"], row["gap_queries"]) == (2, 1, 7)
    assert row["defense"] == ALARM["defense"]
    assert rows[other["license_id"]]["alarms"] == 0
    alarms = srv.service.alarms()
    assert [(a["detector"], a["query"], a["statistic"], a["threshold"], a["action"], a["receipt"]) for a in alarms] \
        == [("prada", 123, 0.87, 0.9, "lock", 4), ("ood", 130, 41.0, None, "record", 4)]
    assert {a["license_id"] for a in alarms} == {lid} and alarms[0]["account"] == "alice"
    assert alarms[0]["time"] == (T0 + dt.timedelta(minutes=4)).isoformat()
    assert srv.service.alarms(lid[:8]) == alarms and srv.service.alarms(other["license_id"]) == []

    # The same through the CLI, on the same database.
    monkeypatch.setenv("MLCAPSULE_HOME", str(tmp_path / "home"))
    db = ["--database-url", str(srv.engine.url.render_as_string(hide_password=False))]
    r = run_cli("admin", "usage", *db)
    assert r.exit_code == 0 and "alarms" in r.output and "2 +1 gap" in r.output, r.output
    r = run_cli("admin", "usage", "--json", *db)
    by_license = {u["license_id"]: u for u in json.loads(r.output)}
    assert (by_license[lid]["alarms"], by_license[lid]["gap_queries"]) == (2, 7)
    r = run_cli("admin", "alarms", *db)
    assert r.exit_code == 0 and "prada" in r.output and "ood" in r.output and "lock" in r.output, r.output
    r = run_cli("admin", "alarms", "--json", "--license", lid, *db)
    assert [(a["detector"], a["query"]) for a in json.loads(r.output)] == [("prada", 123), ("ood", 130)]
    r = run_cli("admin", "alarms", "--license", other["license_id"], *db)
    assert r.exit_code == 0 and "no alarms" in r.output
    r = run_cli("admin", "alarms", "--license", "abc", *db)
    assert isinstance(r.exception, E.UsageError)


def test_a_forked_chain_repeating_an_alarm_receipt_stores_it_once(srv: Harness) -> None:
    enc = srv.enclave()
    body, _ = provision_license(srv, enc)
    lid = body["license_id"]
    common = chain(enc, lid, [("setup", {}), ("lease", {}), ("alarm", ALARM)])
    stored = common + chain(enc, lid, [("report", {})], seq=4, prev=entry_hash(common[-1]), charged=100,
                            answered=10)
    assert upload(srv, body, stored).status_code == 200
    # An enclave restored to the state after receipt 3 goes on differently and reports a rollback.
    branch = common + chain(enc, lid, [("rollback", {}), ("alarm", ALARM), ("lease", {})], seq=4,
                            prev=entry_hash(common[-1]), charged=100, answered=10)
    r = upload(srv, body, branch)
    assert r.status_code == 200, r.text
    row = srv.service.usage()[0]
    assert (row["forks"], row["alarms"]) == (1, 4)  # receipt 3's two alarms once, receipt 5's two
    assert [a["receipt"] for a in srv.service.alarms()] == [3, 3, 5, 5]


@pytest.mark.parametrize(("kind", "data", "says"), [
    ("alarm", {}, "no list of alarms"),
    ("alarm", {"alarms": []}, "no list of alarms"),
    ("alarm", {"alarms": [{"detector": "prada", "query": 1}]}, "alarm 0 is not an object with"),
    ("alarm", {"alarms": [{**ALARM["alarms"][0], "action": "explode"}]}, "action must be one of"),
    ("alarm", {"alarms": [{**ALARM["alarms"][0], "statistic": "0.5"}]}, "finite numbers or null"),
    ("alarm", {"alarms": [{**ALARM["alarms"][0], "query": -1}]}, "non-negative integer"),
    ("alarm", {"alarms": [{**ALARM["alarms"][0], "query": True}]}, "non-negative integer"),
    ("alarm", {"alarms": [{**ALARM["alarms"][0], "detector": "x" * 65}]}, "detector must be a name"),
    ("alarm", {"alarms": ALARM["alarms"], "defense": [1]}, "summary is not an object"),
    ("alarm", {"alarms": [ALARM["alarms"][0]] * 1001}, "at most 1000"),
    ("defense-gap", {"queries": 3}, "reason"),
    ("defense-gap", {"queries": -3, "reason": "crash"}, "reason"),
    ("defense-gap", {"queries": 3, "reason": "tuesday"}, "reason"),
])
def test_a_malformed_alarm_receipt_is_a_422_naming_it(srv: Harness, kind: str, data: dict[str, Any],
                                                     says: str) -> None:
    enc = srv.enclave()
    body, _ = provision_license(srv, enc)
    receipts = chain(enc, body["license_id"], [("setup", {}), ("lease", {}), (kind, data)])
    r = upload(srv, body, receipts)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "FormatError"
    assert f"receipt 3 ({kind}) is malformed" in err["message"] and says in err["message"], err["message"]
    row = srv.service.usage()[0]
    assert (row["receipts"], row["alarms"], row["defense_gaps"]) == (0, 0, 0)  # nothing of it was stored
    assert upload(srv, body, receipts[:2]).status_code == 200  # the good part alone is accepted


def test_receipts_of_an_unknown_kind_are_refused_clearly(srv: Harness) -> None:
    enc = srv.enclave()
    body, _ = provision_license(srv, enc)
    r = upload(srv, body, chain(enc, body["license_id"], [("setup", {}), ("telemetry", {})]))
    assert r.status_code == 409 and r.json()["error"]["type"] == "IntegrityError"


# -- the license's policy field ---------------------------------------------------------------
def test_license_policy_is_checked_and_old_licenses_still_verify(provider_files: ProviderFiles) -> None:  # noqa: F811
    import os

    key = load_provider_key(provider_files.key_path)
    base = dict(license_id="l", capsule_id=uuid.uuid4(), version=1, device_id="d", account="a",
                receipt_key=os.urandom(32), budget=5, expires=None, issued=T0)
    old = License(**base)  # type: ignore[arg-type]
    assert old.to_dict()["policy"] == {}
    lic = verify_license(old.sign(key), key.public_key(), capsule_id=base["capsule_id"], version=1)
    assert lic.policy == {} and lic.defenses == []
    env = License(**base, policy={"defenses": ["round:2"]}).sign(key)  # type: ignore[arg-type]
    assert verify_license(env, key.public_key(), capsule_id=base["capsule_id"], version=1).defenses == ["round:2"]
    for bad in ({"defenses": "round:2"}, {"defenses": [2]}, {"defenses": ["round:2"] * 33},
                {"defenses": ["x" * 257]}, {"defenses": [""]}, {"defenses": None}):
        body = {**old.to_dict(), "policy": bad}
        with pytest.raises(E.FormatError, match="policy.defenses"):
            verify_license(signed.sign("license/v1", body, key), key.public_key(), capsule_id=base["capsule_id"],
                           version=1)
        with pytest.raises(E.FormatError):
            License(**base, policy=bad)  # type: ignore[arg-type]


# -- the schema -------------------------------------------------------------------------------
def test_revision_0004_carries_a_server_forward_and_back(srv: Harness) -> None:
    """A server of revision 0003 with a device upgrades to 0004 (counters 0, no alarms, no grant
    defenses, the capsule's policy unknown), and 0004 downgrades cleanly."""
    from alembic import command

    from mlcapsule.server.db import alembic_config, migrate, schema_revisions

    enc = srv.enclave()
    body, _ = provision_license(srv, enc)
    assert upload(srv, body, chain(enc, body["license_id"], [("setup", {}), ("lease", {}), ("alarm", ALARM)])) \
        .status_code == 200
    with srv.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0003")
    assert schema_revisions(srv.engine)[0] == "0003"
    assert migrate(srv.engine) == schema_revisions(srv.engine)[1] >= "0004"  # the head: 0004 and any later
    (row,) = srv.service.usage()
    assert (row["receipts"], row["alarms"], row["defense_gaps"], row["unlock_seq"], row["defense"]) \
        == (3, 0, 0, 0, None)
    r = srv.service.grant("alice", srv.files.capsule_id, budget=5, devices=2, expires=None, defenses=["round:2"])
    assert not r["checked"]  # the capsule's policy was forgotten with the column
    assert srv.service.issue_unlock(body["license_id"])["body"]["seq"] == 1


def test_unlock_and_defense_receipts_after_an_unlock_are_accepted(srv: Harness) -> None:
    """What the enclave writes when it applies unlock voucher n: ``unlock`` then ``defense``
    (the counters after it), which become the device's latest defense counters."""
    enc = srv.enclave()
    body, _ = provision_license(srv, enc)
    seq = srv.service.issue_unlock(body["license_id"], reset_detectors=True)["body"]["seq"]
    after = {"unlocked": seq, "queries": 131, "locked": False, "alarms": {"prada": 1}}
    r = upload(srv, body, chain(enc, body["license_id"], [
        ("setup", {}), ("lease", {}), ("alarm", ALARM), ("unlock", {"seq": seq, "reset_detectors": True}),
        ("defense", after)]))
    assert r.status_code == 200, r.text
    row = srv.service.usage()[0]
    assert (row["alarms"], row["defense"], row["unlock_seq"]) == (2, after, 1)


# -- end to end: a real enclave, a real server ------------------------------------------------
def test_a_locked_device_is_seen_and_unlocked_by_the_provider_end_to_end(
        tmp_path: Path, provider_files: ProviderFiles, platform: Any) -> None:  # noqa: F811
    """An out-of-distribution stream locks a real enclave; after `sync` the provider sees the
    alarm, issues an unlock voucher, the client applies it with `topup`, and the next `sync`
    brings the unlock's receipts and counters."""
    import numpy as np

    import mlcapsule
    from _server_support import serve_in_thread
    from mlcapsule.demo.models import digits_classifier
    from mlcapsule.enclave.format.trust import UnsafeTrustManifestKey

    model, info = digits_classifier()
    packed = mlcapsule.pack(model, tmp_path / "digits.capsule", provider_key=provider_files.key_path, name="digits",
                            defenses=["ood:action=lock"], defense_data=info["x_train"])
    db = f"sqlite:///{tmp_path / 'server.db'}"
    with harness(db, provider_files, platform) as h, serve_in_thread(h.app) as url:
        cid = register(h, packed)
        h.service.grant("alice", cid, budget=10_000, devices=1, expires=None, defenses=["round:3"])
        state = tmp_path / "state"

        def open_capsule() -> Any:
            return mlcapsule.open_capsule(packed.capsule_path, trust=UnsafeTrustManifestKey(), state_dir=state,
                                          platform_dir=platform.dir)

        uniform = np.random.default_rng(2).uniform(0, 16, (200, 64)).astype(np.float32)
        with open_capsule() as cap:
            cap.setup(token=h.token, server=url)
            with pytest.raises(E.DefenseLockedError):
                for row in uniform:
                    cap.predict(row[None])
            cap.sync(token=h.token, server=url)
        (row,) = h.service.usage()
        assert row["alarms"] >= 1 and row["defenses"] == ["round:3"] and row["defense"]["locked"] is True
        alarm = h.service.alarms(row["license_id"])[0]
        assert (alarm["detector"], alarm["action"]) == ("ood", "lock")
        unlock = h.service.issue_unlock(row["license_id"], reset_detectors=True)
        benign = np.ascontiguousarray(info["x_test"][:1], dtype=np.float32)
        with open_capsule() as cap:
            cap.topup(unlock)
            out = cap.predict(benign)
            assert np.allclose(np.asarray(out).ravel(), np.round(np.asarray(out).ravel(), 3))  # the grant's round:3
            cap.sync(token=h.token, server=url)
        (after,) = h.service.usage()
        assert after["defense"]["locked"] is False and after["defense"]["unlocked"] == unlock["body"]["seq"]
