"""End-to-end tests of the `mlcapsule` command line, run as a user runs it: the installed
script in a subprocess, with MLCAPSULE_HOME in a temporary folder.

Errors must come out as exactly one line on stderr with the documented exit code, never a
traceback. Predictions must equal plain ONNX Runtime on the plain model.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import assert_matches_reference, assert_one_line_error, flip_byte, layout, plain_ort

from mlcapsule.enclave.format import CapsuleFile
from mlcapsule.enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey  # noqa: F401

RunCli = Callable[..., Any]
CLASSES = ["zero", "one", "two", "three", "four"]


def _ok(r: Any) -> Any:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr
    return r


def _flat(text: str) -> str:
    return " ".join(text.split())


def _softmax64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# -- a provider and a capsule made with the CLI, shared by the module ------------------------------
@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory, run_cli: RunCli) -> dict[str, Path]:
    home = tmp_path_factory.mktemp("cli-home")
    key = home / "keys" / "provider-key.pem"
    r = _ok(run_cli(["provider", "init", "--key", key], home=home))
    assert "key id" in _flat(r.stdout)
    return {"home": home, "key": key, "pub": Path(str(key) + ".pub")}


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory: pytest.TempPathFactory, run_cli: RunCli, provider: dict[str, Path]) -> dict[str, Any]:
    from mlcapsule.demo import models

    d = tmp_path_factory.mktemp("cli-mlp")
    model = models.mlp(16, [32], len(CLASSES), seed=4)
    onnx.save(model, str(d / "mlp.onnx"))
    capsule = d / "mlp.capsule"
    r = _ok(run_cli(["pack", d / "mlp.onnx", "-o", capsule, "--key", provider["key"], "--name", "digits-ish",
                     "--class-names", ",".join(CLASSES), "--image-size", "4x4", "--channels", "1", "--layout", "flat",
                     "--scale", "0.0625", "--provider-name", "ACME", "--budget", "1000", "--expires", "30d",
                     "--description", "test model"], home=provider["home"]))
    assert "packed" in r.stdout
    return {"dir": d, "model": model, "capsule": capsule, "key": Path(str(capsule) + ".key"), "pack_stdout": r.stdout,
            "pub": provider["pub"]}


@pytest.fixture
def tampered(tmp_path: Path, mlp_files: dict[str, Any]) -> Callable[[str], tuple[Path, Path]]:
    """A copy of the CLI's capsule with one byte flipped in the given region."""
    import shutil

    def make(region: str) -> tuple[Path, Path]:
        cap, key = tmp_path / f"{region}.capsule", tmp_path / f"{region}.capsule.key"
        shutil.copy2(mlp_files["capsule"], cap)
        shutil.copy2(mlp_files["key"], key)
        lay = layout(cap)
        pos = {"magic": 1, "manifest": 64 + lay.manifest_length // 2, "signature": lay.signature_offset + 5,
               "ciphertext": lay.segment_range("weights")[0] + 100}[region]
        flip_byte(cap, pos)
        return cap, key

    return make


# -- provider init ----------------------------------------------------------------------------------
def test_provider_init_writes_a_private_key_with_mode_0600(run_cli: RunCli, mlcapsule_home: Path) -> None:
    r = _ok(run_cli(["provider", "init"]))
    key = mlcapsule_home / "provider" / "provider-key.pem"  # the default location, under MLCAPSULE_HOME
    assert key.is_file() and str(key) in _flat(r.stdout)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and b"ENCRYPTED" not in key.read_bytes()
    pub = Path(str(key) + ".pub")
    assert b"PUBLIC KEY" in pub.read_bytes() and b"PRIVATE" not in pub.read_bytes()
    before = key.read_bytes()
    again = run_cli(["provider", "init"])  # never silently replaces a key
    assert again.returncode == 2
    assert "already exists" in assert_one_line_error(again.stderr)
    assert key.read_bytes() == before
    _ok(run_cli(["provider", "init", "--force"]))
    assert key.read_bytes() != before
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_provider_init_with_passphrase_file(run_cli: RunCli, tmp_path: Path, mlp_files: dict[str, Any]) -> None:
    secret = tmp_path / "passphrase.txt"
    secret.write_text("correct horse battery staple\n")
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("Tr0ub4dor&3\n")
    key = tmp_path / "protected.pem"
    _ok(run_cli(["provider", "init", "--key", key, "--passphrase-file", secret]))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    assert b"correct horse" not in key.read_bytes()
    model = mlp_files["dir"] / "mlp.onnx"

    r = run_cli(["pack", model, "-o", tmp_path / "w.capsule", "--key", key, "--passphrase-file", wrong])
    assert r.returncode == 5
    assert "passphrase" in assert_one_line_error(r.stderr)
    assert not (tmp_path / "w.capsule").exists()

    r = run_cli(["pack", model, "-o", tmp_path / "n.capsule", "--key", key])  # no passphrase at all
    assert r.returncode == 5
    assert "passphrase" in assert_one_line_error(r.stderr)

    _ok(run_cli(["pack", model, "-o", tmp_path / "ok.capsule", "--key", key, "--passphrase-file", secret]))
    _ok(run_cli(["pack", model, "-o", tmp_path / "env.capsule", "--key", key],
                MLCAPSULE_PASSPHRASE="correct horse battery staple"))
    _ok(run_cli(["verify", tmp_path / "ok.capsule", "--unsafe-trust-manifest-key"]))


