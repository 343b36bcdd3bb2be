"""Crash safety: the server process is killed (SIGKILL) at each step of a provisioning and of a
usage upload, then started again; the client, retrying the identical request, always finishes.
No device slot is lost (the grant allows one device: a lost slot would lock the client out) or
given twice, and no receipt is lost or counted twice. On SQLite and on PostgreSQL.

The kill comes from the server itself: started with ``MLCAPSULE_SERVER_CRASH_AT=<point>`` in its
environment, it SIGKILLs itself when it reaches that point (see
``mlcapsule.server.service.CRASH_POINTS``), so each step is hit exactly, without timing.
"""

from __future__ import annotations

import datetime as dt
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from mlcapsule.enclave._util import b64d
from mlcapsule.enclave.crypto.keys import ContentKey, load_provider_key
from mlcapsule.enclave.errors import PolicyError, ProtocolError
from mlcapsule.enclave.messages.license import verify_license
from mlcapsule.enclave.messages.receipts import GENESIS, entry_hash, make_entry, verify_ack
from mlcapsule.enclave.messages.setup import open_payload
from mlcapsule.provider_client import ProviderClient
from mlcapsule.server.db import AlarmRecord, Device, make_engine, session_factory
from mlcapsule.server.service import CRASH_ENV, CRASH_ONCE_ENV, CRASH_POINTS

from _server_support import (T0, FakeEnclave, ProviderFiles, ServerProcess, db_url, pg_server, pg_url,  # noqa: F401
                             platform, provider_db, provider_files)

pytestmark = pytest.mark.slow


def receipts(enc: FakeEnclave, license_id: str) -> list[dict[str, Any]]:
    """Six receipts: setup, lease, an alarm, report, a defense gap of 7 queries, lease. The alarm
    and the gap are added to the device's counters: counted twice, they would show."""
    alarm = {"alarms": [{"detector": "prada", "query": 5, "statistic": 0.71, "threshold": 0.9, "action": "record"}]}
    steps = [("setup", 0, 0, None), ("lease", 100, 0, None), ("alarm", 100, 0, alarm), ("report", 100, 60, None),
             ("defense-gap", 100, 60, {"queries": 7, "reason": "crash"}), ("lease", 200, 60, None)]
    out, prev = [], GENESIS
    for seq, (kind, charged, answered, data) in enumerate(steps, start=1):
        e = make_entry(enc.receipt, seq=seq, prev=prev, kind=kind, license_id=license_id,
                       time=(T0 + dt.timedelta(minutes=seq)).isoformat(), charged=charged, answered=answered,
                       data=data)
        out.append(e)
        prev = entry_hash(e)
    return out


class Client(threading.Thread):
    """A client that sets up (challenge, provision) and syncs twice (receipts 1-4, then 4-6),
    retrying each request, identical, for as long as the server takes to come back."""

    def __init__(self, url: str, token: str, files: ProviderFiles, enc: FakeEnclave) -> None:
        super().__init__(daemon=True)
        self.url, self.token, self.files, self.enc = url, token, files, enc
        self.out: dict[str, Any] = {}

    def run(self) -> None:
        try:
            with ProviderClient(self.url, self.token, timeout=60, retries=400, backoff=0.05, max_backoff=0.5) as c:
                nonce, _ = c.challenge(self.files.capsule_id, self.files.version)
                self.out["nonce"] = nonce
                got = c.provision(self.files.capsule_id, self.files.version, nonce=nonce, hpke_pub=self.enc.hpke_pub,
                                  receipt_pub=self.enc.receipt_pub, evidence=self.enc.evidence(nonce))
                self.out["provisioned"] = got
                chain = receipts(self.enc, got["license_id"])
                self.out["ack1"] = c.upload_usage(got["license_id"], got["device_id"], chain[:4])
                self.out["ack2"] = c.upload_usage(got["license_id"], got["device_id"], chain[3:])
        except BaseException as e:  # checked by the test
            self.out["error"] = e


