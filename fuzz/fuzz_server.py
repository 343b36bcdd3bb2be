"""Fuzz the provider server's request bodies, in process, against a temporary SQLite database.

Input: a mode byte (the endpoint), then the raw request body, POSTed with the right token:
  0 /v1/challenge  1 /v1/provision  2 /v1/usage              (an account token)
  3 /v1/admin/accounts  4 capsules  5 grants  6 revocations  7 vouchers  8 unlocks  9 receipts
 10 /v1/admin/tokens                                         (an operator admin token)
Placeholders in the body are filled in before it is sent, so that mutated requests still reach
the service behind the schemas: ``@CAPSULE@`` (the registered capsule's id), ``@NONCE@`` (a fresh
challenge's nonce), ``@HPKE@`` and ``@RECEIPT@`` (an enclave's keys), ``"@EVIDENCE@"`` (software
evidence from the real backend for that nonce and those keys), ``@LICENSE@`` and ``@DEVICE@``
(a license provisioned at start-up). Usage uploads (mode 2) and receipt imports (mode 9) go to a
device provisioned for that input with the seeds' receipt key: the receipts' license id is
replaced by its own, each body is re-signed, and a ``prev`` that linked to the previous entry
is relinked to its re-signed hash, so mutated chains reach the service's storage. The rule for
the server: every answer is a 2xx or a 4xx (or the 503 of an unavailable database); a 500, or
an exception out of the app, is a finding.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from _common import DATA, b64, context, instrumented, json_or_none, main, split

# Not instrumented: atheris recompiles a module without its `from __future__ import annotations`,
# and AdminTokens's annotations then evaluate `list[...]` to its own method `list`.
from mlcapsule.server import admin_api  # noqa: E402,F401  isort: skip

with instrumented(__name__ == "__main__"):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from fastapi.testclient import TestClient

    from mlcapsule.enclave._util import b64d, b64e, canonical_json
    from mlcapsule.enclave.backends.software import SoftwareBackend
    from mlcapsule.enclave.crypto.keys import load_provider_key, raw_public
    from mlcapsule.enclave.measurement import measurement
    from mlcapsule.enclave.messages import receipts as R
    from mlcapsule.enclave.messages.setup import report_data
    from mlcapsule.server.admin_api import AdminTokens
    from mlcapsule.server.app import create_app
    from mlcapsule.server.settings import ServerSettings

if __name__ == "__main__":  # the app logs every refusal: not this harness's output (and not when pytest imports it)
    logging.disable(logging.CRITICAL)
_CTX = context()
_PATHS = ["/v1/challenge", "/v1/provision", "/v1/usage", "/v1/admin/accounts", "/v1/admin/capsules",
          "/v1/admin/grants", "/v1/admin/revocations", "/v1/admin/vouchers", "/v1/admin/unlocks",
          "/v1/admin/receipts", "/v1/admin/tokens"]
_WORK = Path(tempfile.mkdtemp(prefix="mlcapsule-fuzz-server-"))
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)  # a replay in pytest; run.py sets TMPDIR
shutil.copytree(DATA / "platform", _WORK / "platform")
_BACKEND = SoftwareBackend(platform_dir=_WORK / "platform")
_HPKE = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
_RECEIPT = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
#: The receipt key the seeds' chains were signed with (the enclave's, from make_corpus.py's setup).
_CHAIN_KEY = Ed25519PrivateKey.from_private_bytes(b64(_CTX["receipt_private"]))


def _private_copy(name: str) -> Path:
    """A 0600 copy of a key file from fuzz/data (git checks files out 0644, which the key loaders refuse)."""
    dst = _WORK / name
    dst.write_bytes((DATA / name).read_bytes())
    dst.chmod(0o600)
    return dst


def _start() -> tuple[TestClient, dict[str, str], dict[str, str], dict[bytes, bytes]]:
    key_path = _private_copy("provider-key.pem")
    settings = ServerSettings(database_url=f"sqlite:///{_WORK / 'server.db'}", provider_key_path=key_path,
                              allow_software_evidence=True,
                              allowed_measurements=frozenset({measurement().hex(), _CTX["measurement"]}))
    app = create_app(settings)
    service = app.state.service
    _, token = service.add_account("fuzz")
    service.register_capsule(DATA / "tiny.capsule", _private_copy("tiny.capsule.key"),
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


def _provision(receipt_pub: bytes) -> tuple[str, str] | None:
    nonce = _nonce(_CLIENT, _USER)
    r = _CLIENT.post("/v1/provision", headers=_USER, json={
        "capsule_id": _CTX["capsule_id"], "version": _CTX["version"], "nonce": b64e(nonce),
        "hpke_pub": b64e(_HPKE), "receipt_pub": b64e(receipt_pub),
        "evidence": _BACKEND.evidence(report_data(nonce, _HPKE, receipt_pub))})
    return (r.json()["license_id"], r.json()["device_id"]) if r.status_code == 200 else None


def _rechained(body: bytes) -> bytes:
    """``body`` for a device of its own: license id replaced, receipts re-signed and relinked."""
    device = _provision(b64(_CTX["receipt_key"]))
    if device is None:  # e.g. a fuzzed revocation of the grant: send the body as it is
        return body
    license_id, device_id = device
    doc = json_or_none(body)
    if isinstance(doc, dict) and isinstance(doc.get("receipts"), list):
        out, prev_old, prev_new = [], R.GENESIS, R.GENESIS
        for e in doc["receipts"]:
            if isinstance(e, dict) and isinstance(e.get("body"), dict):
                try:
                    old_hash = R.entry_hash(e)
                except Exception:  # noqa: BLE001 -- the harness's side: then nothing links to it
                    old_hash = ""
                b = dict(e["body"])
                if b.get("license_id") in ("@LICENSE@", _CTX["license_id"]):
                    b["license_id"] = license_id
                if b.get("prev") == prev_old:
                    b["prev"] = prev_new
                try:
                    e = {**e, "body": b, "signature": b64e(_CHAIN_KEY.sign(R._CONTEXT + canonical_json(b)))}
                    prev_new = R.entry_hash(e)
                except Exception:  # noqa: BLE001 -- not canonical JSON: left as it is (the server must refuse it)
                    prev_new = ""
                prev_old = old_hash
            out.append(e)
        try:
            body = json.dumps({**doc, "receipts": out}).encode()
        except (ValueError, RecursionError):
            pass
    for old, new in zip((b"@LICENSE@", b"@DEVICE@", _CTX["license_id"].encode(), _CTX["device_id"].encode()),
                        (license_id, device_id, license_id, device_id), strict=True):
        body = body.replace(old, new.encode())
    return body


def TestOneInput(data: bytes) -> None:  # noqa: N802
    mode, body = split(data, len(_PATHS))
    if mode in (2, 9):
        body = _rechained(body)
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
