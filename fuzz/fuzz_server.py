"""Fuzz the provider server's request bodies, in process, against a temporary SQLite database.

Input: a mode byte (the endpoint), then the raw request body, POSTed with the right token:
  0 /v1/challenge  1 /v1/provision  2 /v1/usage              (an account token)
  3 /v1/admin/accounts  4 capsules  5 grants  6 revocations  7 vouchers  8 unlocks  9 receipts
 10 /v1/admin/tokens                                         (an operator admin token)
Placeholders in the body are filled in before it is sent, so that mutated requests still reach
the service behind the schemas: ``@CAPSULE@`` (the registered capsule's id), ``@NONCE@`` (a fresh
challenge's nonce), ``@HPKE@`` and ``@RECEIPT@`` (an enclave's keys), ``"@EVIDENCE@"`` (software
evidence from the real backend for that nonce and those keys), ``@LICENSE@`` and ``@DEVICE@``
(a license provisioned at start-up). The rule for the server: every answer is a 2xx or a 4xx
(or the 503 of an unavailable database); a 500, or an exception out of the app, is a finding.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from _common import DATA, context, instrumented, main, split

# Not instrumented: atheris recompiles a module without its `from __future__ import annotations`,
# and AdminTokens's annotations then evaluate `list[...]` to its own method `list`.
from mlcapsule.server import admin_api  # noqa: E402,F401  isort: skip

with instrumented(__name__ == "__main__"):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from fastapi.testclient import TestClient

    from mlcapsule.enclave._util import b64d, b64e
    from mlcapsule.enclave.backends.software import SoftwareBackend
    from mlcapsule.enclave.crypto.keys import load_provider_key, raw_public
    from mlcapsule.enclave.measurement import measurement
    from mlcapsule.enclave.messages.setup import report_data
    from mlcapsule.server.admin_api import AdminTokens
    from mlcapsule.server.app import create_app
    from mlcapsule.server.settings import ServerSettings

logging.disable(logging.CRITICAL)  # the app logs every refusal: not this harness's output
_CTX = context()
_PATHS = ["/v1/challenge", "/v1/provision", "/v1/usage", "/v1/admin/accounts", "/v1/admin/capsules",
          "/v1/admin/grants", "/v1/admin/revocations", "/v1/admin/vouchers", "/v1/admin/unlocks",
          "/v1/admin/receipts", "/v1/admin/tokens"]
_WORK = Path(tempfile.mkdtemp(prefix="mlcapsule-fuzz-server-"))
shutil.copytree(DATA / "platform", _WORK / "platform")
_BACKEND = SoftwareBackend(platform_dir=_WORK / "platform")
_HPKE = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
_RECEIPT = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _start() -> tuple[TestClient, dict[str, str], dict[str, str], dict[bytes, bytes]]:
    key_path = DATA / "provider-key.pem"
    settings = ServerSettings(database_url=f"sqlite:///{_WORK / 'server.db'}", provider_key_path=key_path,
                              allow_software_evidence=True,
                              allowed_measurements=frozenset({measurement().hex(), _CTX["measurement"]}))
    app = create_app(settings)
    service = app.state.service
    _, token = service.add_account("fuzz")
    service.register_capsule(DATA / "tiny.capsule", DATA / "tiny.capsule.key",
                             provider_public=raw_public(load_provider_key(key_path).public_key()))
    service.grant("fuzz", _CTX["capsule_id"], budget=1000, devices=1_000_000, expires=None)
    _, admin = AdminTokens(service).create("fuzz-operator", "operator")
    client = TestClient(app, raise_server_exceptions=True)
    user = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    operator = {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"}
    fixed = {b"@CAPSULE@": _CTX["capsule_id"].encode(), b"@HPKE@": b64e(_HPKE).encode(),
             b"@RECEIPT@": b64e(_RECEIPT).encode()}
    nonce = _nonce(client, user)
    body = {"capsule_id": _CTX["capsule_id"], "version": _CTX["version"], "nonce": b64e(nonce),
            "hpke_pub": b64e(_HPKE), "receipt_pub": b64e(_RECEIPT),
            "evidence": _BACKEND.evidence(report_data(nonce, _HPKE, _RECEIPT))}
    r = client.post("/v1/provision", json=body, headers=user)
    if r.status_code != 200:
        raise RuntimeError(f"the harness's own provisioning failed: {r.status_code} {r.text}")
    fixed[b"@LICENSE@"], fixed[b"@DEVICE@"] = r.json()["license_id"].encode(), r.json()["device_id"].encode()
    return client, user, operator, fixed


def _nonce(client: TestClient, user: dict[str, str]) -> bytes:
    r = client.post("/v1/challenge", json={"capsule_id": _CTX["capsule_id"], "version": _CTX["version"]},
                    headers=user)
    if r.status_code != 200:  # e.g. a fuzzed revocation: the harness's nonce then does not matter
        return bytes(32)
    return b64d(r.json()["nonce"])


_CLIENT, _USER, _OPERATOR, _FIXED = _start()


def TestOneInput(data: bytes) -> None:  # noqa: N802
    mode, body = split(data, len(_PATHS))
    for k, v in _FIXED.items():
        body = body.replace(k, v)
    if b"@NONCE@" in body:
        nonce = _nonce(_CLIENT, _USER)
        body = body.replace(b"@NONCE@", b64e(nonce).encode())
        evidence = _BACKEND.evidence(report_data(nonce, _HPKE, _RECEIPT))
        body = body.replace(b'"@EVIDENCE@"', json.dumps(evidence).encode())
    headers = _USER if mode < 3 else _OPERATOR
    r = _CLIENT.post(_PATHS[mode], content=body, headers=headers)
    if r.status_code >= 500 and r.status_code != 503:
        raise AssertionError(f"POST {_PATHS[mode]} answered {r.status_code}: {r.text[:500]}")


if __name__ == "__main__":
    main(TestOneInput, json_input=True, prefix=1)
    sys.exit(0)
