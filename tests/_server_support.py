"""Shared fixtures and helpers for the provider-server tests (imported by the test modules).

Nothing here mocks mlcapsule code: evidence comes from the real ``SoftwareBackend``, capsules
from the real packer, receipts from the real ``make_entry``. ``FakeEnclave`` only holds the
keys an enclave would make in ``setup_begin``.
"""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mlcapsule.enclave._util import b64d, b64e
from mlcapsule.enclave.crypto.keys import generate_provider_key, load_provider_key, raw_public
from mlcapsule.enclave.backends.software import SoftwareBackend
from mlcapsule.enclave.messages.receipts import GENESIS, entry_hash, make_entry
from mlcapsule.enclave.messages.setup import report_data

from pg import pg_server, pg_url  # noqa: F401  (fixtures)

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def raw(pub: Any) -> bytes:
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


class Clock:
    """An injectable clock for the service: starts at T0, moves only when told."""

    def __init__(self, t: dt.datetime = T0) -> None:
        self.t = t
        self._lock = threading.Lock()

    def __call__(self) -> dt.datetime:
        with self._lock:
            return self.t

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.t += dt.timedelta(seconds=seconds)


@dataclass
class FakeEnclave:
    """The keys an enclave makes at setup, and the receipts it would sign."""

    backend: SoftwareBackend
    hpke: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    receipt: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def hpke_pub(self) -> bytes:
        return raw(self.hpke.public_key())

    @property
    def receipt_pub(self) -> bytes:
        return raw(self.receipt.public_key())

    def evidence(self, nonce: bytes) -> dict[str, Any]:
        return self.backend.evidence(report_data(nonce, self.hpke_pub, self.receipt_pub))

    def provision_body(self, capsule_id: str, version: int, nonce: bytes,
                       evidence: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"capsule_id": capsule_id, "version": version, "nonce": b64e(nonce), "hpke_pub": b64e(self.hpke_pub),
                "receipt_pub": b64e(self.receipt_pub),
                "evidence": self.evidence(nonce) if evidence is None else evidence}

    def chain(self, license_id: str, n: int, *, seq: int = 1, prev: str = GENESIS, charged: int = 0,
              answered: int = 0, key: Ed25519PrivateKey | None = None) -> list[dict[str, Any]]:
        """``n`` receipts continuing (seq-1, prev): a lease of 100 then a report, alternately."""
        out = []
        for i in range(n):
            s = seq + i
            if s == 1:
                kind = "setup"
            elif s % 2 == 0:
                kind, charged = "lease", charged + 100
            else:
                kind, answered = "report", min(charged, answered + 60)
            e = make_entry(key or self.receipt, seq=s, prev=prev, kind=kind, license_id=license_id,
                           time=(T0 + dt.timedelta(minutes=s)).isoformat(), charged=charged, answered=answered)
            out.append(e)
            prev = entry_hash(e)
        return out


# -- capsule and keys (built once per session) ----------------------------------------------
@dataclass(frozen=True)
class ProviderFiles:
    key_path: Path
    capsule_path: Path
    content_key_path: Path
    capsule_id: str
    version: int
    lease_size: int


def _tiny_model() -> Any:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="session")
def provider_files(tmp_path_factory: pytest.TempPathFactory) -> ProviderFiles:
    import mlcapsule
    from mlcapsule.enclave.format.manifest import Policy

    d = tmp_path_factory.mktemp("provider")
    key = d / "provider-key.pem"
    generate_provider_key(key)
    res = mlcapsule.pack(_tiny_model(), d / "tiny.capsule", provider_key=key, name="tiny",
                         policy=Policy(lease_size=25))
    m = res.manifest
    return ProviderFiles(key, res.capsule_path, res.key_path, str(m.capsule_id), m.version, m.policy.lease_size)


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SoftwareBackend:
    return SoftwareBackend(platform_dir=tmp_path_factory.mktemp("platform"))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'server' / 'server.db'}"
    return request.getfixturevalue("pg_url")


# -- a server ready to provision ------------------------------------------------------------
@dataclass
class Harness:
    app: Any
    files: ProviderFiles
    backend: SoftwareBackend
    clock: Clock
    token: str
    client: Any  # fastapi TestClient

    @property
    def service(self) -> Any:
        return self.app.state.service

    @property
    def engine(self) -> Any:
        return self.app.state.engine

    @property
    def provider_pub(self) -> Any:
        return load_provider_key(self.files.key_path).public_key()

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def enclave(self) -> FakeEnclave:
        return FakeEnclave(self.backend)

    def challenge(self, token: str | None = None, **body: Any) -> Any:
        payload = {"capsule_id": self.files.capsule_id, "version": self.files.version, **body}
        return self.client.post("/v1/challenge", json=payload, headers=self.auth(token))

    def nonce(self, token: str | None = None) -> bytes:
        r = self.challenge(token)
        assert r.status_code == 200, r.text
        return b64d(r.json()["nonce"])

    def provision(self, enclave: FakeEnclave, nonce: bytes | None = None, *, token: str | None = None,
                  evidence: dict[str, Any] | None = None) -> Any:
        nonce = self.nonce(token) if nonce is None else nonce
        body = enclave.provision_body(self.files.capsule_id, self.files.version, nonce, evidence)
        return self.client.post("/v1/provision", json=body, headers=self.auth(token))

    def add_account(self, name: str, *, devices: int = 2, budget: int | None = 1000) -> str:
        _, token = self.service.add_account(name)
        self.service.grant(name, self.files.capsule_id, budget=budget, devices=devices, expires=None)
        return token


