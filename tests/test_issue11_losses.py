"""Issue 11: paths where a client lost budget or a device slot (items 1 and 2), against a real
server on loopback (uvicorn in a thread) and the real enclave worker."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mlcapsule
from mlcapsule.enclave.errors import IntegrityError, UsageError
from mlcapsule.enclave.format.container import CapsuleFile
from mlcapsule.enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey  # noqa: F401

from _server_support import (db_url, harness, pg_server, pg_url, platform, provider_files,  # noqa: F401
                             serve_in_thread)

X = np.ones((1, 4), np.float32)


def _open(path: Path, state: Path, platform: Any) -> Any:
    return mlcapsule.open_capsule(path, trust=UnsafeTrustManifestKey(), state_dir=state, platform_dir=platform.dir)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_second_setup_does_not_silently_replace_the_license(tmp_path, provider_files, platform, db_url):  # noqa: F811
    """A second setup on a set-up device is refused and changes nothing; --replace syncs the old
    receipts first, and the new license inherits nothing (no carried lease rest) from the old."""
    with harness(db_url, provider_files, platform, budget=60, devices=3) as h, serve_in_thread(h.app) as url:
        state = tmp_path / "state"
        with _open(provider_files.capsule_path, state, platform) as cap:
            cap.setup(token=h.token, server=url)
            for _ in range(7):
                cap.predict(X)  # one lease of 25 charged, 18 left in it
            before = cap.status()["license_status"]
        # A new session carries the rest of the lease (a clean close keeps it).
        with _open(provider_files.capsule_path, state, platform) as cap:
            with pytest.raises(UsageError) as e:
                cap.setup(token=h.token, server=url)
            assert "already set up" in e.value.message and "--replace" in e.value.hint
            assert cap.status()["license_status"]["license_id"] == before["license_id"]
            assert len(h.service.usage()) == 1  # no second device slot used
            cap.predict(X)  # the old license still answers
            assert cap.status()["license_status"]["receipts_pending"] >= 1
            new = cap.setup(token=h.token, server=url, replace=True)
            assert new["license_id"] != before["license_id"]
            # Nothing inherited: a fresh license of 60 queries, none charged or answered.
            assert (new["budget"], new["charged"], new["answered"]) == (60, 0, 0), new
            assert new["remaining"] == 60, new
            answered = 0
            for _ in range(70):
                try:
                    cap.predict(X)
                    answered += 1
                except mlcapsule.enclave.errors.BudgetExhaustedError:
                    break
            assert answered == 60  # exactly its own budget: no leaked rest of the old lease
        rows = {r["license_id"]: r for r in h.service.usage()}
        assert rows[before["license_id"]]["answered"] >= 8  # the old receipts reached the provider first


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_replace_can_export_the_old_receipts_to_a_file(tmp_path, provider_files, platform, db_url):  # noqa: F811
    with harness(db_url, provider_files, platform, budget=60, devices=3) as h, serve_in_thread(h.app) as url:
        state = tmp_path / "state"
        with _open(provider_files.capsule_path, state, platform) as cap:
            cap.setup(token=h.token, server=url)
            cap.predict(X)
            old = cap.status()["license_status"]["license_id"]
            cap.setup(token=h.token, server=url, replace=True, export_receipts=tmp_path / "old.json")
        report = json.loads((tmp_path / "old.json").read_text())
        assert report["license_id"] == old and report["receipts"]


def _damaged_copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    with CapsuleFile(dst, trust=UnsafeTrustManifestKey()) as cf:
        seg = cf.manifest.segment("weights")
        where = cf.data_offset + seg.offset + seg.length // 2
    data = bytearray(dst.read_bytes())
    data[where] ^= 0x01  # one weight byte
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_damaged_capsule_does_not_spend_a_device_slot(tmp_path, provider_files, platform, db_url):  # noqa: F811
    """setup checks every segment before it asks the server for a challenge: a flipped weight
    byte costs no device slot, and the good file then sets up on a one-device grant."""
    with harness(db_url, provider_files, platform, budget=60, devices=1) as h, serve_in_thread(h.app) as url:
        bad = _damaged_copy(provider_files.capsule_path, tmp_path / "corrupt.capsule")
        state = tmp_path / "state"
        with _open(bad, state, platform) as cap:
            with pytest.raises(IntegrityError) as e:
                cap.setup(token=h.token, server=url)
        assert "no device slot was used" in e.value.hint
        assert h.service.usage() == []
        with _open(provider_files.capsule_path, state, platform) as cap:  # fetched again: still has its slot
            cap.setup(token=h.token, server=url)
            cap.predict(X)


def test_admin_capsule_add_refuses_a_damaged_capsule(tmp_path, provider_files):  # noqa: F811
    from mlcapsule.cli.main import main

    bad = _damaged_copy(provider_files.capsule_path, tmp_path / "corrupt.capsule")
    db = f"sqlite:///{tmp_path / 'server.db'}"
    rc = main(["admin", "capsule", "add", str(bad), "--key", str(provider_files.content_key_path),
               "--database-url", db, "--provider-key", str(provider_files.key_path)])
    assert rc == 4
    rc = main(["admin", "capsule", "add", str(provider_files.capsule_path), "--key",
               str(provider_files.content_key_path), "--database-url", db, "--provider-key", str(provider_files.key_path)])
    assert rc == 0


def test_admin_capsule_add_checks_every_chunk_tag(tmp_path, provider_files):  # noqa: F811
    """A capsule re-signed over a changed chunk passes the hashes but not the tags."""
    from conftest import resign  # noqa: F401
    from mlcapsule.server.service import _check_all_chunks
    from mlcapsule.enclave.crypto.keys import ContentKey

    with CapsuleFile(provider_files.capsule_path, trust=UnsafeTrustManifestKey()) as cf:
        _check_all_chunks(cf, ContentKey.load(provider_files.content_key_path).key)
        with pytest.raises(IntegrityError):
            _check_all_chunks(cf, bytes(32))
