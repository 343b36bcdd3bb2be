"""Provision once and single-use nonces under concurrent requests, against a real uvicorn server.

Each request runs on its own thread with its own HTTP connection, all released together by a
barrier, so the server sees them in parallel (its worker pool runs up to 40 at once).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from mlcapsule.server.db import Device

from _server_support import (FakeEnclave, ProviderFiles, db_url, harness, pg_server, pg_url,  # noqa: F401
                             platform, provider_files, serve_in_thread)

pytestmark = pytest.mark.slow


def fire(url: str, token: str, bodies: list[dict[str, Any]]) -> list[tuple[int, str | None]]:
    """POST every body to /v1/provision at the same moment; (status, error type) for each."""
    barrier = threading.Barrier(len(bodies))
    results: list[tuple[int, str | None] | None] = [None] * len(bodies)

    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"}) as c:
            c.get("/v1/health")  # open the connection before the race starts
            barrier.wait()
            r = c.post("/v1/provision", json=bodies[i])
            results[i] = (r.status_code, None if r.is_success else r.json()["error"]["type"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(r is not None for r in results), "a request did not finish"
    return results  # type: ignore[return-value]


def device_count(h: Any) -> int:
    with h.service.sessions() as s:
        return int(s.scalar(select(func.count(Device.id))) or 0)


def fresh_bodies(h: Any, n: int) -> list[dict[str, Any]]:
    """n distinct enclaves, each with its own fresh nonce and valid evidence."""
    out = []
    for _ in range(n):
        nonce = h.nonce()
        out.append(FakeEnclave(h.backend).provision_body(h.files.capsule_id, h.files.version, nonce))
    return out


def test_50_parallel_provisions_one_device_exactly_one_succeeds(db_url: str, provider_files: ProviderFiles,
                                                                 platform: Any) -> None:
    with harness(db_url, provider_files, platform, devices=1) as h, serve_in_thread(h.app) as url:
        results = fire(url, h.token, fresh_bodies(h, 50))
        assert Counter(results) == {(200, None): 1, (403, "PolicyError"): 49}
        assert device_count(h) == 1


def test_parallel_provisions_fill_exactly_the_device_limit(db_url: str, provider_files: ProviderFiles,
                                                           platform: Any) -> None:
    """With room for 5, 30 racing provisions give exactly 5 devices, none refused spuriously."""
    with harness(db_url, provider_files, platform, devices=5) as h, serve_in_thread(h.app) as url:
        results = fire(url, h.token, fresh_bodies(h, 30))
        assert Counter(results) == {(200, None): 5, (403, "PolicyError"): 25}
        with h.service.sessions() as s:
            assert sorted(s.scalars(select(Device.slot))) == [0, 1, 2, 3, 4]


def test_parallel_replays_of_one_nonce_exactly_one_wins(db_url: str, provider_files: ProviderFiles,
                                                        platform: Any) -> None:
    with harness(db_url, provider_files, platform, devices=100) as h, serve_in_thread(h.app) as url:
        nonce = h.nonce()
        enclaves = [FakeEnclave(h.backend) for _ in range(20)]
        bodies = [e.provision_body(h.files.capsule_id, h.files.version, nonce) for e in enclaves]
        results = fire(url, h.token, bodies)
        assert Counter(results) == {(200, None): 1, (409, "ProtocolError"): 19}
        assert device_count(h) == 1
