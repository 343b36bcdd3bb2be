"""The defenses inside the enclave, end to end (issue 12): a signed policy in the capsule,
tightened by the license, enforced by the worker, its state sealed under the budget's counter,
its alarms in the signed receipts. Each test is named after the attack it stops."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import mlcapsule
from mlcapsule.demo.models import digits_classifier
from mlcapsule.enclave.crypto.keys import ContentKey
from mlcapsule.enclave.errors import (
    DefenseError,
    DefenseGrantError,
    DefenseLockedError,
    FormatError,
    NotProvisionedError,
    RollbackError,
    UnsupportedVersionError,
)
from mlcapsule.enclave.state import STATE_FILE
from mlcapsule.host import EnclaveProcess
from swtpm import swtpm, tpm_ca, tpm_factory, tpm_policy  # noqa: F401  (fixtures)
from provider_sim import Provider, b64


@pytest.fixture(scope="module")
def digits() -> tuple[Any, dict[str, Any]]:
    return digits_classifier()


@pytest.fixture()
def provider(tmp_path: Path) -> Provider:
    return Provider(tmp_path / "provider")


def _pack(provider: Provider, digits: tuple[Any, dict[str, Any]], defenses: list[str], name: str = "digits",
          **kw: Any) -> tuple[Path, ContentKey]:
    model, info = digits
    if any(d.startswith("ood") for d in defenses):
        kw.setdefault("defense_data", info["x_train"])
    return provider.pack(name, model=model, defenses=defenses, **kw)


def _plain(digits: tuple[Any, dict[str, Any]], x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(digits[0].SerializeToString())
    return s.run(None, {s.get_inputs()[0].name: x})[0]


class Licensed:
    """One device's enclave with a license from the in-memory provider."""

    def __init__(self, tmp_path: Path, provider: Provider, cap: Path, ckey: ContentKey) -> None:
        self.provider, self.cap, self.ckey = provider, cap, ckey
        self.state, self.platform = tmp_path / "state", tmp_path / "platform"
        self.lic: dict[str, Any] = {}

    def open(self) -> EnclaveProcess:
        return EnclaveProcess(self.cap, state_dir=self.state, platform_dir=self.platform)

    def setup(self, e: EnclaveProcess, **kw: Any) -> dict[str, Any]:
        nonce = os.urandom(32)
        begin = e.call("setup_begin", {"nonce": b64(nonce)})
        kw.setdefault("budget", 100_000)
        kw.setdefault("lease_size", 50)
        payload, self.lic = self.provider.answer(begin, nonce, self.ckey, **kw)
        return e.call("setup_finish", {"payload": b64(payload)})


def _receipt_kinds(e: EnclaveProcess) -> list[str]:
    return [r["body"]["kind"] for r in e.call("usage_report")["receipts"]]


# -- the policy in the capsule -----------------------------------------------------------------------
def test_unknown_defense_or_bad_parameters_are_refused_at_pack_time(provider, digits):
    from mlcapsule.enclave.errors import DefenseSpecError, UsageError

    with pytest.raises(DefenseSpecError, match="unknown defense"):
        _pack(provider, digits, ["stealth-mode"])
    with pytest.raises(DefenseSpecError):
        _pack(provider, digits, ["mi-noise:c=7"])
    with pytest.raises(UsageError, match="training inputs"):
        _pack(provider, digits, ["ood"], defense_data=None)


def test_a_reader_of_format_1_1_refuses_a_capsule_with_defenses(provider, digits, monkeypatch):
    """A 1.1 reader would answer without the defenses: the capsule says 1.2, and a manifest with a
    policy under an older header is refused too."""
    import mlcapsule.enclave.format.trust as T
    from mlcapsule.enclave.format.container import CapsuleFile

    cap, _ = _pack(provider, digits, ["round:2"])
    with CapsuleFile(cap, trust=mlcapsule.UnsafeTrustManifestKey()) as cf:
        assert cf.format_version == (1, 2)
        assert cf.manifest.policy.defenses["defenses"] == {"round": {"decimals": 2}}
    monkeypatch.setattr(T, "MINOR", 1)
    with pytest.raises(UnsupportedVersionError):
        CapsuleFile(cap, trust=mlcapsule.UnsafeTrustManifestKey())


