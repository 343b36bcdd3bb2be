"""No token, key or license secret ever reaches the logs (issue 15): a whole end-to-end run at
DEBUG level, every logger (the server's, uvicorn's access and error logs, SQLAlchemy, httpx, the
client, the enclave worker's output) captured, then searched for every secret of the run.

The run: a provider key under a passphrase; admin tokens; over the admin API, an account, the
capsule and its content key uploaded, a grant; a real client (enclave worker, software backend)
sets up against a real uvicorn server on loopback, predicts offline, syncs its receipts; the
administrator reads usage and alarms and issues a voucher and an unlock voucher.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import logging.config
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mlcapsule
from _server_support import _tiny_model, platform  # noqa: F401  (fixture)
from mlcapsule.enclave.crypto.keys import ContentKey, generate_provider_key, load_provider_key
from mlcapsule.enclave.format.manifest import Policy
from mlcapsule.enclave.format.trust import UnsafeTrustManifestKey
from mlcapsule.server.admin_api import AdminClient, AdminTokens
from mlcapsule.server.app import create_app
from mlcapsule.server.observability import JsonFormatter, log_config
from mlcapsule.server.settings import ServerSettings


class ProvisionRecorder:
    """ASGI wrapper that keeps the bodies of /v1/provision answers: the sealed payloads."""

    def __init__(self, app: Any) -> None:
        self.app, self.bodies = app, []  # type: ignore[var-annotated]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/provision":
            await self.app(scope, receive, send)
            return

        async def keep(msg: Any) -> None:
            if msg["type"] == "http.response.body":
                self.bodies.append(msg.get("body", b""))
            await send(msg)

        await self.app(scope, receive, keep)


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 with the server's own JSON log config, at DEBUG."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=log_config("json", "DEBUG"), log_level="debug",
                                           access_log=True, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def forms(secret: bytes | str) -> set[str]:
    """The ways a secret could appear in a log line."""
    if isinstance(secret, str):
        return {secret, secret[: max(16, len(secret) // 2)]}
    std = base64.b64encode(secret).decode()
    url = base64.urlsafe_b64encode(secret).decode()
    return {secret.hex(), secret.hex().upper(), std, std.rstrip("="), url, url.rstrip("="), repr(secret)[2:-1][:40]}


def test_no_secret_is_logged_across_an_end_to_end_run(tmp_path: Path, platform: Any,  # noqa: F811
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    passphrase = b"correct horse battery staple 15"
    key_path = tmp_path / "provider-key.pem"
    generate_provider_key(key_path, passphrase=passphrase)
    packed = mlcapsule.pack(_tiny_model(), tmp_path / "tiny.capsule", provider_key=key_path, passphrase=passphrase,
                            name="tiny", policy=Policy(lease_size=5))
    content_key = ContentKey.load(packed.key_path).key
    provider_raw = load_provider_key(key_path, passphrase=passphrase).private_bytes_raw()

    root = logging.getLogger()
    saved = (root.level, list(root.handlers), {n: logging.getLogger(n).level for n in ("httpx", "httpcore")})
    logging.config.dictConfig(log_config("json", "DEBUG"))
    captured = io.StringIO()
    tap = logging.StreamHandler(captured)
    tap.setFormatter(JsonFormatter())
    root.addHandler(tap)
    secrets: dict[str, bytes | str] = {"passphrase": passphrase.decode(), "content key": content_key,
                                       "provider private key": provider_raw}
    try:
        settings = ServerSettings(database_url=f"sqlite:///{tmp_path / 'server.db'}", provider_key_path=key_path,
                                  passphrase=passphrase, allow_software_evidence=True,
                                  allowed_measurements=frozenset([platform.measurement().hex()]))
        app = create_app(settings)
        tokens = AdminTokens(app.state.service)
        _, operator = tokens.create("ops", "operator")
        _, reader = tokens.create("auditor", "read")
        secrets |= {"operator token": operator, "read token": reader}
        recorder = ProvisionRecorder(app)
        with serve(recorder) as url:
            admin = AdminClient(url, operator)
            _, account_token = admin.add_account("clinic")
            secrets["account token"] = account_token
            admin.register_capsule(packed.capsule_path, packed.key_path)
            admin.grant("clinic", str(packed.manifest.capsule_id), budget=100, devices=1, expires=None)

            state = tmp_path / "state"
            x = np.arange(8, dtype=np.float32).reshape(2, 4)
            with mlcapsule.open_capsule(packed.capsule_path, trust=UnsafeTrustManifestKey(), state_dir=state,
                                        platform_dir=platform.dir) as cap:
                cap.setup(token=account_token, server=url)
                for _ in range(4):
                    assert np.asarray(cap.predict(x)).shape == (2, 3)
                cap.sync(token=account_token, server=url)

            (row,) = admin.usage()
            assert row["answered"] >= 8
            admin.alarms()
            admin.list_grants()
            admin.issue_voucher(row["license_id"], 10)
            admin.issue_unlock(row["license_id"])
            AdminClient(url, reader).list_accounts()
            admin.close()
            app.state.engine.dispose()
        (body,) = recorder.bodies
        secrets["sealed payload"] = json.loads(body)["payload"]
    finally:
        root.removeHandler(tap)
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
    out, err = capfd.readouterr()
    text = captured.getvalue() + "\n" + out + "\n" + err

    # The capture did see the run, at DEBUG: the server's own lines, the access log, httpx.
    assert "provisioned device" in text and "POST /v1/provision" in text and "/v1/admin/capsules" in text
    assert "admin API: POST /v1/admin/vouchers by admin token 'ops' (operator)" in text  # the audit line
    assert '"level": "DEBUG"' in captured.getvalue()
    for name, secret in secrets.items():
        for form in forms(secret):
            assert form not in text, f"the {name} appears in the logs (as {form[:12]}...)"
