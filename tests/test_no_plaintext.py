"""The weights and the (default: encrypted) architecture never appear in plaintext outside the enclave.

* no file written by pack or by a run (capsule, state, platform, MLCAPSULE_HOME, temp files,
  /dev/shm) contains a 32-byte window of the raw float32 weights or the content key;
* the capsule file does not contain the graph's node names, tensor names or op types;
* the host process's memory never holds the weights or the content key (read from
  /proc/PID/mem), while the enclave worker's does (a positive control for the scanner);
* the host-side API has no way to get at the weights, and the enclave refuses unknown ops.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import Packed, ProviderKey, assert_matches_reference, pack_model, plain_ort
from onnx import TensorProto, helper, numpy_helper

import mlcapsule
from mlcapsule.enclave.crypto.keys import ContentKey
from mlcapsule.enclave import protocol
from mlcapsule.host import EnclaveProcess
from mlcapsule.enclave.errors import ProtocolError

SECRET_NAMES = ["zq_hidden_projection_7f3a", "zq_gate_91b2", "zq_readout_c0ffee", "zq_secret_w1_d15ea5e",
                "zq_secret_w2_badc0de", "zq_graph_name_5ca1ab1e"]
SECRET_OPS = ["MatMul", "Softmax"]
SUSPICIOUS = re.compile(r"weight|secret|plaintext|decrypt|dump|content_key|graph_bytes|blob", re.I)


def secret_model() -> onnx.ModelProto:
    """A small MLP with distinctive names and random weights (about 40 KB)."""
    rng = np.random.default_rng(99)
    w1 = rng.standard_normal((32, 256)).astype(np.float32)
    b1 = rng.standard_normal(256).astype(np.float32)
    w2 = rng.standard_normal((256, 10)).astype(np.float32)
    b2 = rng.standard_normal(10).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "zq_secret_w1_d15ea5e"), numpy_helper.from_array(b1, "zq_b1"),
             numpy_helper.from_array(w2, "zq_secret_w2_badc0de"), numpy_helper.from_array(b2, "zq_b2")]
    nodes = [
        helper.make_node("MatMul", ["input", "zq_secret_w1_d15ea5e"], ["h0"], name="zq_hidden_projection_7f3a"),
        helper.make_node("Add", ["h0", "zq_b1"], ["h1"], name="zq_bias1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="zq_gate_91b2"),
        helper.make_node("MatMul", ["h2", "zq_secret_w2_badc0de"], ["h3"], name="zq_readout_c0ffee"),
        helper.make_node("Add", ["h3", "zq_b2"], ["h4"], name="zq_bias2"),
        helper.make_node("Softmax", ["h4"], ["probabilities"], name="zq_softmax", axis=-1),
    ]
    graph = helper.make_graph(nodes, "zq_graph_name_5ca1ab1e",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def weight_windows(model: onnx.ModelProto, per_tensor: int = 3) -> list[bytes]:
    """Distinctive 32-byte windows of every float initializer's raw little-endian bytes."""
    out = []
    for t in model.graph.initializer:
        raw = np.ascontiguousarray(numpy_helper.to_array(t), dtype="<f4").tobytes()
        if len(raw) < 64:
            continue
        for k in range(per_tensor):
            start = (len(raw) - 32) * k // max(1, per_tensor - 1)
            start -= start % 4
            out.append(raw[start:start + 32])
    assert len(set(out)) == len(out)
    return out


def files_under(*roots: Path, since: float | None = None) -> list[Path]:
    files = []
    for root in roots:
        if not root.exists():
            continue
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = Path(dirpath) / n
                try:
                    if p.is_symlink() or not p.is_file():
                        continue
                    if since is not None and p.stat().st_mtime < since:
                        continue
                except OSError:
                    continue
                files.append(p)
    return files


def find_in_files(files: Iterable[Path], needles: list[bytes]) -> list[str]:
    hits = []
    for p in files:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        for i, nd in enumerate(needles):
            if nd in data:
                hits.append(f"{p}: needle {i}")
    return hits


def secrets_of(packed: Packed) -> list[bytes]:
    key = ContentKey.load(packed.key_path).key
    return [key, base64.b64encode(key), base64.urlsafe_b64encode(key), key.hex().encode()]


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TMPDIR inside tmp_path, for this process and the workers it starts, so temp files get scanned."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    return tmp


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return secret_model()


# -- files ------------------------------------------------------------------------------------------
def test_scanner_finds_plaintext_weights_control(tmp_path: Path, model: onnx.ModelProto) -> None:
    """Control: the windows are real bytes of the serialized model, and the scanner finds them."""
    windows = weight_windows(model)
    (tmp_path / "plain.onnx").write_bytes(model.SerializeToString())
    hits = find_in_files(files_under(tmp_path), windows)
    assert len(hits) == len(windows)