def check_books(db: str, files: ProviderFiles, enc: FakeEnclave, out: dict[str, Any]) -> None:
    """The client got its key and license, one slot is used, every receipt counted once."""
    assert "error" not in out, repr(out.get("error"))
    got, nonce = out["provisioned"], out["nonce"]
    provider_pub = load_provider_key(files.key_path).public_key()
    key, envelope = open_payload(b64d(got["payload"]), enc.hpke, nonce)
    assert key == ContentKey.load(files.content_key_path).key
    lic = verify_license(envelope, provider_pub, capsule_id=uuid.UUID(files.capsule_id), version=files.version,
                         receipt_key=enc.receipt_pub)
    assert (lic.license_id, lic.device_id) == (got["license_id"], got["device_id"])
    for name, seq in (("ack1", 4), ("ack2", 6)):
        ack = out[name]
        assert ack["seq"] == seq
        assert verify_ack(ack["ack"], provider_pub, license_id=lic.license_id, device_id=lic.device_id).seq == seq
    assert (out["ack2"]["charged"], out["ack2"]["answered"]) == (200, 60)
    engine = make_engine(db)
    try:
        with session_factory(engine)() as s:
            [dev] = s.scalars(select(Device)).all()  # exactly one device: no slot given twice
            assert (dev.license_id, dev.slot, dev.nonce) == (lic.license_id, 0, nonce)
            assert (dev.head_seq, dev.charged, dev.answered) == (6, 200, 60)
            assert (dev.defense_gaps, dev.gap_queries) == (1, 7)  # the gap receipt, counted once
            assert s.scalar(select(func.count(AlarmRecord.id))) == 1  # the alarm, stored once
    finally:
        engine.dispose()


def after_restart(db: str, srv: ServerProcess, token: str, files: ProviderFiles, platform: Any,  # noqa: F811
                  out: dict[str, Any]) -> None:
    """The slot is this client's for good: another device is refused, and the used challenge
    serves no other request."""
    other = FakeEnclave(platform)
    with ProviderClient(srv.url, token, retries=0) as c:
        nonce = out["nonce"]
        with pytest.raises(ProtocolError, match="already used"):
            c.provision(files.capsule_id, files.version, nonce=nonce, hpke_pub=other.hpke_pub,
                        receipt_pub=other.receipt_pub, evidence=other.evidence(nonce))
        fresh, _ = c.challenge(files.capsule_id, files.version)
        with pytest.raises(PolicyError, match="device"):
            c.provision(files.capsule_id, files.version, nonce=fresh, hpke_pub=other.hpke_pub,
                        receipt_pub=other.receipt_pub, evidence=other.evidence(fresh))


@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_server_killed_at_each_step_client_finishes_no_slot_or_receipt_lost_or_doubled(
        point: str, db_url: str, provider_files: ProviderFiles, platform: Any, tmp_path: Path) -> None:  # noqa: F811
    token = provider_db(db_url, provider_files, devices=1)
    srv = ServerProcess(db_url, provider_files, platform, tmp_path / "serve.log")
    srv.start(env={CRASH_ENV: point})
    enc = FakeEnclave(platform)
    client = Client(srv.url, token, provider_files, enc)
    client.start()
    try:
        deadline = time.monotonic() + 300
        while srv.proc.poll() is None:  # the client's requests reach the crash point
            assert client.is_alive(), f"the client stopped before the server died: {client.out}"
            assert time.monotonic() < deadline, "the server did not reach " + point
            time.sleep(0.05)
        assert srv.proc.returncode == -signal.SIGKILL, srv.log.read_text()[-2000:]
        assert "FAULT INJECTION" in srv.log.read_text()
        stage = "provisioned" if point.startswith("usage.") else "nonce"
        assert stage in client.out and "ack1" not in client.out  # it died during that request
        srv.start()  # again, without the crash point; the client is still retrying
        client.join(300)
        assert not client.is_alive(), "the client did not finish"
        check_books(db_url, provider_files, enc, client.out)
        after_restart(db_url, srv, token, provider_files, platform, client.out)
    finally:
        srv.stop()


