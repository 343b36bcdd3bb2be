"""`mlcapsule bench --suite server` at a tiny size: one worker, two clients, about a second per
measurement, on the test PostgreSQL. It checks the result file and that the load was real (the
devices and receipts are in the database); no timing assertions (those are BENCHMARKS.md's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mlcapsule.bench import run
from mlcapsule.server.db import Device, make_engine, session_factory
from pg import pg_server, pg_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.postgres


def test_bench_server_tiny_run_writes_the_fields_and_really_provisions(tmp_path: Path, pg_url: str,  # noqa: F811
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCAPSULE_BENCH_DATABASE_URL", pg_url)
    monkeypatch.setenv("MLCAPSULE_BENCH_SERVER_WORKERS", "1")
    monkeypatch.setenv("MLCAPSULE_BENCH_SERVER_CLIENTS", "2")
    monkeypatch.setenv("MLCAPSULE_BENCH_SERVER_SECONDS", "1.5")
    monkeypatch.setenv("MLCAPSULE_BENCH_SERVER_WARMUP", "0.3")
    monkeypatch.setenv("MLCAPSULE_BENCH_SERVER_REPEATS", "2")
    monkeypatch.setenv("MLCAPSULE_BENCH_SERVER_RECEIPTS", "10")
    md = tmp_path / "BENCHMARKS.md"
    run(["server"], quick=True, results_dir=tmp_path / "results", markdown=md, workdir=tmp_path / "work",
        log=lambda _: None)
    res = json.loads((tmp_path / "results" / "server.json").read_text())
    assert res["suite"] == "server" and res["config"]["workers"] == [1] and res["config"]["clients"] == [2]
    assert len(res["rows"]) == 1
    row = res["rows"][0]
    assert row["workers"] == 1 and row["clients"] == 2
    for part in ("trivial", "setups", "uploads"):
        r = row[part]
        assert r["errors"] == {}, (part, r["errors"])
        assert r["count"] > 0 and r["per_second"] > 0
        s = r["latency_ms"]
        assert s["n"] == r["count"] and s["min"] <= s["median"] <= s["p99"] <= s["max"]
        assert set(r["cpu_ms_per_op"]) >= {"server", "client", "total"}
    assert set(row["setups"]["request_latency_ms"]) == {"challenge", "provision"}
    assert row["uploads"]["receipts"] == 10 * row["uploads"]["count"]
    head = res["headline"]
    assert head["workers"] == 1 and head["clients"] == 2 and len(head["runs"]) == 2
    assert head["min"]["setups_per_second"] <= head["median"]["setups_per_second"] <= head["max"]["setups_per_second"]
    assert {g["id"] for g in res["goals"]} == {"setups", "setup-p99", "receipts", "ratio"}
    assert all(isinstance(g["met"], bool) for g in res["goals"])
    # The load was real: every counted setup is a device in the database, every counted receipt
    # is on a stored chain (the server verified and kept it).
    engine = make_engine(pg_url)
    try:
        with session_factory(engine)() as s:
            devices = s.scalar(select(func.count(Device.id))) or 0
            stored = s.scalar(select(func.sum(Device.head_seq))) or 0
    finally:
        engine.dispose()
    assert devices >= row["setups"]["count"]
    assert stored >= row["uploads"]["receipts"]
    text = md.read_text()
    assert "## Server under load" in text and "setups / (trivial/2)" in text