def make_harness(db_url: str, files: ProviderFiles, backend: SoftwareBackend, *, allow_software: bool = True,
                 measurements: frozenset[str] | None = None, devices: int = 2, budget: int | None = 1000,
                 expires: dt.datetime | None = None, nonce_ttl: int = 120, tpm_policy: Any = None) -> Harness:
    from fastapi.testclient import TestClient

    from mlcapsule.server.app import create_app
    from mlcapsule.server.settings import ServerSettings

    settings = ServerSettings(database_url=db_url, provider_key_path=files.key_path,
                              allow_software_evidence=allow_software,
                              allowed_measurements=frozenset([backend.measurement().hex()]) if measurements is None
                              else measurements, nonce_ttl_seconds=nonce_ttl)
    clock = Clock()
    app = create_app(settings, clock=clock, tpm_policy=tpm_policy)
    svc = app.state.service
    _, token = svc.add_account("alice")
    svc.register_capsule(files.capsule_path, files.content_key_path,
                         provider_public=raw_public(load_provider_key(files.key_path).public_key()))
    svc.grant("alice", files.capsule_id, budget=budget, devices=devices, expires=expires)
    return Harness(app, files, backend, clock, token, TestClient(app))


@contextmanager
def harness(db_url: str, files: ProviderFiles, backend: SoftwareBackend, **kw: Any) -> Iterator[Harness]:
    h = make_harness(db_url, files, backend, **kw)
    try:
        yield h
    finally:
        h.client.close()
        h.engine.dispose()


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server on 127.0.0.1 (a free port); yield its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", backlog=512))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


# -- `mlcapsule serve` as real processes (scale and crash tests) ----------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def provider_db(db_url: str, files: ProviderFiles, *, devices: int, budget: int | None = 1000) -> str:
    """Prepare the database a `mlcapsule serve` process will use: the schema, account alice,
    the capsule and alice's grant for ``devices`` devices. Returns alice's token."""
    from mlcapsule.attestation import AttestationPolicy
    from mlcapsule.server.db import create_schema, make_engine, session_factory
    from mlcapsule.server.service import ProviderService

    engine = make_engine(db_url)
    try:
        create_schema(engine)
        svc = ProviderService(session_factory(engine), policy=AttestationPolicy(),
                              provider_key=load_provider_key(files.key_path))
        _, token = svc.add_account("alice")
        svc.register_capsule(files.capsule_path, files.content_key_path,
                             provider_public=raw_public(load_provider_key(files.key_path).public_key()))
        svc.grant("alice", files.capsule_id, budget=budget, devices=devices, expires=None)
        return token
    finally:
        engine.dispose()


class ServerProcess:
    """`python -m mlcapsule serve` on 127.0.0.1:``port``, accepting software evidence of
    ``backend``'s measurement (or ``measurement``: ``local`` is the one the server computes when
    it starts, as a real enclave worker started then does); its output goes to ``log``.
    :meth:`start` returns once the server answers /v1/health, and can start it again on the same
    port after it died."""

    def __init__(self, db_url: str, files: ProviderFiles, backend: SoftwareBackend, log: Path, *,
                 workers: int = 1, port: int | None = None, measurement: str | None = None) -> None:
        import sys

        self.port = port or free_port()
        self.log = log
        self.cmd = [sys.executable, "-m", "mlcapsule", "serve", "--port", str(self.port), "--database-url", db_url,
                    "--provider-key", str(files.key_path), "--UNSAFE-allow-software-evidence",
                    "--allow-measurement", measurement or backend.measurement().hex(), "--workers", str(workers)]
        self.proc: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, env: dict[str, str] | None = None, timeout: float = 120) -> None:
        import os
        import subprocess

        import httpx

        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(self.cmd, env={**os.environ, **(env or {})}, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/v1/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def wait(self, timeout: float = 120) -> int:
        return int(self.proc.wait(timeout=timeout))

    def children(self) -> list[int]:
        """The worker processes of a `--workers N` server."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def stop(self) -> None:
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