def test_unknown_defense_in_a_signed_manifest_is_refused_at_load(provider, digits, tmp_path):
    """A policy this build does not know is never skipped: the capsule does not load."""
    from mlcapsule.enclave.format.manifest import Policy

    with pytest.raises(FormatError, match="defense policy"):
        Policy.from_dict({"budget": None, "expires": None, "lease_size": 10,
                          "defenses": {"version": 1, "defenses": {"telepathy": {}}}})


# -- the pipeline in the enclave ---------------------------------------------------------------------
def test_host_never_sees_an_undefended_posterior(tmp_path, provider, digits):
    """Label-only: the reply frames (inline and through shared memory) hold one-hot rows, and the
    model's raw posteriors appear nowhere in the arena the host can read."""
    cap, ckey = _pack(provider, digits, ["label-only"])
    x = np.ascontiguousarray(np.tile(digits[1]["x_test"], (3, 1)), dtype=np.float32)  # 54 KB of answers: shared memory
    raw = _plain(digits, x)
    key = Path(str(cap) + ".key")
    with EnclaveProcess(cap, state_dir=tmp_path / "s", dev_key=key) as e:
        e.call("load", {"dev_key": str(key)})
        small = e.infer([x[:3]])[0]
        big = e.infer([x])[0]
        assert e._arena is not None
        arena = mmap.mmap(e._arena.fd, 0, prot=mmap.PROT_READ)
        try:
            shared = bytes(arena)
        finally:
            arena.close()
    for out, ref in ((small, raw[:3]), (big, raw)):
        assert set(np.unique(out)) <= {0.0, 1.0} and (out.sum(axis=1) == 1).all()
        assert (out.argmax(axis=1) == ref.argmax(axis=1)).all()
    assert raw[:5].tobytes() not in shared and raw[500].tobytes() not in shared
    assert big.tobytes()[:400] in shared  # the defended answer did travel through it


def test_membership_noise_is_applied_inside_the_enclave(tmp_path, provider, digits):
    """Algorithm 1 with c = 0.5: the answer is the noised posterior, not the model's."""
    from mlcapsule.enclave.defenses.outputs import mi_noise

    cap, _ = _pack(provider, digits, ["mi-noise:c=0.5"])
    x = np.ascontiguousarray(digits[1]["x_test"][:20], dtype=np.float32)
    with mlcapsule.open_capsule(cap, trust=mlcapsule.UnsafeTrustManifestKey(),
                                unsafe_dev_key=str(cap) + ".key", state_dir=tmp_path / "s") as c:
        got = c.predict(x)
        words = c.status()["defenses"]["policy"]
    raw = _plain(digits, x)
    np.testing.assert_allclose(got, mi_noise(raw, 0.5), rtol=1e-5, atol=1e-6)
    assert np.abs(got - raw).max() > 0.01
    assert any("noised" in w for w in words)


def test_jbda_stream_is_flagged_by_prada(tmp_path, provider, digits):
    """Papernot et al.'s Jacobian-based augmentation, run by the attack library against the
    capsule, is flagged by PRADA (delta 0.9) within 300 queries; with action refuse, the stream
    is then refused."""
    from mlcapsule.attacks import CapsuleOracle, jbda

    cap, _ = _pack(provider, digits, ["prada:delta=0.9,action=refuse"])
    info = digits[1]
    seeds = np.concatenate([info["x_test"][info["y_test"] == k][:3] for k in range(10)]).astype(np.float32)
    with mlcapsule.open_capsule(cap, trust=mlcapsule.UnsafeTrustManifestKey(),
                                unsafe_dev_key=str(cap) + ".key", state_dir=tmp_path / "s") as c:
        oracle = CapsuleOracle(c, max_batch=1)
        with pytest.raises(DefenseError, match="prada"):
            jbda(oracle, seeds, n_classes=10, rounds=4, lam=2.0, low=0.0, high=16.0, epochs=5)
        st = c.status()["defenses"]["state"]
    assert st["alarms"]["prada"] == 1
    flagged_at = st["queries"] - st["flagged_queries"]["prada"]
    assert flagged_at <= 300, st