def test_unsafe_key_file_permissions_are_refused(run_cli: RunCli, tmp_path: Path, provider: dict[str, Path],
                                                 mlp_files: dict[str, Any]) -> None:
    import shutil

    key = tmp_path / "loose.pem"
    shutil.copy2(provider["key"], key)
    os.chmod(key, 0o644)
    r = run_cli(["pack", mlp_files["dir"] / "mlp.onnx", "-o", tmp_path / "x.capsule", "--key", key])
    assert r.returncode == 5
    assert "chmod 600" in assert_one_line_error(r.stderr)


# -- pack, inspect, verify ----------------------------------------------------------------------------
def test_pack_writes_capsule_and_private_content_key(mlp_files: dict[str, Any]) -> None:
    assert stat.S_IMODE(mlp_files["key"].stat().st_mode) == 0o600
    assert "never ship it" in _flat(mlp_files["pack_stdout"])
    with CapsuleFile(mlp_files["capsule"], trust=UnsafeTrustManifestKey()) as cf:
        m = cf.manifest
    assert m.name == "digits-ish" and m.provider_name == "ACME" and m.description == "test model"
    assert m.class_names == tuple(CLASSES)
    assert m.preprocessing["image_size"] == [4, 4] and m.preprocessing["channels"] == 1
    assert m.preprocessing["layout"] == "flat" and m.preprocessing["scale"] == 0.0625
    assert m.policy.budget == 1000 and m.policy.expires is not None
    assert m.segment("graph").encrypted and m.segment("weights").encrypted


def test_pack_no_tune_takes_the_first_correct_runtime_and_says_which(run_cli: RunCli, mlp_files: dict[str, Any],
                                                                     provider: dict[str, Path], tmp_path: Path) -> None:
    from mlcapsule.packer import RUNTIME_CANDIDATES

    out = tmp_path / "fast.capsule"
    r = _ok(run_cli(["pack", mlp_files["dir"] / "mlp.onnx", "-o", out, "--key", provider["key"], "--no-tune"],
                    home=provider["home"]))
    with CapsuleFile(out, trust=UnsafeTrustManifestKey()) as cf:
        rt = cf.manifest.runtime
    assert (rt.initializers, rt.optimization, rt.prepacking) == (
        RUNTIME_CANDIDATES[0].initializers, RUNTIME_CANDIDATES[0].optimization, RUNTIME_CANDIDATES[0].prepacking)
    assert "first correct" in _flat(r.stdout) and f"'{rt.optimization}'" in _flat(r.stdout)
    assert "fastest correct" in _flat(mlp_files["pack_stdout"])


def test_inspect_shows_capsule_id_and_inputs(run_cli: RunCli, mlp_files: dict[str, Any]) -> None:
    with CapsuleFile(mlp_files["capsule"], trust=UnsafeTrustManifestKey()) as cf:
        cid = str(cf.manifest.capsule_id)
    r = _ok(run_cli(["inspect", mlp_files["capsule"], "--unsafe-trust-manifest-key"]))
    out = _flat(r.stdout)
    assert cid in out
    assert "input" in out and "float32" in out and "16" in out
    assert "probabilities" in out
    assert "zero" in out and "encrypted" in out and "budget 1000" in out


def test_inspect_json_parses(run_cli: RunCli, mlp_files: dict[str, Any]) -> None:
    r = _ok(run_cli(["inspect", "--json", mlp_files["capsule"], "--trust", mlp_files["pub"]]))
    d = json.loads(r.stdout)
    with CapsuleFile(mlp_files["capsule"], trust=UnsafeTrustManifestKey()) as cf:
        assert d == cf.manifest.to_dict()
    assert d["model"]["inputs"][0]["name"] == "input"
    assert d["model"]["class_names"] == CLASSES
    assert d["model"]["public_architecture"] is False


