"""Observability of the provider server: /metrics moves as it should after a setup, an upload and
refusals (with a bounded set of reasons), /healthz and /readyz, JSON logs, and the metrics of
several worker processes summed (prometheus-client's multiprocess mode)."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from _server_support import (  # noqa: F401
    T0,
    FakeEnclave,
    Harness,
    ProviderFiles,
    db_url,
    harness,
    pg_server,
    pg_url,
    platform,
    provider_files,
)
from mlcapsule.enclave.messages.receipts import GENESIS, entry_hash, make_entry
from mlcapsule.server.observability import REFUSAL_REASONS, JsonFormatter, configure_logging, log_config


@pytest.fixture
def srv(db_url: str, provider_files: ProviderFiles, platform: Any) -> Any:  # noqa: F811
    with harness(db_url, provider_files, platform) as h:
        yield h


def scrape(h: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = h.client.get("/metrics") if isinstance(h, Harness) else h.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict[Any, float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(a: dict[Any, float], b: dict[Any, float]) -> dict[Any, float]:
    return {k: b[k] - a.get(k, 0.0) for k in b if b[k] != a.get(k, 0.0)}


def test_metrics_move_after_a_setup(srv: Harness) -> None:
    before = scrape(srv)
    r = srv.provision(srv.enclave())
    assert r.status_code == 200, r.text
    d = delta(before, scrape(srv))
    assert value(d, "mlcapsule_challenges_total") == 1
    assert value(d, "mlcapsule_setups_total") == 1
    assert value(d, "mlcapsule_provisions_total") == 1
    for ep in ("/v1/challenge", "/v1/provision"):
        assert value(d, "mlcapsule_http_request_duration_seconds_count", endpoint=ep, method="POST") == 1
    assert not any(k[0] == "mlcapsule_refusals_total" for k in d)
    assert not any(k[0].startswith("mlcapsule_uploads") for k in d)


def test_a_retried_setup_is_counted_as_a_replay_not_a_new_device(srv: Harness) -> None:
    enc = srv.enclave()
    nonce = srv.nonce()
    first = srv.provision(enc, nonce)
    before = scrape(srv)
    again = srv.provision(enc, nonce)  # the same request: the answer was lost, the client retries
    assert again.status_code == 200 and again.json() == first.json()
    d = delta(before, scrape(srv))
    assert value(d, "mlcapsule_setups_total") == 1
    assert value(d, "mlcapsule_provision_replays_total") == 1
    assert value(d, "mlcapsule_provisions_total") == 0


def alarm_chain(enc: FakeEnclave, license_id: str) -> list[dict[str, Any]]:
    alarm = {"alarms": [{"detector": "prada", "query": 12, "statistic": 0.8, "threshold": 0.9, "action": "lock"},
                        {"detector": "x" * 40, "query": 13, "statistic": None, "threshold": None, "action": "record"}],
             "defense": {"queries": 14, "refused": 0, "locked": True, "alarms": {"prada": 1}}}
    out, prev, charged, answered = [], GENESIS, 0, 0
    for seq, (kind, data) in enumerate([("setup", {}), ("lease", {}), ("report", {}), ("alarm", alarm)], 1):
        charged += 100 if kind == "lease" else 0
        answered += 30 if kind in ("report", "alarm") else 0
        e = make_entry(enc.receipt, seq=seq, prev=prev, kind=kind, license_id=license_id,
                       time=(T0 + dt.timedelta(minutes=seq)).isoformat(), charged=charged, answered=answered,
                       data=data)
        out.append(e)
        prev = entry_hash(e)
    return out


def test_metrics_move_after_an_upload_and_not_again_on_its_retry(srv: Harness) -> None:
    enc = srv.enclave()
    lic = srv.provision(enc).json()
    receipts = alarm_chain(enc, lic["license_id"])
    body = {"protocol": 2, "license_id": lic["license_id"], "device_id": lic["device_id"]}
    before = scrape(srv)
    r = srv.client.post("/v1/usage", json={**body, "receipts": receipts[:3]}, headers=srv.auth())
    assert r.status_code == 200, r.text
    mid = scrape(srv)
    d = delta(before, mid)
    assert value(d, "mlcapsule_uploads_total") == 1
    assert value(d, "mlcapsule_receipts_total") == 3
    assert value(d, "mlcapsule_queries_reported_total") == 30
    assert value(d, "mlcapsule_http_request_duration_seconds_count", endpoint="/v1/usage", method="POST") == 1
    # The same receipts again (a lost answer) and the alarm after them: only the alarm is new.
    r = srv.client.post("/v1/usage", json={**body, "receipts": receipts}, headers=srv.auth())
    assert r.status_code == 200, r.text
    d = delta(mid, scrape(srv))
    assert value(d, "mlcapsule_uploads_total") == 1
    assert value(d, "mlcapsule_receipts_total") == 1
    assert value(d, "mlcapsule_queries_reported_total") == 30
    assert value(d, "mlcapsule_alarms_reported_total", detector="prada", action="lock") == 1
    # A detector name the server does not know is counted as "other", never as a new label.
    assert value(d, "mlcapsule_alarms_reported_total", detector="other", action="record") == 1
    assert srv.service.usage()[0]["alarms"] == 2


def test_refusals_are_counted_under_a_fixed_set_of_reasons(srv: Harness) -> None:
    before = scrape(srv)
    enc = srv.enclave()
    assert srv.challenge("mlc_" + "A" * 43).status_code == 401
    r = srv.provision(enc, b"\x07" * 32)  # a nonce this server never issued
    assert r.status_code == 403
    assert srv.client.post("/v1/challenge", json={"capsule_id": "nope"}, headers=srv.auth()).status_code == 422
    assert srv.client.post("/v1/usage", content=b"x" * (65 * 1024 * 1024), headers=srv.auth()).status_code == 413
    assert srv.client.get("/v1/" + "free-text-" * 5).status_code == 404
    m = scrape(srv)
    d = delta(before, m)
    assert value(d, "mlcapsule_refusals_total", endpoint="/v1/challenge", reason="unauthorized") == 1
    assert value(d, "mlcapsule_refusals_total", endpoint="/v1/provision", reason="nonce_unknown") == 1
    assert value(d, "mlcapsule_refusals_total", endpoint="/v1/challenge", reason="malformed") == 1
    assert value(d, "mlcapsule_refusals_total", endpoint="unmatched", reason="too_large") == 1
    assert value(d, "mlcapsule_refusals_total", endpoint="unmatched", reason="not_found") == 1
    labels = {dict(k[1]).get("reason") for k in m if k[0] == "mlcapsule_refusals_total"}
    assert labels <= set(REFUSAL_REASONS)
    endpoints = {dict(k[1]).get("endpoint") for k in m if k[0].startswith(("mlcapsule_refusals",
                                                                            "mlcapsule_http_request"))}
    assert not any("free-text" in (e or "") for e in endpoints), "raw paths never become labels"


def test_healthz_and_readyz_follow_the_database(tmp_path: Path, provider_files: ProviderFiles,  # noqa: F811
                                                platform: Any) -> None:  # noqa: F811
    folder = tmp_path / "db"
    with harness(f"sqlite:///{folder / 'server.db'}", provider_files, platform) as h:
        assert h.client.get("/healthz").json() == {"status": "ok"}
        assert h.client.get("/readyz").json() == {"status": "ok"}
        # Take the database away: the folder is moved and a file stands in its place, so
        # SQLite cannot open it again. Liveness does not depend on it; readiness does.
        h.engine.dispose()
        folder.rename(tmp_path / "gone")
        folder.write_bytes(b"")
        try:
            assert h.client.get("/healthz").status_code == 200
            r = h.client.get("/readyz")
            assert r.status_code == 503 and r.json() == {"status": "database unavailable"}
        finally:
            folder.unlink()
            (tmp_path / "gone").rename(folder)
        assert h.client.get("/readyz").status_code == 200
        spec = h.client.get("/openapi.json").json()
        assert {"/healthz", "/readyz", "/metrics"} <= set(spec["paths"])


def test_json_logs_are_one_object_per_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("mlcapsule.test.json")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        log.info("provisioned device %s\nsecond line", "d-1", extra={"endpoint": "/v1/provision"})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "provisioned device d-1\nsecond line" and first["level"] == "INFO"
    assert first["logger"] == "mlcapsule.test.json" and first["endpoint"] == "/v1/provision"
    assert dt.datetime.fromisoformat(first["time"]).tzinfo is not None
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc"]


def test_log_config_picks_the_format_and_keeps_sqlalchemy_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlcapsule.errors import UsageError

    monkeypatch.setenv("MLCAPSULE_LOG_FORMAT", "json")
    cfg = log_config(level="debug")
    assert cfg["formatters"]["default"]["()"].endswith("JsonFormatter") and cfg["root"]["level"] == "DEBUG"
    assert cfg["loggers"]["sqlalchemy.engine"]["level"] == "WARNING"
    assert "format" in log_config("text")["formatters"]["default"]
    with pytest.raises(UsageError):
        log_config("xml")
    with pytest.raises(UsageError):
        log_config("json", "loud")
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        configure_logging("json", "info")
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])


# -- several workers --------------------------------------------------------------------------
def test_serve_with_workers_sums_their_metrics_and_logs_json(tmp_path: Path, provider_files: ProviderFiles,  # noqa: F811
                                                             platform: Any) -> None:  # noqa: F811
    """`mlcapsule serve --workers 2 --log-format json`: /metrics counts every request whichever
    worker served it and whichever answers the scrape (prometheus-client's multiprocess mode in a
    private folder, removed at exit), and the log lines, uvicorn's access log included, are JSON."""
    db = f"sqlite:///{tmp_path / 'server.db'}"
    with harness(db, provider_files, platform) as h:
        token = h.token
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env |= {"MLCAPSULE_HOME": str(tmp_path / "home"), "MLCAPSULE_LOG_LEVEL": "info", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "mlcapsule", "serve", "--port", str(port), "--database-url", db,
                             "--provider-key", str(provider_files.key_path), "--UNSAFE-allow-software-evidence",
                             "--allow-measurement", platform.measurement().hex(), "--workers", "2",
                             "--log-format", "json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        body = {"capsule_id": provider_files.capsule_id, "version": provider_files.version}
        n = 24
        for _ in range(n):  # a new connection each: the kernel spreads them over the workers
            r = httpx.post(url + "/v1/challenge", json=body, headers={"Authorization": f"Bearer {token}"},
                           timeout=10)
            assert r.status_code == 200, r.text
        (folder,) = tmp_path.glob("mlcapsule-metrics-*")
        # The parent built the app (its counters stay at 0), then each worker counts in its own file.
        assert len({f.name for f in folder.glob("counter_*.db")}) == 3
        for _ in range(6):  # whichever worker answers the scrape, it sums both
            with httpx.Client(base_url=url) as c:
                assert value(scrape(c), "mlcapsule_challenges_total") == n
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert not list(tmp_path.glob("mlcapsule-metrics-*")), "the metrics folder is removed at exit"
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    access = [r for r in records if r["logger"] == "uvicorn.access"]
    assert sum("POST /v1/challenge" in r["message"] for r in access) == n
    assert any(r["logger"] == "mlcapsule.server" and "workers" in r["message"] for r in records)
    assert not any(line.startswith("INFO:") for line in err.splitlines()), "no uvicorn text lines"
