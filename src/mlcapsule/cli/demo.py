"""`mlcapsule demo`: the whole story on scikit-learn's digits, with the real parts.

Provider: train, pack, start the provisioning server on a free loopback port, create an account
and a grant. Client: set up an enclave (attestation, HPKE, license), then, with the server
stopped, predict offline, run the budget out, redeem a voucher offline, and show the status.
Finally the server comes back and the client uploads its signed usage receipts.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

BUDGET = 500
LEASE = 50
TOPUP = 200


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(app: Any, port: int) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1:``port`` in a thread, for the duration of the block."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="mlcapsule-demo-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the demo server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def run_demo(workdir: Path | None, console: Console) -> None:
    from ..enclave.errors import BudgetExhaustedError, UsageError

    try:
        import fastapi  # noqa: F401
        import sklearn  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(f"the demo needs the server and sklearn extras ({e.name} is missing)",
                         hint="pip install 'mlcapsule[server,sklearn]', or run scripts/demo.sh") from e

    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="mlcapsule-demo-")
        workdir = Path(own_tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    old_home = os.environ.get("MLCAPSULE_HOME")
    os.environ["MLCAPSULE_HOME"] = str(workdir / "home")  # the demo never touches your real state
    try:
        _demo(workdir, console, BudgetExhaustedError)
    finally:
        if old_home is None:
            os.environ.pop("MLCAPSULE_HOME", None)
        else:
            os.environ["MLCAPSULE_HOME"] = old_home
        if own_tmp is not None:
            own_tmp.cleanup()


def _step(console: Console, n: int, text: str) -> None:
    console.print(f"\n[bold cyan]{n}.[/] [bold]{text}[/]")


def _demo(workdir: Path, console: Console, BudgetExhaustedError: type[Exception]) -> None:
    import onnxruntime as ort

    import mlcapsule

    from ..demo.models import digits_classifier
    from ..enclave.crypto.keys import generate_provider_key
    from ..enclave.errors import TransportError
    from ..enclave.format.manifest import Policy
    from ..enclave.measurement import measurement
    from ..provider_client import ProviderClient
    from ..server.app import create_app
    from ..server.settings import ServerSettings
    from .main import SOFTWARE_WARNING

    t_start = time.perf_counter()
    console.print(f"[bold]mlcapsule demo[/]  (work folder {workdir})")
    console.print(f"[yellow]note:[/] {SOFTWARE_WARNING}")

    _step(console, 1, "Provider: train a classifier on scikit-learn's digits")
    model, info = digits_classifier(seed=0)
    x_test, y_test = info["x_test"], info["y_test"]
    console.print(f"   MLP 64-64-10, held-out accuracy of the plain model: {info['accuracy']:.3f} "
                  f"on {len(y_test)} digits")

    _step(console, 2, "Provider: create a signing key and pack the model into an encrypted capsule")
    key_path = workdir / "provider" / "provider-key.pem"
    generate_provider_key(key_path, overwrite=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    capsule = workdir / "digits.capsule"
    res = mlcapsule.pack(model, capsule, provider_key=key_path, name="digits", server_url=url,
                         class_names=info["class_names"], preprocessing=info["preprocessing"].to_dict(),
                         policy=Policy(budget=BUDGET, lease_size=LEASE), provider_name="demo provider",
                         defenses=["ood"], defense_data=info["x_train"])
    console.print(f"   {capsule.name}: {capsule.stat().st_size} bytes, graph and weights encrypted (AES-256-GCM), "
                  f"manifest signed (Ed25519); content key kept at the provider in {res.key_path.name}")
    from ..enclave.defenses.policy import DefensePolicy

    for line in DefensePolicy.from_dict(res.manifest.policy.defenses).describe():
        console.print(f"   defense, enforced in the enclave: {line}", soft_wrap=True)

    _step(console, 3, f"Provider: start the provisioning server on {url}")
    settings = ServerSettings(database_url=f"sqlite:///{workdir / 'provider' / 'server.db'}",
                              provider_key_path=key_path, allow_software_evidence=True,
                              allowed_measurements=frozenset({measurement().hex()}))
    app = create_app(settings)
    service = app.state.service
    console.print("   [yellow]accepting 'software' evidence (--UNSAFE-allow-software-evidence): demo only[/]")
    service.register_capsule(capsule, res.key_path, provider_public=None)
    _, token = service.add_account("hospital-a")
    service.grant("hospital-a", str(capsule), budget=BUDGET, devices=1, expires=None)
    console.print(f"   account 'hospital-a' created; grant: {BUDGET} queries, 1 device, lease {LEASE}")

    # The client pins the provider's public key (it would receive provider-key.pem.pub with the capsule).
    from ..enclave.crypto.keys import load_provider_key, raw_public
    from ..enclave.format.trust import TrustProviderKey

    pinned = TrustProviderKey(raw_public(load_provider_key(key_path).public_key()))
    with mlcapsule.open_capsule(capsule, trust=pinned) as cap:
        _step(console, 4, "Client: set up the enclave (attest, receive key and license over HPKE, seal)")
        with running_server(app, port):
            lic = cap.setup(token=token, server=url)
        console.print(f"   license {lic['license_id'][:8]}… for device {lic['device_id'][:8]}…, budget {lic['budget']}")

        _step(console, 5, "The server is stopped: everything from here on is offline")
        try:
            with ProviderClient(url, token, timeout=1) as pc:
                pc.health()
            console.print("   [red]the server still answers?[/]")
        except TransportError:
            console.print(f"   {url} does not answer (connection refused)")

        _step(console, 6, "Client: predict the held-out digits offline, inside the enclave")
        t0 = time.perf_counter()
        probs = np.concatenate([cap.predict(x_test[i:i + 50]) for i in range(0, len(x_test), 50)])
        dt_ms = (time.perf_counter() - t0) * 1000
        acc = float(np.mean(probs.argmax(axis=1) == y_test))
        plain = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x_test})[0]
        same = np.allclose(probs, plain, rtol=1e-5, atol=1e-6)
        st = cap.status()["license_status"]
        console.print(f"   accuracy {acc:.3f} on {len(y_test)} digits ({dt_ms:.0f} ms); "
                      f"{'identical to' if same else 'DIFFERENT from'} plain ONNX Runtime")
        console.print(f"   budget: {st['answered']} answered, {st['remaining']} left of {st['budget']}")

        _step(console, 7, "Client: keep querying until the budget runs out")
        answered = 0
        try:
            while True:
                cap.predict(x_test[answered % 440:answered % 440 + 10])
                answered += 10
        except BudgetExhaustedError as e:
            console.print(f"   after {answered} more: [red]refused[/]: {e}")

        _step(console, 8, f"Provider issues a voucher for {TOPUP} queries; the client redeems it offline")
        voucher = service.issue_voucher(lic["license_id"], TOPUP)
        (workdir / "voucher-1.json").write_text(__import__("json").dumps(voucher))
        st = cap.topup(voucher)
        console.print(f"   voucher #{st['vouchers_redeemed']} redeemed: {st['remaining']} queries left")
        probs = cap.predict(x_test[:100])
        console.print(f"   100 more predictions, accuracy {float(np.mean(probs.argmax(1) == y_test[:100])):.3f}")
        try:
            cap.topup(voucher)
        except Exception as e:  # the replayed voucher must be refused
            console.print(f"   the same voucher again: [red]refused[/]: {e}")

        _step(console, 9, "A client tries to copy the model with 100 uniform random queries (model stealing)")
        rng = np.random.default_rng(0)
        pending = cap.status()["license_status"]["receipts_pending"]
        for _ in range(100):
            cap.predict(rng.uniform(0, 16, (1, 64)).astype(np.float32))
        grew = cap.status()["license_status"]["receipts_pending"] - pending
        console.print("   all 100 answered: the policy's action is 'record'. The detectors' verdicts stay inside the "
                      f"enclave (the client's status does not show them); {grew} new signed receipt(s) wait for "
                      "the next sync", soft_wrap=True)

        _step(console, 10, "Client: status")
        status = cap.status()
        lic = status["license_status"]
        console.print(f"   backend {status['backend']}, hardening: " +
                      "; ".join(f"{k}: {v}" for k, v in status["hardening"].items()))
        console.print(f"   budget {lic['budget']}, answered {lic['answered']}, remaining {lic['remaining']}, "
                      f"charged {lic['charged']} (lease {lic['lease_size']}), "
                      f"receipts pending {lic['receipts_pending']}, "
                      f"rollback protected: {'yes' if lic['rollback_protected'] else 'NO (software backend)'}")

        _step(console, 11, "Back online: the client uploads its signed usage receipts")
        with running_server(app, port):
            ack = cap.sync(token=token, server=url)
        rows = service.usage()
        for r in rows:
            console.print(f"   provider's books: account {r.get('account')}, charged {r.get('charged')}, "
                          f"answered {r.get('answered')}, alarms {r.get('alarms')} (receipts up to #{ack['seq']})")
        for a in service.alarms():
            console.print(f"   provider sees the alarm: detector {a['detector']} at query {a['query']} of device "
                          f"{a['device_id'][:8]}…, action {a['action']} (`mlcapsule admin alarms`)")
    app.state.engine.dispose()
    console.print(f"\n[bold green]demo finished in {time.perf_counter() - t_start:.1f} s[/]")