def test_verify_accepts_an_intact_capsule(run_cli: RunCli, mlp_files: dict[str, Any], provider: dict[str, Path]) -> None:
    r = _ok(run_cli(["verify", mlp_files["capsule"], "--unsafe-trust-manifest-key"]))
    assert _flat(r.stdout).startswith("OK") and "NOT checked" in _flat(r.stdout)
    assert "warning:" in r.stderr and "integrity only" in _flat(r.stderr)
    r = _ok(run_cli(["verify", mlp_files["capsule"], "--trust", provider["pub"]]))
    assert "signed by the trusted provider key" in _flat(r.stdout)


@pytest.mark.parametrize("region,codes", [("magic", {3}), ("manifest", {3, 4}), ("signature", {4}),
                                          ("ciphertext", {4})])
def test_tampered_capsule_fails_verify_with_one_line(run_cli: RunCli, tampered: Callable, region: str,
                                                     codes: set[int]) -> None:
    cap, _ = tampered(region)
    r = run_cli(["verify", cap, "--unsafe-trust-manifest-key"])
    assert r.returncode in codes, (r.returncode, r.stderr)
    assert_one_line_error(r.stderr, allow_warning=True)
    assert "OK" not in r.stdout


@pytest.mark.parametrize("region,codes", [("manifest", {3, 4}), ("ciphertext", {4})])
def test_tampered_capsule_fails_run_with_one_line(run_cli: RunCli, tampered: Callable, tmp_path: Path,
                                                  region: str, codes: set[int]) -> None:
    cap, key = tampered(region)
    x = tmp_path / "x.npy"
    np.save(x, np.ones((1, 16), np.float32))
    r = run_cli(["run", cap, x, "--unsafe-dev-key", key, "--state-dir", tmp_path / "state"])
    assert r.returncode in codes, (r.returncode, r.stderr)
    assert_one_line_error(r.stderr, allow_warning=True)
    assert r.stdout.strip() == ""  # no predictions from a tampered capsule


def test_cli_errors_in_process(cli, tmp_path: Path, mlp_files: dict[str, Any]) -> None:
    """The in-process entry point maps errors to exit codes with one line on stderr."""
    r = cli("inspect", tmp_path / "missing.capsule")
    assert r.code == 3
    assert_one_line_error(r.err)
    junk = tmp_path / "junk.capsule"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    r = cli("verify", junk)
    assert r.code == 3 and "bad magic" in assert_one_line_error(r.err)
    r = cli("verify", mlp_files["capsule"], "--trust", mlp_files["key"])  # a content key is not a public key
    assert r.code == 2
    assert_one_line_error(r.err)
    r = cli("verify", mlp_files["capsule"])  # no trust decision: refused, not trusted silently
    assert r.code == 2 and "no provider key is pinned" in assert_one_line_error(r.err)
    r = cli("verify", mlp_files["capsule"], "--trust", mlp_files["pub"])
    assert r.code == 0 and r.err == ""