def test_benign_streams_raise_no_alarm(tmp_path, provider, digits):
    """Ten benign streams of held-out digits, 120 queries each, one at a time: no alarm from PRADA
    (default delta) or from the out-of-distribution detector."""
    cap, _ = _pack(provider, digits, ["prada", "ood"])
    info = digits[1]
    x_test = info["x_test"].astype(np.float32)
    rng = np.random.default_rng(0)
    for _stream in range(10):  # a dev-key session keeps no defense state: one session per stream
        with mlcapsule.open_capsule(cap, trust=mlcapsule.UnsafeTrustManifestKey(),
                                    unsafe_dev_key=str(cap) + ".key", state_dir=tmp_path / "s") as c:
            for i in rng.permutation(len(x_test))[:120]:
                c.predict(x_test[i:i + 1])
            st = c.status()["defenses"]["state"]
        assert st["queries"] == 120 and st["alarms"] == {"kennen": 0, "prada": 0, "ood": 0}, st


def test_uniform_random_stream_is_flagged_by_the_ood_detector(tmp_path, provider, digits):
    """Uniform random queries look benign to PRADA; the second detector flags them."""
    cap, _ = _pack(provider, digits, ["prada", "ood:action=refuse"])
    rng = np.random.default_rng(1)
    with mlcapsule.open_capsule(cap, trust=mlcapsule.UnsafeTrustManifestKey(),
                                unsafe_dev_key=str(cap) + ".key", state_dir=tmp_path / "s") as c:
        with pytest.raises(DefenseError, match="ood"):
            for _ in range(100):
                c.predict(rng.uniform(0, 16, (1, 64)).astype(np.float32))
        st = c.status()["defenses"]["state"]
    assert st["alarms"]["ood"] == 1 and st["alarms"]["prada"] == 0


# -- licensed: sealed state, alarms in receipts, grants, lock and unlock ------------------------------
def _uniform(n: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, (n, 64)).astype(np.float32)


def test_licensed_status_is_no_oracle_for_the_detectors_verdicts(tmp_path, provider, digits):
    """An adaptive attacker who polls `status` after each query would learn which queries the
    detectors flag: a licensed client's status shows what it observes anyway, not the verdicts."""
    cap, ckey = _pack(provider, digits, ["ood"])
    d = Licensed(tmp_path, provider, cap, ckey)
    with d.open() as e:
        d.setup(e)
        for row in _uniform(30):
            e.infer([row[None]])
        st = e.call("status")["defenses"]["state"]
    assert st == {"queries": 30, "refused": 0, "locked": False, "degraded": False, "unlock_seq": 0}


def test_alarm_reaches_the_provider_in_the_signed_receipts(tmp_path, provider, digits):
    cap, ckey = _pack(provider, digits, ["ood"])
    d = Licensed(tmp_path, provider, cap, ckey)
    with d.open() as e:
        d.setup(e)
        for row in _uniform(30):
            e.infer([row[None]])
        kinds = _receipt_kinds(e)
        receipts = e.call("usage_report")["receipts"]
    assert "alarm" in kinds
    alarm = next(r["body"] for r in receipts if r["body"]["kind"] == "alarm")
    assert alarm["data"]["alarms"][0]["detector"] == "ood" and alarm["data"]["alarms"][0]["action"] == "record"


def test_policy_tightened_by_the_license_is_applied(tmp_path, provider, digits):
    cap, ckey = _pack(provider, digits, ["mi-noise:c=0.2"])
    d = Licensed(tmp_path, provider, cap, ckey)
    with d.open() as e:
        d.setup(e, defenses=["label-only"])
        out = e.infer([np.ascontiguousarray(digits[1]["x_test"][:5], dtype=np.float32)])[0]
        words = e.call("status")["defenses"]["policy"]
    assert set(np.unique(out)) <= {0.0, 1.0}
    assert any("label" in w for w in words)


