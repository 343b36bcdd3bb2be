"""Private keyword spotting (issue 16): the front end in the graph, streaming detection, charging
per window and per detection, and the sandbox of the worker that hears the audio.

The speech is synthesised with espeak-ng (scripts/test.sh installs it). A tiny spotter (two
keywords, a few hundred clips, a small DS-CNN) is trained once per module in under a minute on
one CPU thread; its data set is cached in the module's temporary folder. Speed and accuracy
goals are measured in benchmarks/kws.py, never here.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import mlcapsule
from mlcapsule.enclave.detect import ChargePolicy, Detector
from mlcapsule.enclave.errors import BudgetExhaustedError, FormatError, InputError
from mlcapsule.enclave.format.manifest import Policy
from mlcapsule.enclave.format.trust import TrustProviderKey
from mlcapsule.host import EnclaveProcess

from provider_sim import Provider, b64

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the software enclave backend is Linux-only"),
]
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng; scripts/test.sh does)")
SRC = Path(__file__).resolve().parent.parent / "src"


# -- a controlled classifier for the charging rules ------------------------------------------------
def onehot_model(n_in: int = 8, n_out: int = 3) -> onnx.ModelProto:
    """probabilities = softmax(20 * x[:, :n_out]): input e_k gives class k with p > 0.99."""
    w = np.zeros((n_in, n_out), np.float32)
    w[np.arange(n_out), np.arange(n_out)] = 20.0
    g = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "onehot", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def e(k: int) -> np.ndarray:
    x = np.zeros((1, 8), np.float32)
    x[0, k] = 1.0
    return x


def set_up_license(provider: Provider, cap: Path, ckey: Any, base: Path, *, budget: int | None,
                   lease_size: int = 1) -> dict[str, Path]:
    """The device set up offline against the simulated provider; returns the folders to open it with."""
    dirs = {"state_dir": base / "state", "platform_dir": base / "platform"}
    with EnclaveProcess(cap, **dirs) as enc:  # type: ignore[arg-type]
        nonce = os.urandom(32)
        begin = enc.call("setup_begin", {"nonce": b64(nonce)})
        payload, _ = provider.answer(begin, nonce, ckey, budget=budget, lease_size=lease_size)
        enc.call("setup_finish", {"payload": b64(payload)})
    return dirs


def license_status(cap: Any) -> dict[str, Any]:
    return dict(cap.status()["license_status"])


DETECT = ChargePolicy("detection", smoothing=1, threshold=0.9, refractory=2, background=(0,))


def test_charge_policy_is_validated_in_the_signed_manifest() -> None:
    p = Policy(charge=DETECT.to_dict())
    assert Policy.from_dict(p.to_dict()) == p
    assert "charge" not in Policy().to_dict()  # manifests without it are unchanged
    for bad in ({"per": "minute"}, {"per": "detection", "threshold": 0}, {"per": "detection", "smoothing": 0},
                {"per": "detection", "background": ["silence"]}, {"per": "detection", "extra": 1}):
        with pytest.raises(FormatError):
            Policy.from_dict({**Policy().to_dict(), "charge": bad})


def test_detector_smooths_thresholds_and_waits_out_its_refractory_period() -> None:
    det = Detector(ChargePolicy("query", smoothing=2, threshold=0.7, refractory=2, background=(0,)), 3)
    keyword, silence = np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0])
    assert det.push(silence) is None
    assert det.push(keyword) is None  # smoothed over two windows: 0.5
    assert det.push(keyword) == (1, 1.0)
    assert det.push(keyword) is None and det.push(keyword) is None  # refractory: two windows
    assert det.push(keyword) == (1, 1.0)
    assert det.push(silence) is None  # silence is a background class, never detected


def test_budget_is_charged_per_window_by_default(tmp_path: Path) -> None:
    provider = Provider(tmp_path / "provider")
    cap, ckey = provider.pack("window", onehot_model(), class_names=["_silence_", "a", "b"])
    dirs = set_up_license(provider, cap, ckey, tmp_path / "dev", budget=5)
    with mlcapsule.open_capsule(cap, trust=TrustProviderKey(_raw(provider)), **dirs) as c:
        for k in (0, 1, 1, 2):
            assert np.argmax(c.predict(e(k))) == k  # posteriors: the client sees them, so each is charged
        assert license_status(c)["answered"] == 4


def _raw(provider: Provider) -> bytes:
    from mlcapsule.enclave.crypto.keys import raw_public

    return raw_public(provider.key.public_key())


def test_budget_is_charged_per_detection_by_the_enclave_when_the_policy_says_so(tmp_path: Path) -> None:
    provider = Provider(tmp_path / "provider")
    cap, ckey = provider.pack("detect", onehot_model(), class_names=["_silence_", "a", "b"],
                              policy=Policy(charge=DETECT.to_dict()))
    dirs = set_up_license(provider, cap, ckey, tmp_path / "dev", budget=2)
    with mlcapsule.open_capsule(cap, trust=TrustProviderKey(_raw(provider)), **dirs) as c:
        answers = [c.predict(e(k))[0] for k in (0, 0, 1, 1, 1, 0)]
        # Only the verdicts leave the enclave: zeros, or a one at the class detected (no score).
        assert [a.tolist() for a in answers] == [[0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
        assert license_status(c)["answered"] == 1  # six windows, one detection
        assert c.predict(e(2))[0].tolist() == [0, 0, 1]  # the refractory period is over
        assert license_status(c)["answered"] == 2
        with pytest.raises(InputError, match="one window per call"):
            c.predict(np.concatenate([e(1), e(1)]))  # a batch would dodge the per-window rules
        # Budget spent: every window is refused before the model runs, with or without a keyword
        # in it, so a refusal does not tell the client that a detection was due.
        for k in (0, 1):
            with pytest.raises(BudgetExhaustedError):
                c.predict(e(k))


def test_per_detection_policy_needs_one_posterior_output(tmp_path: Path) -> None:
    from mlcapsule.enclave.core import _detector
    from mlcapsule.enclave.format.container import CapsuleFile
    from mlcapsule.enclave.format.manifest import TensorSpec
    from mlcapsule.enclave.format.trust import UnsafeTrustManifestKey

    provider = Provider(tmp_path / "provider")
    path, _ = provider.pack("detect", onehot_model(), policy=Policy(charge=DETECT.to_dict()))
    with CapsuleFile(path, trust=UnsafeTrustManifestKey()) as cf:
        m = cf.manifest
    assert _detector(m) is not None
    with pytest.raises(FormatError):
        _detector(replace(m, outputs=(TensorSpec("p", "float32", ("N", "C")),)))


# -- the tiny spotter, trained here ----------------------------------------------------------------
@dataclass
class Spotter:
    model: onnx.ModelProto
    classes: tuple[str, ...]
    window: Any  # pack result, charged per window
    detect: Any  # pack result, charged per detection
    key: Path
    recipe: Any
    accuracy: float

    def open(self, res: Any, base: Path, **kw: Any) -> Any:
        return mlcapsule.open_capsule(res.capsule_path, trust=TrustProviderKey(res.manifest.provider_key),
                                      unsafe_dev_key=res.key_path, state_dir=base / "state", **kw)


@pytest.fixture(scope="module")
def spotter(tmp_path_factory: pytest.TempPathFactory) -> Spotter:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng; scripts/test.sh does)")
    pytest.importorskip("torch")
    from mlcapsule.enclave.crypto.keys import generate_provider_key
    from mlcapsule.kws import data, pipeline

    base = tmp_path_factory.mktemp("kws")
    recipe = data.Recipe.tiny()
    ds = data.load(recipe, cache=base / "cache")
    m = pipeline.train_model(recipe, dataset=ds, **pipeline.TINY_TRAINING)
    generate_provider_key(base / "provider.pem")
    window = pipeline.pack_model(m.onnx, m.classes, base / "window.capsule", provider_key=base / "provider.pem",
                                 tune_runtime=False)
    detect = pipeline.pack_model(m.onnx, m.classes, base / "detect.capsule", provider_key=base / "provider.pem",
                                 tune_runtime=False, per_detection=ChargePolicy(threshold=0.6, smoothing=3,
                                                                                refractory=4))
    return Spotter(m.onnx, m.classes, window, detect, base / "provider.pem", recipe, m.test_accuracy)


def stream_with(words: list[str], seed: int) -> tuple[np.ndarray, list[Any]]:
    from mlcapsule.kws import data

    return data.sentence(words, seed=seed, voices=data.Recipe.tiny().test_voices,
                         variants=data.Recipe.tiny().test_variants, snr_db=30.0)


@needs_espeak
def test_onnx_front_end_matches_the_training_front_end() -> None:
    pytest.importorskip("torch")
    from mlcapsule.kws import data, frontend
    from mlcapsule.kws.train import torch_features

    audio, _ = data.sentence(["yes", "left"], seed=0, snr_db=20.0, lead=0.2)
    rng = np.random.default_rng(0)
    windows = np.stack([audio[:16000], np.pad(audio, (0, 16000))[16000:32000],
                        (0.05 * rng.standard_normal(16000)).astype(np.float32), np.zeros(16000, np.float32)])
    got = frontend.onnx_features(windows)
    assert got.shape == (4, 1, frontend.N_FRAMES, frontend.N_MELS)
    np.testing.assert_allclose(got, torch_features(windows), atol=2e-3, rtol=1e-4)
    np.testing.assert_allclose(got, frontend.numpy_features(windows), atol=2e-3, rtol=1e-4)
    # The graph computes them with opset 17's own STFT and MelWeightMatrix, not constants.
    ops = {n.op_type for n in frontend.frontend_graph().graph.node}
    assert {"STFT", "MelWeightMatrix"} <= ops


def test_tiny_spotter_trains_packs_and_detects_a_keyword_in_a_stream(spotter: Spotter, tmp_path: Path) -> None:
    from mlcapsule.kws import stream

    audio, spoken = stream_with(["table", "yes", "morning"], seed=5)
    said = next(s for s in spoken if s.word == "yes")
    with spotter.open(spotter.window, tmp_path) as cap:
        dets = list(cap.stream(stream.chunks(audio, 800), hop=0.25, threshold=0.7, refractory=1.0))
    assert [d.label for d in dets] == ["yes"], (dets, spotter.accuracy)
    assert said.start <= dets[0].time <= said.end + 1.5
    assert dets[0].score is not None and dets[0].score >= 0.7
    # The capsule takes raw PCM: the front end is inside the encrypted graph.
    ops = {n.op_type for n in spotter.model.graph.node}
    assert {"STFT", "MelWeightMatrix"} <= ops and spotter.window.manifest.inputs[0].shape[1] == 16000


def test_per_detection_capsule_detects_in_the_enclave(spotter: Spotter, tmp_path: Path) -> None:
    from mlcapsule.kws import stream

    audio, _ = stream_with(["table", "yes", "morning"], seed=5)
    counts: dict[str, int] = {}
    with spotter.open(spotter.detect, tmp_path) as cap:
        dets = list(cap.stream(stream.chunks(audio), counter=counts))
    assert [d.label for d in dets] == ["yes"] and dets[0].score is None  # no score leaves the enclave
    assert counts["windows"] > 10 and counts["detections"] == 1


def test_spotter_runs_in_streaming_mode_within_16_mb(spotter: Spotter, tmp_path: Path) -> None:
    """The streaming planner (enclave/runtime/planner.py) takes STFT and MelWeightMatrix as they are."""
    import onnxruntime as ort

    audio, _ = stream_with(["yes", "table"], seed=3)
    x = np.stack([audio[:16000], audio[8000:24000]])
    ref = ort.InferenceSession(spotter.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"audio": x})[0]
    with spotter.open(spotter.window, tmp_path, memory_limit_mb=16) as cap:
        got = cap.predict(x)
        mem = cap.status()["memory"]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert mem["now"]["VmHWM"] - mem["baseline"]["VmRSS"] <= mem["limit"] == 16 << 20


def _licensed(spotter: Spotter, res: Any, base: Path, budget: int) -> dict[str, Path]:
    """The spotter's capsule set up against a simulated provider holding its key."""
    from mlcapsule.enclave.crypto.keys import ContentKey, load_provider_key

    provider = Provider(base / "provider")
    provider.key_path, provider.key = spotter.key, load_provider_key(spotter.key)
    return set_up_license(provider, res.capsule_path, ContentKey.load(res.key_path), base, budget=budget)


