"""The admin HTTP API (/v1/admin/...) and `mlcapsule admin --server`, on SQLite and PostgreSQL.

Role by role, every endpoint the OpenAPI spec lists is called: a ``read`` token may call the GETs
and nothing else, an ``operator`` token everything. Account tokens never open an admin endpoint
and admin tokens never open a client endpoint. The command line against a real server on
loopback prints what it prints on the local database.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from _server_support import (  # noqa: F401
    Harness,
    ProviderFiles,
    db_url,
    harness,
    pg_server,
    pg_url,
    platform,
    provider_files,
    serve_in_thread,
)
from mlcapsule import errors as E
from mlcapsule.cli.main import cli
from mlcapsule.enclave.crypto.keys import load_provider_key
from mlcapsule.enclave.messages.voucher import verify_voucher
from mlcapsule.server.admin_api import AdminTokens
from mlcapsule.server.db import AdminToken


@pytest.fixture
def srv(db_url: str, provider_files: ProviderFiles, platform: Any) -> Any:  # noqa: F811
    with harness(db_url, provider_files, platform) as h:
        yield h


def tokens(h: Harness) -> tuple[str, str]:
    t = AdminTokens(h.service)
    _, read = t.create("reader", "read")
    _, op = t.create("ops", "operator")
    return read, op


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def provisioned(h: Harness) -> dict[str, Any]:
    enc = h.enclave()
    r = h.provision(enc)
    assert r.status_code == 200, r.text
    body = r.json()
    receipts = enc.chain(body["license_id"], 5)
    up = h.client.post("/v1/usage", json={"protocol": 2, "license_id": body["license_id"],
                                          "device_id": body["device_id"], "receipts": receipts[:3]},
                       headers=h.auth())
    assert up.status_code == 200, up.text
    return {**body, "later_receipts": receipts}


def admin_paths(h: Harness) -> list[tuple[str, str]]:
    spec = h.client.get("/openapi.json").json()
    return sorted((m.upper(), p) for p, ops in spec["paths"].items() if p.startswith("/v1/admin/") for m in ops)


def operator_calls(h: Harness, lic: dict[str, Any]) -> dict[tuple[str, str], tuple[dict[str, Any] | None, str]]:
    """A valid body (and concrete path) for every state-changing endpoint."""
    f = h.files
    return {
        ("POST", "/v1/admin/accounts"): ({"name": "bob"}, "/v1/admin/accounts"),
        ("POST", "/v1/admin/capsules"): ({"capsule": base64.b64encode(f.capsule_path.read_bytes()).decode(),
                                          "key": base64.b64encode(f.content_key_path.read_bytes()).decode()},
                                         "/v1/admin/capsules"),
        ("POST", "/v1/admin/grants"): ({"account": "alice", "capsule": f"{f.capsule_id}:{f.version}", "budget": 700,
                                        "devices": 3}, "/v1/admin/grants"),
        ("POST", "/v1/admin/vouchers"): ({"license_id": lic["license_id"], "queries": 50}, "/v1/admin/vouchers"),
        ("POST", "/v1/admin/unlocks"): ({"license_id": lic["license_id"]}, "/v1/admin/unlocks"),
        ("POST", "/v1/admin/receipts"): ({"license_id": lic["license_id"], "device_id": lic["device_id"],
                                          "receipts": []}, "/v1/admin/receipts"),
        ("POST", "/v1/admin/tokens"): ({"name": "ci", "role": "read"}, "/v1/admin/tokens"),
        ("GET", "/v1/admin/tokens"): (None, "/v1/admin/tokens"),
        ("DELETE", "/v1/admin/tokens/{name}"): (None, "/v1/admin/tokens/ci"),
        ("POST", "/v1/admin/revocations"): ({"account": "alice", "capsule": f.capsule_id}, "/v1/admin/revocations"),
    }


READS = {("GET", p) for p in ("/v1/admin/accounts", "/v1/admin/capsules", "/v1/admin/grants", "/v1/admin/usage",
                               "/v1/admin/alarms")}


def test_each_role_can_do_exactly_what_it_should(srv: Harness) -> None:
    read, op = tokens(srv)
    lic = provisioned(srv)
    calls = operator_calls(srv, lic)
    paths = admin_paths(srv)
    assert set(paths) == READS | set(calls), "a new admin endpoint needs its row in this test"

    for method, path in sorted(READS):
        r = srv.client.request(method, path, headers=auth(read))
        assert r.status_code == 200, (path, r.text)
    for (method, _), (body, path) in calls.items():  # read may change nothing, nor see the tokens
        r = srv.client.request(method, path, json=body, headers=auth(read))
        assert (r.status_code, r.json()["error"]["type"]) == (403, "PolicyError"), (path, r.text)
    assert [a["name"] for a in srv.service.list_accounts()] == ["alice"]
    assert srv.service.usage()[0]["vouchers"] == 0

    order = ["/v1/admin/accounts", "/v1/admin/capsules", "/v1/admin/grants", "/v1/admin/vouchers",
             "/v1/admin/unlocks", "/v1/admin/receipts", "/v1/admin/tokens", "/v1/admin/tokens",
             "/v1/admin/tokens/ci", "/v1/admin/revocations"]
    done = {}
    for (method, _), (body, path) in sorted(calls.items(), key=lambda kv: order.index(kv[1][1])):
        r = srv.client.request(method, path, json=body, headers=auth(op))
        assert r.status_code in (200, 201), (method, path, r.text)
        done[(method, path)] = r.json()
    for method, path in sorted(READS):
        assert srv.client.request(method, path, headers=auth(op)).status_code == 200
    # ... and each call did what the command line does.
    assert done[("POST", "/v1/admin/accounts")]["token"].startswith("mlc_")
    assert done[("POST", "/v1/admin/capsules")]["new"] is False  # the harness registered it already
    assert {a["name"] for a in srv.service.list_accounts()} == {"alice", "bob"}
    pub = load_provider_key(srv.files.key_path).public_key()
    v = verify_voucher(done[("POST", "/v1/admin/vouchers")], pub, license_id=lic["license_id"],
                       device_id=lic["device_id"])
    assert (v.seq, v.queries) == (1, 50)
    assert done[("POST", "/v1/admin/unlocks")]["body"]["seq"] == 2
    assert done[("POST", "/v1/admin/receipts")]["seq"] == 3
    assert done[("DELETE", "/v1/admin/tokens/ci")]["revoked_at"] is not None
    (row,) = srv.service.usage()
    assert (row["vouchers"], row["revoked"], row["unlock_seq"]) == (50, True, 2)
    (g,) = [g for g in srv.client.get("/v1/admin/grants", headers=auth(read)).json()]
    assert (g["budget"], g["devices"], g["revoked"], g["devices_provisioned"]) == (700, 3, True, 1)


def test_client_token_refused_on_every_admin_endpoint(srv: Harness) -> None:
    read, op = tokens(srv)
    for method, path in admin_paths(srv):
        path = path.replace("{name}", "ops")
        for headers in (srv.auth(), {}, auth("mlca_" + "x" * 43)):
            r = srv.client.request(method, path, json={}, headers=headers)
            assert (r.status_code, r.json()["error"]["type"]) == (401, "ServerError"), (path, headers, r.text)
    assert [t["name"] for t in AdminTokens(srv.service).rows()] == ["ops", "reader"]


def test_admin_token_refused_on_client_endpoints(srv: Harness) -> None:
    read, op = tokens(srv)
    enc = srv.enclave()
    nonce = srv.nonce()
    for token in (read, op):
        assert srv.challenge(token).status_code == 401
        r = srv.client.post("/v1/provision", json=enc.provision_body(srv.files.capsule_id, 1, nonce),
                            headers=auth(token))
        assert r.status_code == 401, r.text
        r = srv.client.post("/v1/usage", json={"protocol": 2, "license_id": "x", "device_id": "y", "receipts": []},
                            headers=auth(token))
        assert r.status_code == 401, r.text
    assert srv.provision(enc, nonce).status_code == 200  # the nonce was never touched by them


def test_admin_tokens_stored_hashed_and_revocable(srv: Harness) -> None:
    read, op = tokens(srv)
    with srv.service.sessions() as s:
        rows = {t.name: t for t in s.scalars(select(AdminToken))}
    assert rows["ops"].token_hash == hashlib.sha256(op.encode()).hexdigest() and rows["ops"].role == "operator"
    dump = json.dumps([[t.name, t.role, t.token_hash] for t in rows.values()])
    assert op not in dump and read not in dump
    assert srv.client.get("/v1/admin/usage", headers=auth(read)).status_code == 200
    AdminTokens(srv.service).revoke("reader")
    assert srv.client.get("/v1/admin/usage", headers=auth(read)).status_code == 401
    with pytest.raises(E.UsageError):
        AdminTokens(srv.service).create("ops", "read")  # names are unique
    with pytest.raises(E.UsageError):
        AdminTokens(srv.service).create("root", "admin")  # two roles only


def test_admin_api_never_opens_a_path_on_the_servers_disk(srv: Harness) -> None:
    _, op = tokens(srv)
    for ref in (str(srv.files.capsule_path), "../../etc/passwd", f"{srv.files.capsule_id}:1:2"):
        r = srv.client.post("/v1/admin/grants", json={"account": "alice", "capsule": ref}, headers=auth(op))
        assert (r.status_code, r.json()["error"]["type"]) == (422, "UsageError"), r.text


def test_openapi_describes_the_admin_api(srv: Harness) -> None:
    spec = srv.client.get("/openapi.json").json()
    assert {"/v1/admin/accounts", "/v1/admin/grants", "/v1/admin/usage", "/v1/admin/alarms",
            "/v1/admin/vouchers", "/v1/admin/tokens"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert {"GrantRequest", "GrantResult", "UsageRow", "AlarmRow", "SignedEnvelope", "TokenCreate"} <= set(schemas)
    assert "AdminToken" in spec["components"]["securitySchemes"]
    post = spec["paths"]["/v1/admin/grants"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/GrantRequest")
    assert post["security"] == [{"AdminToken": []}]


# -- the command line, local and remote --------------------------------------------------------
def run(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=True, env=env)


def test_remote_cli_prints_what_the_local_cli_prints(db_url: str, provider_files: ProviderFiles,  # noqa: F811
                                                     platform: Any, tmp_path: Path,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCAPSULE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLCAPSULE_SERVER_PROVIDER_KEY_PATH", str(provider_files.key_path))
    monkeypatch.delenv("MLCAPSULE_ADMIN_TOKEN", raising=False)
    local = ["--database-url", db_url]
    with harness(db_url, provider_files, platform) as h, serve_in_thread(h.app) as url:
        r = run("admin", "token", "create", "--role", "operator", "--name", "ops", *local)
        assert r.exit_code == 0, r.output
        op = r.output.strip().splitlines()[-1]
        assert op.startswith("mlca_")
        r = run("admin", "token", "create", "--role", "read", "--name", "auditor", *local)
        read = r.output.strip().splitlines()[-1]
        remote = ["--server", url, "--admin-token", op]

        # Changes made remotely land in the server's database.
        r = run("admin", *remote, "account", "add", "bob")
        assert r.exit_code == 0 and "account bob created" in r.output, r.output
        bob = r.output.strip().splitlines()[-1]
        assert bob.startswith("mlc_") and h.client.post("/v1/challenge", json={"capsule_id": h.files.capsule_id,
                                                                               "version": 1},
                                                        headers=h.auth(bob)).status_code == 403  # no grant yet
        r = run("admin", *remote, "grant", "bob", str(provider_files.capsule_path), "--budget", "40", "--devices", "2",
                "--defense", "round:2")
        assert r.exit_code == 0 and "granted: bob may provision 2 device(s)" in r.output, r.output
        r = run("admin", *remote, "capsule", "add", str(provider_files.capsule_path), "--key",
                str(provider_files.content_key_path))
        assert r.exit_code == 0 and "already registered: tiny" in r.output, r.output
        lic = provisioned(h)
        out = tmp_path / "v.json"
        r = run("admin", *remote, "voucher", lic["license_id"][:8], "--queries", "25", "-o", str(out))
        assert r.exit_code == 0, r.output
        v = verify_voucher(json.loads(out.read_text()), h.provider_pub, license_id=lic["license_id"],
                           device_id=lic["device_id"])
        assert (v.seq, v.queries) == (1, 25)
        r = run("admin", *remote, "unlock", "--license", lic["license_id"], "--reset-detectors")
        assert r.exit_code == 0 and json.loads(r.stdout)["body"]["reset"] is True, r.output
        report = tmp_path / "receipts.json"
        report.write_text(json.dumps({k: lic[k] for k in ("license_id", "device_id")}
                                     | {"receipts": lic["later_receipts"]}))
        r = run("admin", *remote, "import-receipts", str(report))
        assert r.exit_code == 0 and "chain at 5, 120 queries answered, 200 charged" in r.output, r.output
        assert r.output == run("admin", "import-receipts", str(report), *local).output  # again: nothing new
        r = run("admin", *remote, "revoke", "bob", h.files.capsule_id)
        assert r.exit_code == 0 and "revoked: bob" in r.output, r.output

        # Every listing, table and JSON, is the same from the database and from the server.
        for cmd in (["account", "list"], ["capsule", "list"], ["grants"], ["usage"], ["alarms"], ["token", "list"],
                    ["alarms", "--license", lic["license_id"][:8]]):
            for fmt in ([], ["--json"]):
                a = run("admin", *cmd, *fmt, *local)
                b = run("admin", *remote, *cmd, *fmt)
                assert a.exit_code == 0 and b.exit_code == 0, (cmd, a.output, b.output)
                assert a.output == b.output, (cmd, fmt)
        # A read token reads, with the token from the environment, and changes nothing.
        env = {"MLCAPSULE_ADMIN_TOKEN": read}
        assert run("admin", "--server", url, "usage", "--json", env=env).output == run(
            "admin", "usage", "--json", *local).output
        r = run("admin", "--server", url, "account", "add", "carol", env=env)
        assert isinstance(r.exception, E.PolicyError) and "may only read" in str(r.exception)
        r = run("admin", "--server", url, "usage", env={"MLCAPSULE_ADMIN_TOKEN": bob})
        assert isinstance(r.exception, E.ServerError) and "admin token is not valid" in str(r.exception)
        r = run("admin", "--server", url, "usage")
        assert isinstance(r.exception, E.UsageError) and "admin token" in str(r.exception)
        r = run("admin", *remote, "usage", *local)
        assert isinstance(r.exception, E.UsageError)
        r = run("admin", *remote, "token", "revoke", "auditor")
        assert r.exit_code == 0 and "revoked" in r.output
        r = run("admin", "--server", url, "usage", env=env)
        assert isinstance(r.exception, E.ServerError)
