"""Issue 11, item 16 (output that is not a terminal is machine-friendly: --json on every command
that prints a table, nothing wrapped or cut) and the provider's way in for exported receipts
(`mlcapsule admin import-receipts FILE`, the same checks as POST /v1/usage)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from mlcapsule.cli.main import main

from conftest import cli_env, mlcapsule_exe

from _server_support import (db_url, harness, pg_server, pg_url, platform, provider_files,  # noqa: F401
                             serve_in_thread)

LONG_ACCOUNT = "hospital-a.radiology.department-of-medical-imaging.example.org"


@pytest.fixture
def device(tmp_path, provider_files, platform, mlcapsule_home):  # noqa: F811
    db = f"sqlite:///{tmp_path / 'server.db'}"
    with harness(db, provider_files, platform, budget=1000, devices=3) as h, serve_in_thread(h.app) as url:
        _, token = h.service.add_account(LONG_ACCOUNT)
        h.service.grant(LONG_ACCOUNT, provider_files.capsule_id, budget=1000, devices=3, expires=None)
        assert main(["setup", str(provider_files.capsule_path), "--token", token, "--server", url]) == 0
        yield {"capsule": str(provider_files.capsule_path), "h": h, "url": url, "db": db, "token": token,
               "key": str(provider_files.key_path)}


#: Every command that prints a table, with the arguments it needs (filled in from the fixture).
TABLE_COMMANDS = {
    "status": lambda d: ["status", d["capsule"]],
    "status (no capsule)": lambda d: ["status"],
    "inspect": lambda d: ["inspect", d["capsule"]],
    "admin usage": lambda d: ["admin", "usage", "--database-url", d["db"]],
    "admin account list": lambda d: ["admin", "account", "list", "--database-url", d["db"]],
    "admin capsule list": lambda d: ["admin", "capsule", "list", "--database-url", d["db"]],
    "admin alarms": lambda d: ["admin", "alarms", "--database-url", d["db"]],
    "admin grants": lambda d: ["admin", "grants", "--database-url", d["db"]],
    "admin token list": lambda d: ["admin", "token", "list", "--database-url", d["db"]],
}


def _table_commands() -> set[str]:
    """The commands whose source builds a rich Table: the list above must name them all."""
    import inspect as pyinspect

    import click

    from mlcapsule.cli.main import cli

    found = set()

    def walk(group: click.Group, prefix: str) -> None:
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                walk(cmd, f"{prefix}{name} ")
            elif cmd.callback is not None and "Table(" in pyinspect.getsource(cmd.callback):
                found.add(f"{prefix}{name}")

    walk(cli, "")
    return found


def test_every_command_that_prints_a_table_is_listed_here():
    assert _table_commands() <= {k.split(" (")[0] for k in TABLE_COMMANDS}, _table_commands()


@pytest.mark.parametrize("name", sorted(TABLE_COMMANDS))
def test_every_table_command_has_json(device, name, capsys):
    args = TABLE_COMMANDS[name](device)
    capsys.readouterr()
    assert main([*args, "--json"]) == 0, capsys.readouterr().err
    data = json.loads(capsys.readouterr().out)
    assert data or name in ("admin alarms", "admin token list"), name  # no alarm, no admin token: empty lists
    if name in ("admin alarms", "admin token list"):
        assert data == []
    if name == "admin usage":
        assert {r["account"] for r in data} == {LONG_ACCOUNT}
    if name == "admin capsule list":
        assert data[0]["capsule_id"] == device["h"].files.capsule_id and data[0]["devices"] == 1
    if name == "admin account list":
        assert {r["name"] for r in data} == {"alice", LONG_ACCOUNT}


def test_piped_admin_usage_keeps_whole_names_and_ids(device, tmp_path):
    """Through a pipe, at COLUMNS=80: one line per device, the account name, device and license
    ids whole (not wrapped, not cut, not shortened)."""
    (row,) = device["h"].service.usage()
    p = subprocess.run([mlcapsule_exe(), "admin", "usage", "--database-url", device["db"]], capture_output=True,
                       text=True, timeout=120, env=cli_env(tmp_path / "home", COLUMNS="80"), stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    (line,) = [ln for ln in p.stdout.splitlines() if LONG_ACCOUNT in ln]
    assert row["license_id"] in line and row["device_id"] in line, p.stdout
    # And --json through a pipe is one parseable document.
    q = subprocess.run([mlcapsule_exe(), "admin", "usage", "--json", "--database-url", device["db"]],
                       capture_output=True, text=True, timeout=120, env=cli_env(tmp_path / "home", COLUMNS="80"),
                       stdin=subprocess.DEVNULL)
    assert json.loads(q.stdout)[0]["license_id"] == row["license_id"]


# -- exported receipts reach the provider ---------------------------------------------------------
def test_exported_receipts_are_imported_through_the_usage_checks(device, tmp_path, capsys):
    h, cap = device["h"], device["capsule"]
    np.save(tmp_path / "x.npy", np.ones((30, 4), np.float32))
    assert main(["predict", cap, str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")]) == 0
    (old,) = h.service.usage()
    assert old["answered"] == 0  # nothing synced yet
    export = tmp_path / "receipts.json"
    assert main(["setup", cap, "--token", device["token"], "--server", device["url"], "--replace",
                 "--export-receipts", str(export)]) == 0
    report = json.loads(export.read_text())
    assert report["license_id"] == old["license_id"]

    # A receipt altered in the file is refused, and nothing is recorded.
    bad = json.loads(export.read_text())
    bad["receipts"][-1]["body"]["answered"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    capsys.readouterr()
    assert main(["admin", "import-receipts", str(tmp_path / "bad.json"), "--database-url", device["db"]]) != 0
    assert "error:" in capsys.readouterr().err
    assert {r["license_id"]: r for r in h.service.usage()}[old["license_id"]]["answered"] == 0

    assert main(["admin", "import-receipts", str(export), "--database-url", device["db"]]) == 0
    out = capsys.readouterr().out
    assert f"account {LONG_ACCOUNT}" in out and old["license_id"] in out
    rows = {r["license_id"]: r for r in h.service.usage()}
    assert rows[old["license_id"]]["answered"] == 30 and rows[old["license_id"]]["charged"] >= 30
    # Importing the same file again changes nothing (receipts already held are skipped).
    assert main(["admin", "import-receipts", str(export), "--database-url", device["db"]]) == 0
    assert {r["license_id"]: r for r in h.service.usage()}[old["license_id"]] == rows[old["license_id"]]


def test_import_refuses_a_file_that_is_not_a_usage_report(device, tmp_path, capsys):
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    capsys.readouterr()
    assert main(["admin", "import-receipts", str(tmp_path / "x.json"), "--database-url", device["db"]]) == 2
    assert "not a usage report" in capsys.readouterr().err