def test_stream_charges_per_window_or_per_detection(spotter: Spotter, tmp_path: Path) -> None:
    from mlcapsule.kws import stream

    audio, _ = stream_with(["yes", "table", "stop"], seed=7)
    charged = {}
    for name, res in (("window", spotter.window), ("detect", spotter.detect)):
        dirs = _licensed(spotter, res, tmp_path / name, budget=1000)
        counts: dict[str, int] = {}
        with mlcapsule.open_capsule(res.capsule_path, trust=TrustProviderKey(res.manifest.provider_key),
                                    **dirs) as cap:
            list(cap.stream(stream.chunks(audio), threshold=0.7, refractory=1.0, counter=counts))
            charged[name] = (license_status(cap)["answered"], counts["windows"], counts["detections"])
    assert charged["window"][0] == charged["window"][1] > 10
    assert charged["detect"][0] == charged["detect"][2] >= 1
    assert charged["detect"][0] < charged["detect"][1]


def test_listen_on_a_wav_without_keywords_reports_no_detection(spotter: Spotter, tmp_path: Path, cli: Any) -> None:
    from mlcapsule.kws import stream

    audio, _ = stream_with(["table", "morning", "water", "hello"], seed=11)
    wav = tmp_path / "no-keyword.wav"
    stream.write_wav(wav, audio)
    r = cli("listen", spotter.window.capsule_path, "--wav", wav, "--unsafe-dev-key", spotter.window.key_path,
            "--trust", str(spotter.key) + ".pub", "--state-dir", tmp_path / "state", "--json",
            "--threshold", "0.7", "--refractory", "1.0")
    assert r.code == 0, r.err
    lines = [json.loads(ln) for ln in r.out.splitlines() if ln.strip()]
    assert lines[-1]["summary"]["detections"] == 0 and lines[-1]["summary"]["windows"] > 10
    assert lines[:-1] == []
    # And the same command hears a keyword when there is one.
    audio, _ = stream_with(["table", "yes", "morning"], seed=5)
    stream.write_wav(wav, audio)
    r = cli("listen", spotter.window.capsule_path, "--wav", wav, "--unsafe-dev-key", spotter.window.key_path,
            "--trust", str(spotter.key) + ".pub", "--state-dir", tmp_path / "state", "--threshold", "0.7")
    assert r.code == 0, r.err
    assert "yes" in r.out