def test_policy_loosened_by_the_license_is_refused(tmp_path, provider, digits):
    cap, ckey = _pack(provider, digits, ["mi-noise:c=0.5"])
    d = Licensed(tmp_path, provider, cap, ckey)
    with d.open() as e:
        with pytest.raises(DefenseGrantError):
            d.setup(e, defenses=["mi-noise:c=0.1"])
        with pytest.raises(NotProvisionedError):
            e.infer([np.ones((1, 64), np.float32)])


def _lock(tmp_path: Path, provider: Provider, digits: Any) -> Licensed:
    cap, ckey = _pack(provider, digits, ["ood:action=lock"])
    d = Licensed(tmp_path, provider, cap, ckey)
    with d.open() as e:
        d.setup(e)
        with pytest.raises(DefenseLockedError):
            for row in _uniform(100):
                e.infer([row[None]])
    return d


def test_lock_lifts_only_with_the_providers_signed_unlock_voucher(tmp_path, provider, digits):
    from mlcapsule.enclave.errors import SignatureError

    d = _lock(tmp_path, provider, digits)
    benign = np.ascontiguousarray(digits[1]["x_test"][:1], dtype=np.float32)
    with d.open() as e:
        e.call("load", {"dev_key": None})  # the lock survived the restart
        with pytest.raises(DefenseLockedError):
            e.infer([benign])
        forged = Provider(tmp_path / "mallory").unlock(d.lic, 1)
        with pytest.raises(SignatureError):
            e.call("apply_voucher", {"voucher": forged})
        e.call("apply_voucher", {"voucher": provider.unlock(d.lic, 1, reset=True)})
        assert e.infer([benign])[0].shape == (1, 10)
        assert "unlock" in _receipt_kinds(e)


def test_replayed_unlock_voucher_is_refused_even_after_restoring_the_state(tmp_path, provider, digits):
    """Unlock #1 is applied, the stream locks the license again; replaying #1 is refused, and so
    is restoring the state sealed before the second lock and replaying #1 there."""
    d = _lock(tmp_path, provider, digits)
    unlock1 = provider.unlock(d.lic, 1, reset=True)
    with d.open() as e:
        e.call("load", {"dev_key": None})
        e.call("apply_voucher", {"voucher": unlock1})
    snapshot = (d.state / STATE_FILE).read_bytes()  # unlocked
    with d.open() as e:
        e.call("load", {"dev_key": None})
        with pytest.raises(DefenseLockedError):
            for row in _uniform(100, seed=5):
                e.infer([row[None]])
        with pytest.raises(RollbackError, match="already redeemed"):
            e.call("apply_voucher", {"voucher": unlock1})
    (d.state / STATE_FILE).write_bytes(snapshot)  # the attack: back to the unlocked state
    with d.open() as e:
        e.call("load", {"dev_key": None})
        status = e.call("status")
        assert status["license_status"]["rollbacks_detected"] >= 1
        assert status["defenses"]["state"]["locked"]  # a restored state of a locking policy stays locked
        with pytest.raises(RollbackError, match="already redeemed"):
            e.call("apply_voucher", {"voucher": unlock1})
        with pytest.raises(DefenseLockedError):
            e.infer([np.ascontiguousarray(digits[1]["x_test"][:1], dtype=np.float32)])


