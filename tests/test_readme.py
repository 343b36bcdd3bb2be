"""The README's code runs as printed (issue 11, item 9).

Which blocks run:

* every ```python block of README.md, in order, each as its own script (``python block.py``) in
  one temporary folder, against a real provider server on loopback. Between them the test does
  what the README says the provider does by hand: after block 1 it registers the capsule, creates
  an account and a grant (the `admin` commands, through ``ProviderService``); after block 2 it
  issues a voucher into ``topup-1.json`` (``mlcapsule admin voucher``).
* Substitution, the only change made to a block: a line that assigns ``TOKEN = ...`` or
  ``SERVER = ...`` at the start of a line (the README marks them "yours") is rebound to this
  test's token and server URL. Block 3 defines no ``SERVER``: its ``sync`` must find the server
  that setup remembered.

Not run here: the ```bash blocks (the CLI reference lists options in ``[brackets]`` and
placeholders like ``LICENSE_ID``; the same provider and client CLI flow runs end to end in
tests/test_e2e.py, and `scripts/demo.sh` in CI), and the ```toml example.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from mlcapsule.enclave.crypto.keys import load_provider_key, raw_public
from mlcapsule.enclave.measurement import measurement

from conftest import REPO, cli_env

from _server_support import serve_in_thread

PLACEHOLDER = re.compile(r"^(TOKEN|SERVER) = .*$", re.M)


def readme_blocks(lang: str) -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def _fill(block: str, values: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: f"{m.group(1)} = {values[m.group(1)]!r}", block)


def _run(block: str, cwd: Path, home: Path) -> str:
    script = cwd / "block.py"
    script.write_text(block)
    p = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env=cli_env(home), stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"README block failed ({p.returncode}):\n{block}\n--- stderr:\n{p.stderr}"
    return p.stdout


def test_readme_python_blocks_run_as_printed(tmp_path, mlcapsule_home):
    from mlcapsule.server.app import create_app
    from mlcapsule.server.settings import ServerSettings

    blocks = readme_blocks("python")
    assert len(blocks) == 3, "the README's Python API has three blocks: provider, client setup, top-up and sync"
    work = tmp_path / "work"
    work.mkdir()

    _run(blocks[0], work, mlcapsule_home)  # provider: key, pack
    assert (work / "digits.capsule").is_file() and (work / "digits.capsule.key").is_file()

    settings = ServerSettings(database_url=f"sqlite:///{tmp_path / 'server.db'}",
                              provider_key_path=work / "provider-key.pem", allow_software_evidence=True,
                              allowed_measurements=frozenset([measurement().hex()]))
    app = create_app(settings)
    svc = app.state.service
    svc.register_capsule(work / "digits.capsule", work / "digits.capsule.key",
                         provider_public=raw_public(load_provider_key(work / "provider-key.pem").public_key()))
    _, token = svc.add_account("hospital-a")
    svc.grant("hospital-a", str(work / "digits.capsule"), budget=1000, devices=1, expires=None)
    try:
        with serve_in_thread(app) as url:
            assert "SERVER" in blocks[1] and "TOKEN" in blocks[1]
            out = _run(_fill(blocks[1], {"TOKEN": token, "SERVER": url}), work, mlcapsule_home)
            (row,) = svc.usage()
            assert row["license_id"] in out
            (work / "topup-1.json").write_text(json.dumps(svc.issue_voucher(row["license_id"], 500)))

            assert "SERVER = " not in blocks[2], "block 3 relies on the server remembered at setup"
            out = _run(_fill(blocks[2], {"TOKEN": token}), work, mlcapsule_home)
            (row,) = svc.usage()
            assert row["answered"] == 100 and row["vouchers"] == 500, (row, out)
    finally:
        app.state.engine.dispose()