def test_listen_without_sounddevice_says_what_to_install(spotter: Spotter, tmp_path: Path, cli: Any) -> None:
    try:
        import sounddevice  # noqa: F401
        pytest.skip("sounddevice is installed here")
    except (ImportError, OSError):
        pass
    r = cli("listen", spotter.window.capsule_path, "--mic", "--unsafe-dev-key", spotter.window.key_path,
            "--trust", str(spotter.key) + ".pub", "--state-dir", tmp_path / "state")
    assert r.code != 0 and "pip install sounddevice" in r.err


# -- the sandbox of the worker that hears the audio ------------------------------------------------
def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in lines)}


PROBE = r"""
import json, os, socket, sys
from pathlib import Path
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
from mlcapsule.enclave import hardening
cfg = json.loads(sys.argv[1])
report = hardening.harden(read_paths=[*hardening.python_read_paths(), cfg["model"]],
                          write_paths=[cfg["state_dir"], cfg["run_dir"]])
def attempt(fn):
    try:
        return {"ok": True, "value": fn()}
    except OSError as e:
        return {"ok": False, "exc": type(e).__name__}
import numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1
sess = ort.InferenceSession(Path(cfg["model"]).read_bytes(), so, providers=["CPUExecutionProvider"])
audio = np.load(cfg["audio"])  # inside the state folder, which the sandbox lets it read
out = {"report": report.as_dict(), "posteriors": sess.run(None, {"audio": audio})[0].tolist()}
out["connect"] = attempt(lambda: socket.create_connection(("127.0.0.1", cfg["port"]), timeout=2).close())
udp = lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"audio", ("127.0.0.1", cfg["port"]))
out["udp"] = attempt(udp)
out["unix"] = attempt(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
out["write_outside"] = attempt(lambda: Path(cfg["outside"], "leak.raw").write_bytes(audio.tobytes()))
out["write_tmp"] = attempt(lambda: Path("/tmp", "leak-%d.raw" % os.getpid()).write_bytes(b"x"))
out["write_state"] = attempt(lambda: Path(cfg["state_dir"], "ok").write_bytes(b"x"))
print(json.dumps(out))
"""


