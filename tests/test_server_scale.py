"""Horizontal scale: several `mlcapsule serve` instances (real processes on loopback, one with
`--workers 2`) on one database behave as one server. Nothing is kept in an instance: a challenge
issued by one is redeemed at the other, provision-once holds whichever instance answers, and a
receipt chain continues across instances. On PostgreSQL (the production set-up) and on SQLite
(several processes on one file).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from mlcapsule.enclave._util import b64d
from mlcapsule.enclave.crypto.keys import ContentKey, load_provider_key
from mlcapsule.enclave.messages.receipts import verify_ack
from mlcapsule.enclave.messages.setup import open_payload
from mlcapsule.provider_client import ProviderClient
from mlcapsule.server.db import Device, make_engine, session_factory

from _server_support import (FakeEnclave, ProviderFiles, ServerProcess, db_url, pg_server, pg_url,  # noqa: F401
                             platform, provider_db, provider_files)

pytestmark = pytest.mark.slow


def devices_in(url: str) -> list[Device]:
    engine = make_engine(url)
    try:
        with session_factory(engine)() as s:
            return list(s.scalars(select(Device).order_by(Device.slot)))
    finally:
        engine.dispose()


def test_two_instances_100_concurrent_setups_3_devices_give_exactly_3_slots(
        db_url: str, provider_files: ProviderFiles, platform: Any, tmp_path: Path) -> None:  # noqa: F811
    """100 clients race for a grant of 3 devices through two instances (the challenge from one,
    the provisioning at the other): exactly 3 are provisioned, the 97 others are refused with the
    device limit, and each of the 3 answers opens only in its own enclave."""
    token = provider_db(db_url, provider_files, devices=3)
    a = ServerProcess(db_url, provider_files, platform, tmp_path / "a.log", workers=2)
    b = ServerProcess(db_url, provider_files, platform, tmp_path / "b.log")
    a.start()
    try:
        b.start()
        try:
            urls = [a.url, b.url]
            n = 100
            barrier = threading.Barrier(n)
            results: list[Any] = [None] * n
            enclaves = [FakeEnclave(platform) for _ in range(n)]

            def one(i: int) -> None:
                headers = {"Authorization": f"Bearer {token}"}
                try:
                    with httpx.Client(base_url=urls[i % 2], timeout=300, headers=headers) as first, \
                            httpx.Client(base_url=urls[(i + 1) % 2], timeout=300, headers=headers) as other:
                        r = first.post("/v1/challenge", json={"capsule_id": provider_files.capsule_id,
                                                              "version": provider_files.version})
                        assert r.status_code == 200, r.text
                        nonce = b64d(r.json()["nonce"])
                        body = enclaves[i].provision_body(provider_files.capsule_id, provider_files.version, nonce)
                        other.get("/v1/health")  # the connection is open before the race starts
                        barrier.wait(timeout=300)
                        r = other.post("/v1/provision", json=body)
                        results[i] = (r.status_code, None if r.is_success else r.json()["error"]["type"],
                                      r.json() if r.is_success else None, nonce)
                except BaseException as e:  # reported below
                    barrier.abort()
                    results[i] = e

            threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            errors = [r for r in results if not isinstance(r, tuple)]
            assert not errors, errors[:3]
            assert Counter(r[:2] for r in results) == {(200, None): 3, (403, "PolicyError"): 97}
            key = ContentKey.load(provider_files.content_key_path).key
            won = [i for i, r in enumerate(results) if r[0] == 200]
            for i in won:
                got, nonce = results[i][2], results[i][3]
                assert open_payload(b64d(got["payload"]), enclaves[i].hpke, nonce)[0] == key
            devs = devices_in(db_url)
            assert [d.slot for d in devs] == [0, 1, 2]
            assert {d.license_id for d in devs} == {results[i][2]["license_id"] for i in won}

            # One receipt chain, uploaded across both instances: it continues, and a re-sent
            # part is acknowledged without being counted again.
            i = won[0]
            lic = results[i][2]
            chain = enclaves[i].chain(lic["license_id"], 6)
            provider_pub = load_provider_key(provider_files.key_path).public_key()
            with ProviderClient(a.url, token) as ca, ProviderClient(b.url, token) as cb:
                assert ca.upload_usage(lic["license_id"], lic["device_id"], chain[:3])["seq"] == 3
                assert cb.upload_usage(lic["license_id"], lic["device_id"], chain[2:])["seq"] == 6
                again = ca.upload_usage(lic["license_id"], lic["device_id"], chain[3:])
            assert (again["seq"], again["charged"], again["answered"]) == (6, 300, 120)
            assert verify_ack(again["ack"], provider_pub, license_id=lic["license_id"],
                              device_id=lic["device_id"]).seq == 6
            dev = next(d for d in devices_in(db_url) if d.license_id == lic["license_id"])
            assert (dev.head_seq, dev.charged, dev.answered) == (6, 300, 120)
        finally:
            b.stop()
    finally:
        a.stop()


def test_serve_workers_replaces_a_killed_worker_and_stops_them_all(
        provider_files: ProviderFiles, platform: Any, tmp_path: Path) -> None:  # noqa: F811
    """`mlcapsule serve --workers 2` runs two worker processes; one killed with SIGKILL is
    replaced and the server goes on answering; SIGTERM stops the supervisor and every worker."""
    db = f"sqlite:///{tmp_path / 'server.db'}"
    token = provider_db(db, provider_files, devices=5)
    srv = ServerProcess(db, provider_files, platform, tmp_path / "serve.log", workers=2)
    srv.start()
    try:
        first = srv.children()
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (len(srv.children()) == 2 and first[0] not in srv.children()):
            assert time.monotonic() < deadline, f"no worker replaced {first[0]}: {srv.children()}"
            time.sleep(0.1)
        with ProviderClient(srv.url, token) as c:
            for _ in range(6):  # answered, whichever worker accepts the connection
                nonce, _ = c.challenge(provider_files.capsule_id, provider_files.version)
                assert len(nonce) == 32
        workers = srv.children()
        srv.proc.terminate()
        assert srv.wait(60) == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        assert "starting another" in srv.log.read_text()
    finally:
        srv.stop()


def fire_same(url: str, token: str, path: str, body: dict[str, Any], n: int) -> list[httpx.Response]:
    """POST the same body ``n`` times at once, each on its own connection."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"}) as c:
            c.get("/v1/health")
            barrier.wait(timeout=120)
            out[i] = c.post(path, json=body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(r is not None for r in out), "a request did not finish"
    return out


def test_copies_of_one_request_racing_get_one_answer_and_count_once(
        db_url: str, provider_files: ProviderFiles, platform: Any) -> None:  # noqa: F811
    """A retry racing its original (the client gave up waiting, the first copy is still running):
    20 copies of one provisioning request at once get the same answer and one slot; 20 copies of
    one upload at once are all acknowledged with the same head, and its receipts count once."""
    from _server_support import harness, serve_in_thread
    from mlcapsule.enclave.messages.receipts import GENESIS, entry_hash, make_entry

    with harness(db_url, provider_files, platform, devices=5) as h, serve_in_thread(h.app) as url:
        enc, nonce = h.enclave(), h.nonce()
        body = enc.provision_body(h.files.capsule_id, h.files.version, nonce)
        answers = fire_same(url, h.token, "/v1/provision", body, 20)
        assert {r.status_code for r in answers} == {200}
        assert len({r.text for r in answers}) == 1
        lic = answers[0].json()
        assert [d.license_id for d in devices_in(db_url)] == [lic["license_id"]]

        chain, prev = [], GENESIS
        for seq, (kind, charged, data) in enumerate([("setup", 0, None), ("lease", 100, None),
                                                     ("defense-gap", 100, {"queries": 4, "reason": "crash"})], 1):
            e = make_entry(enc.receipt, seq=seq, prev=prev, kind=kind, license_id=lic["license_id"],
                           time=f"2030-01-01T00:0{seq}:00+00:00", charged=charged, answered=0, data=data)
            chain.append(e)
            prev = entry_hash(e)
        upload = {"protocol": 2, "license_id": lic["license_id"], "device_id": lic["device_id"], "receipts": chain}
        acks = fire_same(url, h.token, "/v1/usage", upload, 20)
        assert {r.status_code for r in acks} == {200}, {r.text for r in acks if r.status_code != 200}
        assert {r.json()["seq"] for r in acks} == {3}
        [dev] = devices_in(db_url)
        assert (dev.head_seq, dev.charged, dev.defense_gaps, dev.gap_queries) == (3, 100, 1, 4)