@pytest.mark.parametrize("point", ["provision.after_commit", "usage.after_update"])
def test_worker_killed_is_replaced_and_the_client_finishes_without_help(
        point: str, db_url: str, provider_files: ProviderFiles, platform: Any, tmp_path: Path) -> None:  # noqa: F811
    """With `serve --workers 2`, the worker that dies is replaced by the supervisor (the crash
    point fires once: MLCAPSULE_SERVER_CRASH_ONCE), and the retrying client finishes on its own."""
    token = provider_db(db_url, provider_files, devices=1)
    marker = tmp_path / "crashed"
    srv = ServerProcess(db_url, provider_files, platform, tmp_path / "serve.log", workers=2)
    srv.start(env={CRASH_ENV: point, CRASH_ONCE_ENV: str(marker)})
    enc = FakeEnclave(platform)
    try:
        client = Client(srv.url, token, provider_files, enc)
        client.start()
        client.join(300)
        assert not client.is_alive(), "the client did not finish"
        assert marker.exists(), "the crash point was not reached"
        assert "stopped (killed by SIGKILL); starting another" in srv.log.read_text()
        check_books(db_url, provider_files, enc, client.out)
    finally:
        srv.stop()


def test_crash_points_are_off_unless_the_server_environment_names_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client cannot turn a crash point on (only the server process's environment can), and a
    misspelt point is refused at start-up rather than silently never firing."""
    from mlcapsule.attestation import AttestationPolicy
    from mlcapsule.server.errors import Misconfigured
    from mlcapsule.server.service import ProviderService

    monkeypatch.delenv(CRASH_ENV, raising=False)
    assert ProviderService(None, policy=AttestationPolicy())._crash_at is None  # type: ignore[arg-type]
    monkeypatch.setenv(CRASH_ENV, "provision.after_lunch")
    with pytest.raises(Misconfigured, match="not a crash point"):
        ProviderService(None, policy=AttestationPolicy())  # type: ignore[arg-type]


def test_a_real_enclave_sets_up_and_syncs_through_server_crashes(
        provider_files: ProviderFiles, platform: Any, tmp_path: Path) -> None:  # noqa: F811
    """`Capsule.setup` and `sync` with a real enclave worker and the default client retries, on
    a grant of one device: the server worker dies right after committing the provisioning, and
    (second server run) right after committing the upload. The setup still gets its key and
    license (no lock-out), the capsule predicts offline, and the sync is counted once."""
    import numpy as np

    import mlcapsule
    from mlcapsule.enclave.crypto.keys import raw_public
    from mlcapsule.enclave.format.trust import TrustProviderKey

    db = f"sqlite:///{tmp_path / 'server.db'}"
    token = provider_db(db, provider_files, devices=1)
    trust = TrustProviderKey(raw_public(load_provider_key(provider_files.key_path).public_key()))

    def open_capsule() -> Any:
        return mlcapsule.open_capsule(provider_files.capsule_path, trust=trust, state_dir=tmp_path / "state",
                                      platform_dir=platform.dir)

    # `local`: the enclave worker measures the code when it starts, as the server does; not the
    # measurement this test process computed (and cached) at its start.
    srv = ServerProcess(db, provider_files, platform, tmp_path / "serve.log", workers=2, measurement="local")
    srv.start(env={CRASH_ENV: "provision.after_commit", CRASH_ONCE_ENV: str(tmp_path / "crashed-1")})
    try:
        with open_capsule() as cap:
            lic = cap.setup(token=token, server=srv.url)
            assert (tmp_path / "crashed-1").exists()
            out = cap.predict(np.ones((3, 4), dtype=np.float32))
            assert np.asarray(out).shape == (3, 3)
    finally:
        srv.stop()
    srv.start(env={CRASH_ENV: "usage.after_commit", CRASH_ONCE_ENV: str(tmp_path / "crashed-2")})
    try:
        with open_capsule() as cap:
            ack = cap.sync(token=token, server=srv.url)
            assert (tmp_path / "crashed-2").exists()
            assert cap.status()["license_status"]["receipts_pending"] == 0
    finally:
        srv.stop()
    engine = make_engine(db)
    try:
        with session_factory(engine)() as s:
            [dev] = s.scalars(select(Device)).all()
            assert dev.license_id == lic["license_id"]
            assert (dev.head_seq, dev.charged, dev.answered) == (ack["seq"], ack["charged"], ack["answered"])
            assert dev.answered == 3 and dev.head_seq >= 2
    finally:
        engine.dispose()


def test_client_retries_transient_answers_only() -> None:
    """ProviderClient sends a request again on 502/503/504 (the same body each time), not on a
    500 (a server bug, that the same request meets again) or a 4xx, and asks /health once."""
    import json

    import httpx

    seen: list[tuple[str, bytes]] = []
    script: list[int] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append((req.url.path, req.content))
        status = script.pop(0)
        if status == 200:
            return httpx.Response(200, json={"nonce": "A" * 43 + "=", "expires_at": "2030-01-01T00:00:00+00:00"})
        return httpx.Response(status, json={"error": {"type": "ServerError", "message": f"status {status}",
                                                     "hint": ""}})

    def client() -> ProviderClient:
        return ProviderClient("https://models.example", "t", transport=httpx.MockTransport(handler), backoff=0)

    script[:] = [503, 502, 504, 200]
    with client() as c:
        nonce, _ = c.challenge(str(uuid.uuid4()), 1)
    assert len(nonce) == 32 and len(seen) == 4 and len({body for _, body in seen}) == 1
    for status in (500, 409, 429):
        seen.clear()
        script[:] = [status, 200]
        with client() as c, pytest.raises(Exception, match=f"status {status}"):
            c.challenge(str(uuid.uuid4()), 1)
        assert len(seen) == 1
    seen.clear()
    script[:] = [503] * 10
    with client() as c, pytest.raises(Exception, match="status 503"):
        c.challenge(str(uuid.uuid4()), 1)
    assert len(seen) == 6  # the first attempt and 5 retries
    seen.clear()
    script[:] = [503, 200]
    with client() as c, pytest.raises(Exception, match="status 503"):
        c.health()
    assert len(seen) == 1 and json.loads(seen[0][1] or b"null") is None


def test_revision_0006_round_trip_keeps_devices_and_retries_work_after_it(
        db_url: str, provider_files: ProviderFiles, platform: Any) -> None:  # noqa: F811
    """A server with devices, vouchers and alarms goes down to 0005 and up again to the head: the
    devices stay (a device from before 0006 has no stored answer and keeps syncing), and a new
    provisioning is idempotent."""
    from alembic import command

    from _server_support import harness
    from mlcapsule.server.db import alembic_config, migrate, schema_revisions

    with harness(db_url, provider_files, platform, devices=3) as h:
        enc = h.enclave()
        r = h.provision(enc)
        assert r.status_code == 200
        lic = r.json()
        chain = receipts(enc, lic["license_id"])
        body = {"protocol": 2, "license_id": lic["license_id"], "device_id": lic["device_id"]}
        assert h.client.post("/v1/usage", json={**body, "receipts": chain[:3]}, headers=h.auth()).status_code == 200
        h.service.issue_voucher(lic["license_id"], 10)
        with h.engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0005")
        assert schema_revisions(h.engine)[0] == "0005"
        head = migrate(h.engine)
        assert head == schema_revisions(h.engine)[1] >= "0006"
        with h.service.sessions() as s:
            [dev] = s.scalars(select(Device)).all()
            assert (dev.nonce, dev.answer_payload, dev.head_seq) == (None, None, 3)
        r = h.client.post("/v1/usage", json={**body, "receipts": chain[2:]}, headers=h.auth())
        assert r.status_code == 200 and r.json()["seq"] == 6
        enc2, nonce = h.enclave(), h.nonce()
        first, again = h.provision(enc2, nonce), h.provision(enc2, nonce)
        assert first.status_code == again.status_code == 200 and first.json() == again.json()
        with h.service.sessions() as s:
            assert s.scalar(select(func.count(Device.id))) == 2


def test_a_setup_that_cannot_reach_the_server_says_what_to_do() -> None:
    """After its retries, a provisioning that never got an answer says that the lost attempt may
    hold a device slot, and what to do."""
    import socket

    from mlcapsule.enclave.errors import TransportError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    with ProviderClient(f"http://127.0.0.1:{port}", "t", retries=2, backoff=0) as c, \
            pytest.raises(TransportError) as e:
        c.provision(str(uuid.uuid4()), 1, nonce=bytes(32), hpke_pub=bytes(32), receipt_pub=bytes(32), evidence={})
    assert "after 3 attempts" in e.value.message and "device slot" in e.value.hint