@pytest.mark.skipif("Seccomp:" not in Path("/proc/self/status").read_text()
                    or platform.machine() not in ("x86_64", "aarch64"), reason="kernel lacks seccomp")
def test_listen_worker_cannot_open_a_socket_or_write_outside_its_state_dir(spotter: Spotter, tmp_path: Path) -> None:
    """Exfiltration of the audio through the enclave worker: stopped by its sandbox.

    1. The worker that runs ``listen`` is sandboxed while the stream runs (seccomp filter mode,
       no new privileges, its own report: seccomp and Landlock applied).
    2. The same hardening the worker applies (tests/test_hardening.py's approach: a subprocess
       hardens itself like a worker), then the spotter runs on audio and tries to send it out
       over TCP, UDP and a Unix socket, and to write it outside the state folder: all refused."""
    from mlcapsule.kws import stream

    audio, _ = stream_with(["yes", "table"], seed=3)
    seen: dict[str, Any] = {}
    with spotter.open(spotter.window, tmp_path) as cap:
        pid = cap._enclave.proc.pid

        def frames() -> Any:
            for i, chunk in enumerate(stream.chunks(audio)):
                if i == 15:  # mid-stream, windows already answered
                    seen["status"] = _status(pid)
                yield chunk

        list(cap.stream(frames(), threshold=0.7))
        report = cap.status()["hardening"]
    assert seen["status"]["Seccomp"] == "2" and seen["status"]["NoNewPrivs"] == "1"
    assert not str(report["seccomp"]).startswith(("unavailable", "partial", "off")), report
    assert report["nondumpable"] is True, report

    model = tmp_path / "kws.onnx"
    onnx.save(spotter.model, model)
    np.save(tmp_path / "audio.npy", audio[None, :16000])
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "state").mkdir(exist_ok=True)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.5)
        cfg = {"model": str(model), "audio": str(tmp_path / "audio.npy"), "state_dir": str(tmp_path / "state"),
               "run_dir": str(tmp_path / "run"), "outside": str(outside), "port": listener.getsockname()[1]}
        (tmp_path / "run").mkdir()
        # The audio file is read after hardening only because it lies in the state folder's reach:
        # put it there, as the worker's input arrives through its pipe.
        os.replace(tmp_path / "audio.npy", tmp_path / "state" / "audio.npy")
        cfg["audio"] = str(tmp_path / "state" / "audio.npy")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cfg)], capture_output=True, text=True,
                              timeout=180, env=env)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        try:
            conn, _ = listener.accept()
            conn.close()
            got_connection = True
        except TimeoutError:
            got_connection = False
    assert len(out["posteriors"][0]) == len(spotter.classes)  # the spotter itself runs in the sandbox
    for name in ("connect", "udp", "unix", "write_outside", "write_tmp"):
        assert out[name]["ok"] is False, (name, out[name])
    assert out["write_state"]["ok"] is True
    assert not got_connection and not (outside / "leak.raw").exists()


@needs_espeak
def test_bench_kws_quick_writes_json_and_markdown(tmp_path: Path) -> None:
    """`mlcapsule bench --suite kws --quick` (the tiny spotter): every figure BENCHMARKS.md shows."""
    pytest.importorskip("torch")
    from mlcapsule.bench import run

    md = tmp_path / "BENCHMARKS.md"
    run(["kws"], quick=True, results_dir=tmp_path / "results", markdown=md, workdir=tmp_path / "work",
        log=lambda _m: None)
    res = json.loads((tmp_path / "results" / "kws.json").read_text())
    assert len(res["per_window"]) == 2 and all(r["capsule_ms"]["n"] > 0 and r["ratio"] for r in res["per_window"])
    assert res["accuracy"]["capsule"] == res["accuracy"]["plain_ort"] and res["streaming"]["memory"]["peak_growth_mb"]
    assert set(res["detections"]) == {"per_window", "per_detection"}
    assert res["detections"]["per_detection"]["detections"] == res["detections"]["per_window"]["detections"]
    text = md.read_text()
    assert "## Keyword spotting" in text and "not quoted" in text