def test_weights_and_key_never_written_in_plaintext(tmp_path: Path, private_tmp: Path, provider_key: ProviderKey,
                                                    model: onnx.ModelProto, mlcapsule_home: Path) -> None:
    t0 = time.time() - 1
    windows = weight_windows(model)
    out = tmp_path / "out"
    out.mkdir()
    packed = pack_model(model, out / "secret.capsule", provider_key)
    secrets = secrets_of(packed)
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    roots = [tmp_path, mlcapsule_home, private_tmp]
    shm = [Path("/dev/shm")] if Path("/dev/shm").is_dir() else []

    def scan(stage: str) -> None:
        files = files_under(*roots) + files_under(*shm, since=t0)
        assert packed.path in files
        weight_hits = find_in_files(files, windows)
        key_hits = find_in_files([f for f in files if f != packed.key_path], secrets)
        assert not weight_hits, f"{stage}: plaintext weights in {weight_hits}"
        assert not key_hits, f"{stage}: content key in {key_hits}"

    scan("after pack")
    with packed.open(tmp_path) as cap:
        assert_matches_reference(cap.predict(x), plain_ort(model, {"input": x})[0])
        run_dir = Path(cap._enclave._run.name)
        assert run_dir.is_dir()
        scan("while the enclave runs")  # the worker's run dir, log and placeholder exist now
    scan("after close")
    assert not run_dir.exists()


def test_encrypted_architecture_hides_the_graph(tmp_path: Path, provider_key: ProviderKey,
                                                model: onnx.ModelProto) -> None:
    packed = pack_model(model, tmp_path / "secret.capsule", provider_key)
    data = packed.path.read_bytes()
    leaked = [s for s in SECRET_NAMES + SECRET_OPS if s.encode() in data]
    assert not leaked, f"the capsule reveals {leaked}"
    # the public manifest names the model's inputs and outputs only
    assert b'"input"' in data and b'"probabilities"' in data


def test_public_architecture_shows_the_graph_but_not_the_weights(tmp_path: Path, provider_key: ProviderKey,
                                                                 model: onnx.ModelProto) -> None:
    """Control for the test above (the names would be found if they were there), and the weights
    stay encrypted even when the architecture is public."""
    packed = pack_model(model, tmp_path / "public.capsule", provider_key, public_architecture=True)
    data = packed.path.read_bytes()
    assert all(s.encode() in data for s in SECRET_NAMES + SECRET_OPS)
    assert not [w for w in weight_windows(model) if w in data]


# -- memory -----------------------------------------------------------------------------------------
HOST_SCRIPT = r"""
import json, sys
import numpy as np
import mlcapsule
from mlcapsule.enclave.format.trust import UnsafeTrustManifestKey
cfg = json.loads(sys.argv[1])
cap = mlcapsule.open_capsule(cfg["capsule"], trust=UnsafeTrustManifestKey(), unsafe_dev_key=cfg["key"], state_dir=cfg["state"],
                             platform_dir=cfg["platform"])
y = cap.predict(np.load(cfg["x"]))
np.save(cfg["y"], y)
print(json.dumps({"worker": cap._enclave.proc.pid, "modules": sorted(sys.modules)}), flush=True)
sys.stdin.readline()
cap.close()
"""


def scan_memory(pid: int, needles: list[bytes], *, max_region: int = 1 << 30) -> set[int]:
    """Indices of ``needles`` found in the readable memory of process ``pid``."""
    found: set[int] = set()
    chunk = 16 << 20
    overlap = max(len(n) for n in needles) - 1
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split()
            addr, perms = fields[0], fields[1]
            name = fields[5] if len(fields) >= 6 else ""
            if perms[0] != "r" or name in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
                continue
            lo, hi = (int(a, 16) for a in addr.split("-"))
            if hi - lo > max_region:
                continue
            pos = lo
            while pos < hi:
                n = min(chunk, hi - pos)
                try:
                    buf = os.pread(fd, n, pos)
                except OSError:
                    break
                for i, nd in enumerate(needles):
                    if i not in found and nd in buf:
                        found.add(i)
                if pos + n >= hi:
                    break
                pos += n - overlap
    finally:
        os.close(fd)
    return found