# -- run ------------------------------------------------------------------------------------------------
def test_run_prints_same_classes_and_probabilities_as_onnxruntime(run_cli: RunCli, tmp_path: Path,
                                                                  mlp_files: dict[str, Any]) -> None:
    x = np.random.default_rng(11).standard_normal((4, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (ref,) = plain_ort(mlp_files["model"], {"input": x})
    r = _ok(run_cli(["run", mlp_files["capsule"], tmp_path / "x.npy", "--unsafe-dev-key", mlp_files["key"],
                     "--top-k", "3", "--state-dir", tmp_path / "state"]))
    assert "unsafe-dev-key" in r.stderr  # the warning is printed, on stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 4
    for row, want in zip(rows, ref):
        best = int(np.argmax(want))
        assert row["index"] == best and row["class"] == CLASSES[best]
        assert_matches_reference(np.array(row["probabilities"], dtype=np.float32), want)
        assert [t["class"] for t in row["top"]] == [CLASSES[i] for i in np.argsort(-want, kind="stable")[:3]]
        assert row["probability"] == pytest.approx(float(want[best]), rel=1e-5)


def test_run_writes_npy_output(run_cli: RunCli, tmp_path: Path, mlp_files: dict[str, Any]) -> None:
    x = np.random.default_rng(12).standard_normal((6, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (ref,) = plain_ort(mlp_files["model"], {"input": x})
    out = tmp_path / "out.npy"
    _ok(run_cli(["run", mlp_files["capsule"], tmp_path / "x.npy", "--unsafe-dev-key", mlp_files["key"],
                 "-o", out, "--state-dir", tmp_path / "state"]))
    assert_matches_reference(np.load(out), ref)
    out_json = tmp_path / "out.json"
    _ok(run_cli(["run", mlp_files["capsule"], tmp_path / "x.npy", "--unsafe-dev-key", mlp_files["key"],
                 "-o", out_json, "--state-dir", tmp_path / "state"]))
    assert_matches_reference(np.array(json.loads(out_json.read_text()), dtype=np.float32), ref)


def test_run_with_another_capsules_key_fails_with_one_line(run_cli: RunCli, tmp_path: Path,
                                                           mlp_files: dict[str, Any], provider: dict[str, Path]) -> None:
    other = tmp_path / "other.capsule"
    _ok(run_cli(["pack", mlp_files["dir"] / "mlp.onnx", "-o", other, "--key", provider["key"]]))
    np.save(tmp_path / "x.npy", np.ones((1, 16), np.float32))
    r = run_cli(["run", mlp_files["capsule"], tmp_path / "x.npy", "--unsafe-dev-key", str(other) + ".key",
                 "--state-dir", tmp_path / "state"])
    assert r.returncode == 4
    assert "another capsule" in assert_one_line_error(r.stderr, allow_warning=True)


def test_status_states_the_software_backend_threat_model(run_cli: RunCli, mlcapsule_home: Path) -> None:
    r = _ok(run_cli(["status"]))
    out = _flat(r.stdout)
    assert "software" in out
    assert "does NOT protect against" in out
    assert "root" in out
    r = _ok(run_cli(["status", "--json"]))
    info = json.loads(r.stdout)
    assert info["backend"] == "software"
    assert info["threat_model"]["rollback_protected"] is False
    assert any("root" in s for s in info["threat_model"]["does_not_protect_against"])


# -- the must-show: MobileNetV2 through the CLI --------------------------------------------------------
@pytest.fixture(scope="module")
def cli_mobilenet(tmp_path_factory: pytest.TempPathFactory, run_cli: RunCli, provider: dict[str, Path],
                  mobilenet_model: onnx.ModelProto) -> dict[str, Any]:
    """MobileNetV2 (random weights) saved as mobilenet.onnx and packed with `mlcapsule pack`, once."""
    d = tmp_path_factory.mktemp("cli-mobilenet")
    onnx.save(mobilenet_model, str(d / "mobilenet.onnx"))
    names = [f"class_{i:03d}" for i in range(1000)]
    (d / "classes.txt").write_text("\n".join(names) + "\n")
    r = run_cli(["pack", d / "mobilenet.onnx", "-o", d / "mobilenet.capsule", "--key", provider["key"],
                 "--class-names", d / "classes.txt", "--image-size", "224x224",
                 "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"], home=provider["home"])
    return {"dir": d, "names": names, "pack": r}


def test_cli_mobilenet_v2_same_as_plain_onnxruntime(run_cli: RunCli, tmp_path: Path, cli_mobilenet: dict[str, Any],
                                                    mobilenet_model: onnx.ModelProto) -> None:
    """`mlcapsule pack mobilenet.onnx` then `mlcapsule run --unsafe-dev-key` on a [1,3,224,224] .npy
    prints the same top classes and probabilities as ONNX Runtime on the plain model."""
    _ok(cli_mobilenet["pack"])
    d, names = cli_mobilenet["dir"], cli_mobilenet["names"]
    capsule = d / "mobilenet.capsule"
    x = np.random.default_rng(2024).standard_normal((1, 3, 224, 224)).astype(np.float32)
    np.save(tmp_path / "image.npy", x)
    (logits,) = plain_ort(mobilenet_model, {"input": x})
    r = _ok(run_cli(["run", capsule, tmp_path / "image.npy", "--unsafe-dev-key", str(capsule) + ".key",
                     "--top-k", "5", "--state-dir", tmp_path / "state"]))
    (row,) = json.loads(r.stdout)
    order = np.argsort(-logits[0], kind="stable")
    assert [t["class"] for t in row["top"]] == [names[i] for i in order[:5]]
    assert row["class"] == names[order[0]] and row["index"] == int(order[0])
    # logits come back as scores, and the probabilities are their softmax
    assert_matches_reference(np.array(row["scores"], dtype=np.float32), logits[0])
    probs = _softmax64(logits)[0]
    got = np.array(row["probabilities"], dtype=np.float64)
    np.testing.assert_allclose(got, probs, rtol=1e-5, atol=1e-5 * probs.max())
    for t in row["top"]:
        assert t["probability"] == pytest.approx(probs[t["index"]], rel=1e-5)
