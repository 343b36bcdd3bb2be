"""End to end through the real CLI: `mlcapsule serve` as a process on loopback, the admin
commands, and a client that sets up, goes offline, predicts, tops up and syncs.

Every step is a separate `mlcapsule` process, as a user would run them.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlcapsule.enclave.measurement import measurement

BIN = [sys.executable, "-m", "mlcapsule"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CLI:
    def __init__(self, home: Path) -> None:
        self.env = {**os.environ, "MLCAPSULE_HOME": str(home), "COLUMNS": "200"}

    def __call__(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([*BIN, *args], env=self.env, capture_output=True, text=True, timeout=120)
        if ok and p.returncode != 0:
            raise AssertionError(f"mlcapsule {' '.join(args)} failed ({p.returncode}): {p.stderr}")
        return p

    def serve(self, port: int, db: str, key: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*BIN, "serve", "--port", str(port), "--database-url", db, "--provider-key", str(key),
             "--UNSAFE-allow-software-evidence", "--allow-measurement", measurement().hex()],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return proc
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
                time.sleep(0.1)
        proc.kill()
        raise AssertionError("server did not start")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    import onnx

    from mlcapsule.demo.models import digits_classifier

    model, info = digits_classifier(seed=1)
    d = tmp_path_factory.mktemp("digits")
    onnx.save(model, d / "digits.onnx")
    return d / "digits.onnx", info


def test_provider_and_client_cli_end_to_end(tmp_path: Path, digits) -> None:  # type: ignore[no-untyped-def]
    model_path, info = digits
    prov, client = CLI(tmp_path / "provider-home"), CLI(tmp_path / "client-home")
    key = tmp_path / "provider-home" / "provider" / "provider-key.pem"
    port = _free_port()
    db = f"sqlite:///{tmp_path / 'server.db'}"
    cap = tmp_path / "digits.capsule"

    prov("provider", "init")
    prov("pack", str(model_path), "-o", str(cap), "--server-url", f"http://127.0.0.1:{port}",
         "--image-size", "8x8", "--channels", "1", "--layout", "flat", "--scale", str(16 / 255),
         "--class-names", ",".join(info["class_names"]), "--lease-size", "10")
    admin = ["--database-url", db]
    prov("admin", "capsule", "add", str(cap), "--key", f"{cap}.key", *admin, "--provider-key", str(key))
    out = prov("admin", "account", "add", "clinic", *admin).stdout
    token = re.search(r"[A-Za-z0-9_\-]{30,}", out)
    assert token, out
    prov("admin", "grant", "clinic", str(cap), "--budget", "25", "--devices", "1", "--expires", "30d", *admin)

    server = prov.serve(port, db, key)
    try:
        client("setup", str(cap), "--token", token.group(0))
        # A second device for the same grant is refused: provision once.
        other = CLI(tmp_path / "other-home")
        p = other("setup", str(cap), "--token", token.group(0), ok=False)
        assert p.returncode == 6 and "device" in p.stderr.lower() and "Traceback" not in p.stderr
    finally:
        _stop(server)

    # Offline from here.
    x = info["x_test"][:20]
    np.save(tmp_path / "batch.npy", x)
    p = client("predict", str(cap), str(tmp_path / "batch.npy"))
    rows = json.loads(p.stdout)
    assert len(rows) == 20
    acc = np.mean([int(r["class"]) == y for r, y in zip(rows, info["y_test"][:20])])
    assert acc >= 0.85
    # A PNG image of a test digit, scaled back to 0..255, is read through the manifest's preprocessing.
    from PIL import Image

    img = (info["x_test"][0].reshape(8, 8) * 255 / 16).round().astype(np.uint8)
    Image.fromarray(img, mode="L").save(tmp_path / "digit.png")
    p = client("predict", str(cap), str(tmp_path / "digit.png"))
    assert int(json.loads(p.stdout)[0]["class"]) == int(np.argmax(rows[0]["probabilities"]))

    p = client("predict", str(cap), str(tmp_path / "batch.npy"), ok=False)  # 21 used, 20 more > 25
    assert p.returncode == 6 and "budget" in p.stderr and p.stdout.strip() == ""

    lic = json.loads(client("status", str(cap), "--json").stdout)["license_status"]
    assert lic["budget"] == 25
    prov("admin", "voucher", lic["license_id"], "--queries", "30", "-o", str(tmp_path / "v1.json"), *admin)
    client("topup", str(cap), str(tmp_path / "v1.json"))
    p = client("topup", str(cap), str(tmp_path / "v1.json"), ok=False)
    assert p.returncode == 6 and "Traceback" not in p.stderr
    client("predict", str(cap), str(tmp_path / "batch.npy"))

    server = prov.serve(port, db, key)
    try:
        client("sync", str(cap), "--token", token.group(0))
    finally:
        _stop(server)
    usage = prov("admin", "usage", *admin).stdout
    assert "clinic" in usage


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    p = subprocess.run([*BIN, "demo", "--workdir", str(tmp_path / "demo")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert re.search(r"accuracy 0\.9\d\d on 450 digits", out)
    assert "identical to plain ONNX Runtime" in out
    assert "query budget is exhausted" in out
    assert "voucher #1 redeemed" in out
    assert "does not answer" in out
    assert "rollback protected: NO" in out
    assert "all 100 answered" in out
    assert re.search(r"provider sees the alarm: detector ood at query \d+", out)


def test_run_on_a_capsule_packed_without_preprocessing(tmp_path: Path) -> None:
    """A plain `pack` (no --image-size/--scale) takes model-ready .npy/.csv/.json inputs."""
    import onnx
    import onnxruntime as ort

    from mlcapsule.demo.models import mlp

    cli = CLI(tmp_path / "home")
    model = mlp(16, [32], 4, seed=3)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    cli("provider", "init")
    cli("pack", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.capsule"))
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    for f in ("x.npy", "x.csv"):
        rows = json.loads(cli("run", str(tmp_path / "m.capsule"), str(tmp_path / f),
                              "--unsafe-dev-key", str(tmp_path / "m.capsule.key")).stdout)
        np.testing.assert_allclose(np.array([r["probabilities"] for r in rows]), ref, rtol=1e-5, atol=1e-6)