def test_host_process_memory_never_holds_weights_or_key(tmp_path: Path, provider_key: ProviderKey,
                                                        model: onnx.ModelProto) -> None:
    """The client application (the host) only ever sees outputs: scan its whole memory."""
    packed = pack_model(model, tmp_path / "secret.capsule", provider_key)
    windows = weight_windows(model)
    key = ContentKey.load(packed.key_path).key
    x = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cfg = {"capsule": str(packed.path), "key": str(packed.key_path), "x": str(tmp_path / "x.npy"),
           "y": str(tmp_path / "y.npy"), **{k: str(v) for k, v in
                                            (("state", tmp_path / "state"), ("platform", tmp_path / "platform"))}}
    host = subprocess.Popen([sys.executable, "-c", HOST_SCRIPT, json.dumps(cfg)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = host.stdout.readline()  # type: ignore[union-attr]
        assert line, host.stderr.read()  # type: ignore[union-attr]
        info = json.loads(line)
        assert "onnx" not in info["modules"] and "onnxruntime" not in info["modules"], "the host imported ONNX"
        host_found = scan_memory(host.pid, windows + [key])
        assert not host_found, f"host memory holds secrets {sorted(host_found)} (weights 0..{len(windows) - 1}, key {len(windows)})"
        # control: the same scanner finds the weights in the enclave worker, where they are in use
        # (needs CAP_SYS_PTRACE: the worker is non-dumpable, so an ordinary user cannot read it)
        try:
            worker_found = scan_memory(info["worker"], windows)
        except PermissionError:
            worker_found = None
        if worker_found is not None:
            assert worker_found, "scanner control failed: weights not found in the worker either"
    finally:
        if host.poll() is None:
            host.stdin.write("\n")  # type: ignore[union-attr]
            host.stdin.flush()  # type: ignore[union-attr]
        host.wait(timeout=30)
    assert host.returncode == 0
    assert_matches_reference(np.load(tmp_path / "y.npy"), plain_ort(model, {"input": x})[0])


# -- the host API -------------------------------------------------------------------------------------
def _walk_values(obj: Any, depth: int = 0, seen: set[int] | None = None) -> Iterable[Any]:
    """Every value reachable from ``obj`` through attributes and containers (mlcapsule objects only)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    yield obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_values(k, depth + 1, seen)
            yield from _walk_values(v, depth + 1, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _walk_values(v, depth + 1, seen)
    elif type(obj).__module__.startswith("mlcapsule") and hasattr(obj, "__dict__"):
        yield from _walk_values(vars(obj), depth + 1, seen)


def _as_bytes(v: Any) -> bytes | None:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if isinstance(v, memoryview):
        return v.tobytes()
    if isinstance(v, np.ndarray):
        return v.tobytes()
    if isinstance(v, str):
        return v.encode("utf-8", "replace")
    return None


def test_host_api_offers_no_way_to_the_weights(tmp_path: Path, provider_key: ProviderKey,
                                               model: onnx.ModelProto) -> None:
    packed = pack_model(model, tmp_path / "secret.capsule", provider_key)
    windows = weight_windows(model)
    secrets = secrets_of(packed)
    x = np.ones((2, 32), np.float32)
    with packed.open(tmp_path) as cap:
        cap.predict(x)
        cap.status()
        for obj in (cap, cap._enclave):
            names = {n for n in dir(obj) if not n.startswith("_")}
            assert not {n for n in names if SUSPICIOUS.search(n)}, f"{type(obj).__name__} exposes {names}"
        leaks = []
        for v in _walk_values(cap):
            b = _as_bytes(v)
            if b is not None and any(w in b for w in windows + secrets):
                leaks.append(type(v).__name__)
        assert not leaks, f"host-side objects hold secrets: {leaks}"
    for cls in (mlcapsule.Capsule, EnclaveProcess):
        public = {n for n in dir(cls) if not n.startswith("_")}
        assert not {n for n in public if SUSPICIOUS.search(n)}
    from mlcapsule.enclave.ecalls import OPS

    assert not [op for op in OPS if SUSPICIOUS.search(op) or op in ("export", "eval", "exec", "read")]


@pytest.mark.parametrize("op", ["dump_weights", "get_weights", "export", "read_file", "eval", "__class__",
                                "load\x00", "LOAD", "", "hello "])
def test_enclave_rejects_unknown_ops(tmp_path: Path, mlp_capsule: Packed, op: str) -> None:
    d = mlp_capsule.dirs(tmp_path)
    with EnclaveProcess(mlp_capsule.path, dev_key=mlp_capsule.key_path, **d) as enc:
        enc.call("load", {"dev_key": str(mlp_capsule.key_path.resolve())})
        with pytest.raises(ProtocolError):
            enc.call(op)
        with pytest.raises(ProtocolError):
            enc.call(op, {"path": str(mlp_capsule.key_path), "segment": "weights"})
        # the worker is still alive and serving, and the refusal cost nothing
        st = enc.call("status")
        assert st["loaded"] is True
        assert enc.proc.poll() is None


def test_enclave_replies_never_contain_weights_or_key(tmp_path: Path, provider_key: ProviderKey,
                                                      model: onnx.ModelProto) -> None:
    packed = pack_model(model, tmp_path / "secret.capsule", provider_key)
    needles = weight_windows(model) + secrets_of(packed)
    d = packed.dirs(tmp_path)
    replies = []
    with EnclaveProcess(packed.path, dev_key=packed.key_path, **d) as enc:
        replies.append(enc.info)
        replies.append(enc.call("load", {"dev_key": str(packed.key_path.resolve())}))
        replies.append(enc.call("status"))
        out = enc.infer([np.ones((2, 32), np.float32)])
        replies.append([v.tolist() for v in out])
        raw = [v.tobytes() for v in out]
    text = json.dumps(replies).encode()
    assert not [i for i, n in enumerate(needles) if n in text or any(n in r for r in raw)]