def test_restoring_old_defense_state_is_detected_as_rollback(tmp_path, provider, digits):
    """Sealed with the license state under the same counter: an older copy of the sets is a
    detected rollback, reported to the provider with the queries the defenses lost."""
    cap, ckey = _pack(provider, digits, ["prada"])
    d = Licensed(tmp_path, provider, cap, ckey)
    x = np.ascontiguousarray(digits[1]["x_test"], dtype=np.float32)
    with d.open() as e:
        d.setup(e, lease_size=20)
        for i in range(30):
            e.infer([x[i:i + 1]])
    snapshot = (d.state / STATE_FILE).read_bytes()
    with d.open() as e:
        e.call("load", {"dev_key": None})
        for i in range(30, 130):
            e.infer([x[i:i + 1]])
    (d.state / STATE_FILE).write_bytes(snapshot)
    with d.open() as e:
        e.call("load", {"dev_key": None})
        status = e.call("status")
        receipts = e.call("usage_report")["receipts"]
    assert status["license_status"]["rollbacks_detected"] == 1
    gaps = [r["body"]["data"] for r in receipts if r["body"]["kind"] == "defense-gap"]
    assert gaps and gaps[-1]["reason"] == "rollback"  # the provider is told
    assert gaps[-1]["queries"] >= 100  # at least the 100 queries the restored sets never saw


def test_killing_the_enclave_to_drop_defense_updates_is_reported(tmp_path, provider, digits):
    """A SIGKILL before the lease's end loses the defenses' updates of that lease (they are sealed
    with the lease); the next session reports the gap to the provider in a receipt."""
    cap, ckey = _pack(provider, digits, ["prada"])
    d = Licensed(tmp_path, provider, cap, ckey)
    x = np.ascontiguousarray(digits[1]["x_test"], dtype=np.float32)
    with d.open() as e:
        d.setup(e, lease_size=20)
        for i in range(25):
            e.infer([x[i:i + 1]])
        e.proc.kill()
        e.proc.wait()
    with d.open() as e:
        e.call("load", {"dev_key": None})
        receipts = e.call("usage_report")["receipts"]
        st = e.call("status")["defenses"]["state"]
    gaps = [r["body"]["data"] for r in receipts if r["body"]["kind"] == "defense-gap"]
    assert gaps == [{"queries": 20, "reason": "crash"}]  # 5 of the 2nd lease seen, its 20 counted
    assert st["queries"] == 40


def test_a_fresh_setup_cannot_reset_the_sets(tmp_path, provider, digits):
    """Deleting the sealed state does not give an empty one: the capsule is then not set up, and
    the old setup payload cannot be replayed into a new enclave (it is bound to the ephemeral key
    of the setup it answered). A new setup is a new license, which the provider counts."""
    cap, ckey = _pack(provider, digits, ["prada"])
    d = Licensed(tmp_path, provider, cap, ckey)
    with d.open() as e:
        nonce = os.urandom(32)
        begin = e.call("setup_begin", {"nonce": b64(nonce)})
        payload, _ = provider.answer(begin, nonce, ckey, budget=1000, lease_size=10)
        e.call("setup_finish", {"payload": b64(payload)})
        e.infer([np.ones((5, 64), np.float32)])
    (d.state / STATE_FILE).unlink()
    with d.open() as e:
        with pytest.raises(NotProvisionedError):
            e.call("load", {"dev_key": None})
    with d.open() as e:
        e.call("setup_begin", {"nonce": b64(nonce)})
        with pytest.raises(Exception) as err:
            e.call("setup_finish", {"payload": b64(payload)})
        assert not isinstance(err.value, AssertionError)
        with pytest.raises(NotProvisionedError):
            e.infer([np.ones((1, 64), np.float32)])


