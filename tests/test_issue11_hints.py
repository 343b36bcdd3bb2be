"""Issue 11, items 7 and 12: every hint names the real cause and a safe next step (one test per
case, each asserting the message), and the server commands name the passphrase variable they read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlcapsule.cli.main import main
from mlcapsule.enclave.crypto.keys import generate_provider_key

from conftest import assert_one_line_error

from _server_support import (db_url, harness, pg_server, pg_url, platform, provider_files,  # noqa: F401
                             serve_in_thread)


@pytest.fixture
def device(tmp_path, provider_files, platform, mlcapsule_home):  # noqa: F811
    """A device set up with the CLI against a real server on loopback (grant of 3 devices)."""
    db = f"sqlite:///{tmp_path / 'server.db'}"
    with harness(db, provider_files, platform, budget=1000, devices=3) as h, serve_in_thread(h.app) as url:
        assert main(["setup", str(provider_files.capsule_path), "--token", h.token, "--server", url]) == 0
        yield {"capsule": str(provider_files.capsule_path), "h": h, "url": url, "home": mlcapsule_home, "db": db}


def _err(capsys) -> str:
    return assert_one_line_error(capsys.readouterr().err)


# -- item 12 ------------------------------------------------------------------------------------
def test_fake_png_error_names_the_cause_without_a_python_repr(tmp_path, capsys):
    from mlcapsule.enclave.errors import InputError
    from mlcapsule.io import Preprocessing, load_inputs

    (tmp_path / "fake.png").write_text("this is not an image\n")
    prep = Preprocessing(kind="image", image_size=(4, 4), channels=1, layout="flat")
    with pytest.raises(InputError) as e:
        load_inputs([tmp_path / "fake.png"], prep, ["N", 16])
    text = e.value.diagnostics()
    assert "object at 0x" not in text and "<" not in text, text
    assert "not a PNG or JPEG image" in text and "check that it is a PNG or JPEG image" in e.value.hint


def test_voucher_for_another_license_says_so(device, tmp_path, capsys):
    h = device["h"]
    # A second device of the same account, set up in its own state folder: its genuine voucher
    # does not belong to the first device's license.
    other_state = tmp_path / "other-state"
    assert main(["setup", device["capsule"], "--token", h.token, "--server", device["url"],
                 "--state-dir", str(other_state)]) == 0
    ids = {r["license_id"] for r in h.service.usage()}
    capsys.readouterr()
    assert main(["status", device["capsule"], "--json"]) == 0
    mine = json.loads(capsys.readouterr().out)["license_status"]["license_id"]
    (theirs,) = ids - {mine}
    (tmp_path / "v.json").write_text(json.dumps(h.service.issue_voucher(theirs, 50)))
    assert main(["topup", device["capsule"], str(tmp_path / "v.json")]) == 2
    line = _err(capsys)
    assert f"voucher for license {theirs}, not for this device's license {mine}" in line, line
    assert "modified or damaged" not in line and "nothing was redeemed" in line


def test_packing_a_text_file_says_it_is_not_an_onnx_model(tmp_path, capsys, provider_key):
    (tmp_path / "notes.txt").write_text("my notes\n")
    rc = main(["pack", str(tmp_path / "notes.txt"), "-o", str(tmp_path / "n.capsule"), "--key", str(provider_key.path)])
    line = _err(capsys)
    assert rc == 2, line
    assert "notes.txt is not an ONNX model" in line and "fetch it again from the provider" not in line, line
    assert "exported from your framework" in line
    assert not (tmp_path / "n.capsule").exists()


def test_truncated_sealed_state_says_damaged_and_restore_never_setup_again(device, capsys):
    (state,) = device["home"].rglob("state.sealed")
    state.write_bytes(state.read_bytes()[:60])
    rc = main(["status", device["capsule"]])
    line = _err(capsys)
    assert rc == 4, line
    assert "is damaged, truncated" in line and "restore state.sealed from a backup, or contact the provider" in line
    # The only step that spends a device slot is named as such, never offered bare.
    assert "run setup again" not in line
    assert "use one more device slot" in line


def test_voucher_with_a_short_prefix_says_prefix_too_short(device, tmp_path, capsys):
    lic = device["h"].service.usage()[0]["license_id"]
    rc = main(["admin", "voucher", lic[:4], "--queries", "5", "-o", str(tmp_path / "v.json"),
               "--database-url", device["db"], "--provider-key", str(device["h"].files.key_path)])
    line = _err(capsys)
    assert rc == 2, line
    assert f"license id prefix '{lic[:4]}' is too short (at least 8 characters)" in line, line
    assert "no license" not in line
    # A long enough prefix works.
    assert main(["admin", "voucher", lic[:8], "--queries", "5", "-o", str(tmp_path / "v.json"),
                 "--database-url", device["db"], "--provider-key", str(device["h"].files.key_path)]) == 0


# -- item 7 ---------------------------------------------------------------------------------------
@pytest.fixture
def encrypted_key(tmp_path):
    key = tmp_path / "provider-key.pem"
    generate_provider_key(key, passphrase=b"s3cret")
    return key


def _server_cmd(args, tmp_path, **env):
    import os

    e = {k: v for k, v in os.environ.items() if not k.startswith("MLCAPSULE_SERVER_") and k != "MLCAPSULE_PASSPHRASE"}
    e.update(env)
    return subprocess.run([sys.executable, "-m", "mlcapsule", *args], capture_output=True, text=True, timeout=120,
                          env=e, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("command", ["serve", "voucher"])
def test_server_commands_name_the_passphrase_variable_they_read(command, encrypted_key, tmp_path):
    db = f"sqlite:///{tmp_path / 'server.db'}"
    args = (["serve", "--port", "0"] if command == "serve"
            else ["admin", "voucher", "0123456789abcdef", "--queries", "5", "-o", str(tmp_path / "v.json")])
    args += ["--database-url", db, "--provider-key", str(encrypted_key)]
    p = _server_cmd(args, tmp_path)
    assert p.returncode == 5, p.stderr
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")][0]
    assert "MLCAPSULE_SERVER_PASSPHRASE" in line and "MLCAPSULE_PASSPHRASE " not in line + " ", line
    # Following the hint works: with the variable it names, the key opens (the voucher command
    # then goes on to the next problem: there is no such license).
    if command == "voucher":
        q = _server_cmd(args, tmp_path, MLCAPSULE_SERVER_PASSPHRASE="s3cret")
        assert q.returncode == 2 and "no license" in q.stderr, q.stderr
    # And the variable the old hint named does not open it (which is why the hint was wrong).
    r = _server_cmd(args, tmp_path, MLCAPSULE_PASSPHRASE="s3cret")
    assert r.returncode == 5


def test_wrong_server_passphrase_hint_names_the_server_sources(encrypted_key, tmp_path):
    db = f"sqlite:///{tmp_path / 'server.db'}"
    p = _server_cmd(["admin", "voucher", "0123456789abcdef", "--queries", "5", "-o", str(tmp_path / "v.json"),
                     "--database-url", db, "--provider-key", str(encrypted_key)], tmp_path,
                    MLCAPSULE_SERVER_PASSPHRASE="wrong")
    assert p.returncode == 5
    assert "wrong passphrase" in p.stderr and "MLCAPSULE_SERVER_PASSPHRASE" in p.stderr, p.stderr