def _mnist_tiny(seed: int = 0) -> Any:
    """A random-weight softmax regression on 784 MNIST pixels: the shape the kennen detector reads."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((784, 10)) * 0.05).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["z"]), helper.make_node("Softmax", ["z"], ["p"], axis=1)],
        "mnist-tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 784])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 10])], [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_kennen_io_probes_are_refused_by_the_detector_in_the_capsule(tmp_path, provider):
    """The kennen-io detector travels encrypted in the capsule and scores every query in the
    enclave: benign MNIST digits are answered, probe-like queries are refused. The probes here are
    a stand-in (unrestricted uniform pixels, as kennen-io's optimised queries are unrestricted);
    the detector trained on real kennen-io queries is measured in EVALUATION.md."""
    from mlcapsule.attacks.data import load_idx_dataset
    from mlcapsule.defense_training import train_kennen_detector

    mnist = load_idx_dataset("mnist", "train", limit=1200)[0].reshape(-1, 784).astype(np.float32) / 255.0
    rng = np.random.default_rng(0)
    probes = rng.uniform(-1.0, 2.0, (600, 784)).astype(np.float32)
    detector = train_kennen_detector(mnist[:600], probes[:400], epochs=3, seed=0, threads=1)
    cap, _ = provider.pack("mnist", model=_mnist_tiny(), defenses=["kennen:threshold=0.5,action=refuse"],
                           kennen_detector=detector)
    with mlcapsule.open_capsule(cap, trust=mlcapsule.UnsafeTrustManifestKey(),
                                unsafe_dev_key=str(cap) + ".key", state_dir=tmp_path / "s") as c:
        answered = sum(len(c.predict(mnist[i:i + 1])) for i in range(600, 700))
        with pytest.raises(DefenseError, match="kennen"):
            c.predict(probes[500:501])
        st = c.status()["defenses"]["state"]
    assert answered == 100 and st["alarms"]["kennen"] == 1 and st["refused"] == 1


def test_degrade_answers_labels_only_after_an_alarm(tmp_path, provider, digits):
    """Action degrade: once the stream is flagged, every answer is a label (one-hot), also for the
    benign queries that follow and across a restart, until the provider's unlock voucher."""
    cap, ckey = _pack(provider, digits, ["ood:action=degrade"])
    d = Licensed(tmp_path, provider, cap, ckey)
    benign = np.ascontiguousarray(digits[1]["x_test"][:4], dtype=np.float32)
    with d.open() as e:
        d.setup(e)
        before = e.infer([benign])[0]
        for row in _uniform(60):
            e.infer([row[None]])
        after = e.infer([benign])[0]
    assert not set(np.unique(before)) <= {0.0, 1.0}
    assert set(np.unique(after)) <= {0.0, 1.0} and (after.argmax(1) == before.argmax(1)).all()
    with d.open() as e:
        e.call("load", {"dev_key": None})
        assert set(np.unique(e.infer([benign])[0])) <= {0.0, 1.0}
        e.call("apply_voucher", {"voucher": provider.unlock(d.lic, 1, reset=True)})
        assert not set(np.unique(e.infer([benign])[0])) <= {0.0, 1.0}


@pytest.mark.tpm
def test_restoring_old_defense_state_is_detected_as_rollback_on_tpm(tmp_path, provider, digits, swtpm,  # noqa: F811
                                                                    tpm_policy):  # noqa: F811
    """The same attack on `tpm`: the NV counter is never restored, so the older sets are a
    detected rollback, and a locking policy comes back locked."""
    from test_tpm_enclave import restore, set_up, snapshot, tpm_enclave

    cap, ckey = _pack(provider, digits, ["prada:action=lock"])
    state = tmp_path / "state"
    x = np.ascontiguousarray(digits[1]["x_test"], dtype=np.float32)
    with tpm_enclave(cap, state, swtpm) as e:
        set_up(e, provider, ckey, tpm_policy, budget=10_000, lease_size=20)
        for i in range(30):
            e.infer([x[i:i + 1]])
    snapshot(state, tmp_path / "old")
    with tpm_enclave(cap, state, swtpm) as e:
        e.call("load", {"dev_key": None})
        for i in range(30, 90):
            e.infer([x[i:i + 1]])
    restore(tmp_path / "old", state)
    with tpm_enclave(cap, state, swtpm) as e:
        e.call("load", {"dev_key": None})
        status = e.call("status")
        gaps = [r["body"]["data"] for r in e.call("usage_report")["receipts"] if r["body"]["kind"] == "defense-gap"]
        with pytest.raises(DefenseLockedError):
            e.infer([x[:1]])
    assert status["license_status"]["rollbacks_detected"] == 1 and status["defenses"]["state"]["locked"]
    assert gaps and gaps[-1]["reason"] == "rollback" and gaps[-1]["locked"] is True
