"""The enclave's logic behind the ECALLs: load a capsule, check inputs, run the model.

Runs inside the hardened worker. It holds the content key and the plaintext model and never
returns either: every reply is built from public manifest fields, status, and model outputs.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from ._util import b64e
from .backends.base import Backend
from .crypto.keys import ContentKey, ed25519_public_from_raw
from .defenses.ood import OodStats
from .defenses.pipeline import Alarm, DefenseState, apply, unlock
from .defenses.policy import DefensePolicy, tighten
from .detect import ChargePolicy, Detector
from .errors import (
    BudgetExhaustedError,
    FormatError,
    InputError,
    IntegrityError,
    MlcapsuleError,
    NotProvisionedError,
    ProtocolError,
    RollbackError,
)
from .format.container import CapsuleFile
from .format.manifest import Manifest, TensorSpec
from .format.trust import UnsafeTrustManifestKey
from .ledger import Effect, Ledger, Refuse
from .messages.license import License, verify_license
from .messages.receipts import verify_ack
from .messages.setup import NONCE_LEN, open_payload, report_data
from .messages.voucher import verify_voucher
from .protocol import PROTOCOL_VERSION
from .runtime.resident import ResidentModel, mapped_buffer
from .runtime.streaming import MiB, StreamingModel, WeightReader, memory_status
from .state import EnclaveState, SealedStore

Model = ResidentModel | StreamingModel



Clock = Callable[[], dt.datetime]


def _locked() -> MlcapsuleError:
    from .errors import DefenseLockedError

    return DefenseLockedError("the license is locked by the capsule's defenses; no query is answered")


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class EnclaveCore:
    def __init__(self, backend: Backend, capsule_path: Path | int, state_dir: Path, run_dir: Path,
                 *, hardening: dict[str, Any] | None = None, threads: int | None = None,
                 clock: Clock = _utc_now, memory_limit_mb: float | None = None) -> None:
        self.backend = backend
        self.capsule_path = capsule_path
        self.state_dir = state_dir
        self.run_dir = run_dir
        self.hardening = hardening or {}
        self.threads = threads
        self.clock = clock
        self.manifest: Manifest | None = None
        self.model: Model | None = None
        #: Streaming mode when set: the model runs within this many MiB (runtime/streaming.py).
        self.memory_limit_mb = memory_limit_mb
        #: The process's memory after imports (and, in streaming mode, ORT's initialization),
        #: before any capsule is loaded: what the memory limit counts from.
        self.memory_baseline = memory_status()
        self.license_mode = "none"
        self.queries = 0
        #: Seconds spent in each step of the fast-path infer ECALLs (filled by the worker).
        self.ecall_profile: dict[str, float] = {"calls": 0, "decode": 0.0, "infer": 0.0, "encode": 0.0, "write": 0.0}
        self.load_seconds = 0.0
        # Licensed mode only: the ledger decides every budget rule (enclave/ledger.py), the store
        # carries out its effects (enclave/state.py).
        self.ledger: Ledger | None = None
        self.store: SealedStore | None = None
        self._setup: dict[str, Any] | None = None  # ephemeral keys between setup_begin and setup_finish
        #: The last input signature that passed check_inputs, and its batch size (fast path).
        self._checked: tuple[Any, int] = ((), 0)
        self._input_names: list[str] = []
        # Defenses (issue 12): the capsule's policy tightened by the license, their state (sealed
        # with the license state in licensed mode; fresh per session with a dev key), the OOD
        # statistics and the kennen-io detector that travel encrypted in the capsule.
        self.defenses: DefensePolicy | None = None
        self.defense_state: DefenseState | None = None
        self._ood_stats: OodStats | None = None
        self._kennen: Any = None  # an ONNX Runtime session
        self._defense_dirty = False
        #: Charged per detection (the manifest's policy.charge, issue 16): the detector of this
        #: session's stream; only its verdicts leave the enclave.
        self.detector: Detector | None = None

    # -- ECALLs -------------------------------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "backend": self.backend.name,
            "measurement": self.backend.measurement().hex(),
            "threat_model": self.backend.threat_model.as_dict(),
            "hardening": self.hardening,
        }

    def load(self, *, dev_key: str | None) -> dict[str, Any]:
        """Load the capsule: with the sealed license state, or (development) a content key file."""
        t0 = time.perf_counter()
        # Trust: the manifest's key, pinned by the license (verified under that key below) or,
        # with a dev key, by the content key file. The host's own pin proves nothing in here.
        capsule = CapsuleFile(self.capsule_path, trust=UnsafeTrustManifestKey())
        try:
            m = capsule.manifest
            if dev_key is not None:
                key = ContentKey.load(dev_key)
                if key.capsule_id != m.capsule_id or key.version != m.version:
                    raise IntegrityError("the content key belongs to another capsule or version",
                                         hint="use the .key file written when this capsule version was packed")
                content_key, mode = key.key, "unsafe-dev-key"
            else:
                store = SealedStore(self.backend, self.state_dir, str(m.capsule_id), m.version)
                state = store.load()
                if state.capsule_id != str(m.capsule_id) or state.version != m.version:
                    raise IntegrityError("the sealed state belongs to another capsule")
                state = store.bind(state)
                # A restored older copy is charged and reported to the provider in the signed
                # receipt chain (`admin usage` counts these): the ledger's `open` rule.
                lic = self._verify_license(m, state.license, state.receipt_key_public())
                policy = self._defense_policy(m, lic)
                rollbacks = state.rollbacks_detected
                ledger, effects = Ledger.open(state, store.counters(state))
                store.apply(effects)
                self.ledger, self.store = ledger, store
                content_key, mode = state.content_key, "license"
                self._open_defenses(policy, capsule, content_key, store.loaded_extra,
                                    rolled_back=ledger.state.rollbacks_detected > rollbacks)
            if dev_key is not None:
                self._open_defenses(self._defense_policy(m, None), capsule, content_key, b"", rolled_back=False)
            self.model = self._build_model(capsule, content_key)
        finally:
            capsule.close()
        self.detector = _detector(m)
        self.manifest, self._checked = m, ((), 0)
        self.license_mode = mode
        self.load_seconds = time.perf_counter() - t0
        return {"capsule_id": str(m.capsule_id), "version": m.version, "license": self.license_mode,
                "load_seconds": self.load_seconds}

    def setup_begin(self, *, nonce: bytes) -> dict[str, Any]:
        """Fresh HPKE and receipt keys, and evidence binding them to the server's nonce."""
        if len(nonce) != NONCE_LEN:
            raise ProtocolError("the setup nonce has the wrong length")
        hpke_key = X25519PrivateKey.generate()
        receipt_key = Ed25519PrivateKey.generate()
        hpke_pub = hpke_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        receipt_pub = receipt_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        evidence = self.backend.evidence(report_data(nonce, hpke_pub, receipt_pub))
        self._setup = {"nonce": nonce, "hpke": hpke_key, "receipt": receipt_key}
        return {"hpke_pub": b64e(hpke_pub), "receipt_pub": b64e(receipt_pub), "evidence": evidence}

    def setup_finish(self, *, payload: bytes) -> dict[str, Any]:
        """Open the provider's HPKE payload, verify the license, seal the state, load the model."""
        if self._setup is None:
            raise ProtocolError("setup_finish without setup_begin")
        pending, self._setup = self._setup, None
        content_key, envelope = open_payload(payload, pending["hpke"], pending["nonce"])
        receipt_key: Ed25519PrivateKey = pending["receipt"]
        capsule = CapsuleFile(self.capsule_path, trust=UnsafeTrustManifestKey())  # pinned by the license below
        try:
            m = capsule.manifest
            receipt_pub = receipt_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            lic = self._verify_license(m, envelope, receipt_pub)
            policy = self._defense_policy(m, lic)
            model = self._build_model(capsule, content_key)  # also proves the key fits the capsule
            ood, kennen = self._defense_parts(policy, capsule, content_key)
        finally:
            capsule.close()
        configure = getattr(self.backend, "configure_from_license", None)
        if configure is not None:  # e.g. the TPM backend seals to the PCRs the license chooses
            configure(lic.policy)
        store = SealedStore(self.backend, self.state_dir, str(m.capsule_id), m.version)
        state = EnclaveState(
            capsule_id=str(m.capsule_id), version=m.version, content_key=content_key, license=envelope,
            license_id=lic.license_id, device_id=lic.device_id,
            receipt_key=receipt_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            budget=lic.budget, expires=lic.expires.isoformat() if lic.expires else None,
            lease_size=lic.lease_size, counter=store.counter())
        state = store.bind(state)
        # The defenses start with the license: a new setup is a new license with its own state
        # (and a fresh device slot at the provider), never a reset of another license's sets.
        self._set_defenses(policy, None if policy is None else DefenseState.new(policy), ood, kennen)
        store.extra = self._defense_blob
        ledger, effects = Ledger.setup(state, store.counters(state), self.clock(), self.backend.measurement().hex())
        store.apply(effects)
        # A new license inherits nothing from one this enclave had loaded before (a deliberate
        # `setup --replace`): a new ledger, no lease rest, no carried rest, no clock floor.
        self.ledger, self.store = ledger, store
        if self.model is not None:
            self.model.close()
        self.model, self.manifest, self.license_mode, self._checked = model, m, "license", ((), 0)
        self.detector = _detector(m)
        return self._license_status()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.model is None or self.manifest is None:
            raise NotProvisionedError("no capsule is loaded in the enclave")
        feeds, n = check_inputs(self.manifest.inputs, inputs)
        if self.detector is not None:
            outputs = self._detect(feeds, list(feeds.values()), n)
            return {spec.name: out for spec, out in zip(self.manifest.outputs, outputs, strict=True)}
        if self.ledger is not None:
            self._charge(n)  # before the model runs: no partial answer can leak
        outputs = self._run(feeds, list(feeds.values()), n)
        return {spec.name: out for spec, out in zip(self.manifest.outputs, outputs, strict=True)}

    def infer_arrays(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """``infer`` on the fast path: inputs and outputs in the manifest's order."""
        m = self.manifest
        if self.model is None or m is None:
            raise NotProvisionedError("no capsule is loaded in the enclave")
        if len(arrays) != len(m.inputs):
            raise InputError(f"the model takes {len(m.inputs)} input(s), got {len(arrays)}")
        # A stream of queries repeats one signature (dtypes and shapes): once it has passed
        # check_inputs, the same signature passes again, and so costs a tuple comparison.
        sig = tuple([(a.dtype.num, a.shape) for a in arrays])
        if sig == self._checked[0]:
            feeds, n = dict(zip(self._input_names, arrays, strict=True)), self._checked[1]
        else:
            feeds, n = check_inputs(m.inputs, {spec.name: x for spec, x in zip(m.inputs, arrays, strict=True)})
            self._checked, self._input_names = (sig, n), [spec.name for spec in m.inputs]
        if self.detector is not None:
            return self._detect(feeds, arrays, n)
        if self.ledger is not None:
            self._charge(n)  # before the model runs: no partial answer can leak
        return self._run(feeds, arrays, n)

    def _detect(self, feeds: dict[str, np.ndarray], arrays: list[np.ndarray], n: int) -> list[np.ndarray]:
        """Charged per detection: one window per call; the detector (enclave/detect.py) runs in
        here on the provider's signed parameters and only its verdict leaves: zeros, or a one at
        the class detected. A detection is charged before it is answered. The budget must have
        room for one before the model runs, so an exhausted budget refuses every window alike
        (refusing only at a detection would tell the client that one came)."""
        det = self.detector
        assert det is not None
        if n != 1:
            raise InputError("this capsule is charged per detection: send one window per call",
                             hint="use `mlcapsule listen` or Capsule.stream, which do")
        ledger = self.ledger
        if ledger is not None:
            self._charge(0)  # an expired license is refused here, before anything runs
            budget = ledger.state.budget
            if budget is not None and budget - ledger.answered < 1:
                raise BudgetExhaustedError(f"the query budget is exhausted ({budget} detections)")
        outputs = self._run(feeds, arrays, 1)
        hit = det.push(outputs[0][0])
        answer = np.zeros_like(outputs[0])
        if hit is not None:
            if ledger is not None:
                self._charge(1)
            answer[0, hit[0]] = 1
        return [answer]

    def _run(self, feeds: dict[str, np.ndarray], arrays: list[np.ndarray], n: int) -> list[np.ndarray]:
        """The model, then the defenses: only a defended answer leaves this method."""
        assert self.model is not None
        if self.defenses is None:
            outputs = self.model.run(feeds)
            self.queries += n
            return outputs
        ds = self.defense_state
        assert ds is not None
        self._defense_dirty = True
        if ds.locked:  # charged (above), not run
            ds.queries += n
            ds.refused += n
            raise _locked()
        try:
            outputs = self.model.run(feeds)
            scores = self._kennen_scores(arrays[0]) if self.defenses.kennen is not None else None
        except BaseException:
            ds.queries += n  # charged and seen: not a gap in the defenses' count
            raise
        self.queries += n
        res = apply(self.defenses, ds, arrays[0], outputs[0], kennen_scores=scores, ood_stats=self._ood_stats)
        self.defense_state = res.state
        if res.alarms:
            self._record_alarms(res.alarms)  # sealed, with a counter step, before any answer
        answer = res.raise_if_refused()
        outputs[0] = np.ascontiguousarray(answer, dtype=outputs[0].dtype)
        return outputs

    def apply_voucher(self, *, voucher: dict[str, Any]) -> dict[str, Any]:
        """A top-up voucher, or an unlock voucher for the defenses (``type`` unlock/v1)."""
        ledger, m = self._licensed()
        if voucher.get("type") == "unlock/v1":
            return self._unlock(voucher)
        v = verify_voucher(voucher, ed25519_public_from_raw(m.provider_key),
                           license_id=ledger.state.license_id, device_id=ledger.state.device_id)
        self._apply(ledger.voucher(v))
        return self._license_status()

    def _unlock(self, envelope: dict[str, Any]) -> dict[str, Any]:
        from .messages.unlock import verify_unlock

        ledger, m = self._licensed()
        u = verify_unlock(envelope, ed25519_public_from_raw(m.provider_key), license_id=ledger.state.license_id,
                          device_id=ledger.state.device_id)
        ds = self.defense_state
        if ds is None:
            raise NotProvisionedError("this capsule has no defenses to unlock", hint="nothing to do")
        # Numbered with the top-ups, on the voucher counter: a replay (even after restoring an
        # older state) is refused by the ledger before the lock is lifted.
        effects = ledger.unlock(u.seq, {"reset_detectors": u.reset})
        if any(isinstance(x, Refuse) for x in effects):
            self._apply(effects)  # raises; nothing changed
        # Lifted before the write, so the one sealed write that spends the voucher number also
        # holds the unlocked state: no crash can leave a spent voucher and a lock.
        ds.unlock_seq = min(ds.unlock_seq, u.seq - 1)
        self.defense_state = unlock(ds, u.seq, reset_detectors=u.reset)
        self._defense_dirty = True
        self._apply(effects)
        self._apply(ledger.record("defense", {"unlocked": u.seq, **self.defense_state.summary()}))
        return self._license_status()

    def usage_report(self) -> dict[str, Any]:
        """Receipts not yet acknowledged, ending with a fresh 'report' entry."""
        ledger, _ = self._licensed()
        receipts, effects = ledger.report()
        self._apply(effects)
        return {"license_id": ledger.state.license_id, "device_id": ledger.state.device_id, "receipts": receipts}

    def usage_ack(self, *, ack: dict[str, Any]) -> dict[str, Any]:
        """The provider's signed acknowledgement of the chain it stored: forget those receipts.
        Unsigned, for another head, or for another license: refused, and nothing is dropped."""
        ledger, m = self._licensed()
        a = verify_ack(ack, ed25519_public_from_raw(m.provider_key), license_id=ledger.state.license_id,
                       device_id=ledger.state.device_id)
        self._apply(ledger.ack(a))
        return {"pending": len(ledger.state.receipts)}

    def status(self) -> dict[str, Any]:
        m = self.manifest
        model = None if self.model is None else self.model.describe()
        public = m is not None and m.public_architecture and any(
            s.name == "graph" and not s.encrypted for s in m.segments)
        if model is not None and not public:
            # An encrypted graph: nothing per layer leaves the enclave (red team, issue 9: the op
            # types, weight sizes, nodes per segment and per-step timings of an encrypted MLP
            # did). Aggregates may: the memory limit, total load, run and decryption times, and
            # the process's total memory, which the host picks or can read from /proc anyway. A
            # whitelist, so a figure added to describe() later stays inside until it is judged.
            model = {k: v for k, v in model.items() if k in (
                "mode", "architecture", "memory_limit", "runs", "run_seconds", "decrypt_seconds",
                "session_seconds", "runtime", "onnxruntime")}
        if model is not None:
            model["architecture"] = "public" if public else "private"
        return {
            **self.hello(),
            "loaded": self.model is not None,
            "capsule": None if m is None else {"capsule_id": str(m.capsule_id), "version": m.version, "name": m.name},
            "license": self.license_mode,
            "license_status": self._license_status() if self.ledger is not None else None,
            "defenses": None if self.defenses is None else {
                "policy": self.defenses.describe(), "state": self._defense_view()},
            "queries_this_session": self.queries,
            "ecall_profile": dict(self.ecall_profile),
            "load_seconds": self.load_seconds,
            "runtime": None if m is None else m.runtime.to_dict(),
            "model": model,
            "memory": {"baseline": self.memory_baseline, "now": memory_status(),
                       "limit": None if not self.memory_limit_mb else int(self.memory_limit_mb * MiB)},
        }

    # -- helpers ------------------------------------------------------------------------------
    @property
    def state(self) -> EnclaveState | None:
        """The license state as the ledger holds it (licensed mode)."""
        return None if self.ledger is None else self.ledger.state

    def _licensed(self) -> tuple[Ledger, Manifest]:
        if self.ledger is None or self.manifest is None:
            raise NotProvisionedError("this capsule has no license loaded in the enclave")
        return self.ledger, self.manifest

    def _apply(self, effects: tuple[Effect, ...]) -> None:
        """Carry out the ledger's effects; if one cannot be, the session answers nothing more."""
        if not effects:
            return
        assert self.store is not None and self.ledger is not None
        try:
            self.store.apply(effects)
        except BaseException as e:
            # The ledger's own refusals are decisions; anything else is an effect that failed.
            if not any(isinstance(x, Refuse) and x.error is e for x in effects):
                self.ledger.poison(e if isinstance(e, MlcapsuleError) else
                                   RollbackError("the license state could not be saved", hint="start again"))
            raise

    def close(self) -> None:
        """A clean close: keep the unanswered rest of the current lease for the next session
        (a crash loses it), then drop the model."""
        try:
            if self.ledger is not None and self.store is not None:
                self.store.apply(self.ledger.close(force=self._defense_dirty))
        finally:
            if self.model is not None:
                self.model.close()

    def _charge(self, n: int) -> None:
        ledger = self.ledger
        assert ledger is not None
        effects = ledger.charge(n, self.clock())
        if effects:
            self._apply(effects)

    def _license_status(self) -> dict[str, Any]:
        assert self.ledger is not None
        return self.ledger.status(self.backend.threat_model.rollback_protected)

    @staticmethod
    def _verify_license(m: Manifest, envelope: dict[str, Any], receipt_pub: bytes) -> License:
        return verify_license(envelope, ed25519_public_from_raw(m.provider_key), capsule_id=m.capsule_id,
                              version=m.version, receipt_key=receipt_pub)

    # -- defenses -------------------------------------------------------------------------------
    def _defense_policy(self, m: Manifest, lic: License | None) -> DefensePolicy | None:
        """The capsule's signed policy, tightened by the license's grant (never loosened)."""
        grant = (lic.policy.get("defenses") if lic is not None else None) or []
        if not m.policy.defenses and not grant:
            return None
        base = DefensePolicy.from_dict(m.policy.defenses) if m.policy.defenses else DefensePolicy()
        if not isinstance(grant, list) or not all(isinstance(g, str) for g in grant):
            raise IntegrityError("the license's defense grant is malformed")
        policy = tighten(base, grant) if grant else base
        if policy.empty:
            return None
        if len(m.outputs) != 1:
            raise FormatError("a capsule with defenses must have exactly one output (the posteriors)")
        return policy

    def _defense_parts(self, policy: DefensePolicy | None, capsule: CapsuleFile,
                       content_key: bytes) -> tuple[OodStats | None, Any]:
        """The OOD statistics and the kennen-io detector the policy needs, from their encrypted
        segments; a policy that needs one the capsule lacks does not load."""
        if policy is None:
            return None, None
        names = {s.name for s in capsule.manifest.segments}
        ood = kennen = None
        if policy.ood is not None:
            if "defense.ood" not in names:
                raise IntegrityError("the capsule's ood defense has no statistics segment")
            ood = OodStats.from_bytes(bytes(self._decrypt(capsule, "defense.ood", content_key)))
        if policy.kennen is not None:
            if "defense.kennen" not in names:
                raise IntegrityError("the capsule's kennen defense has no detector segment")
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
            kennen = ort.InferenceSession(bytes(self._decrypt(capsule, "defense.kennen", content_key)), so,
                                          providers=["CPUExecutionProvider"])
        return ood, kennen

    def _set_defenses(self, policy: DefensePolicy | None, state: DefenseState | None, ood: OodStats | None,
                      kennen: Any) -> None:
        self.defenses, self.defense_state, self._ood_stats, self._kennen = policy, state, ood, kennen
        self._defense_dirty = False

    def _open_defenses(self, policy: DefensePolicy | None, capsule: CapsuleFile, content_key: bytes,
                       blob: bytes, *, rolled_back: bool) -> None:
        """Licensed mode: the defenses' sealed state, checked against the ledger's count. Queries
        the ledger counts as answered but the defenses never saw (a crash lost their updates, or
        an older state was restored) are reported to the provider; after a detected rollback a
        policy that can lock (or degrade) does so: the restored state may hide an alarm."""
        ood, kennen = self._defense_parts(policy, capsule, content_key)
        if policy is None:
            self._set_defenses(None, None, None, None)
            return
        state = DefenseState.from_bytes(blob, policy) if blob else DefenseState.new(policy)
        self._set_defenses(policy, state, ood, kennen)
        if self.ledger is None or self.store is None:
            return
        self.store.extra = self._defense_blob
        gap = self.ledger.answered - state.queries
        if gap > 0 or rolled_back:
            state.queries += max(gap, 0)
            data: dict[str, Any] = {"queries": max(gap, 0), "reason": "rollback" if rolled_back else "crash"}
            if rolled_back:
                actions = {d.action for d in policy.detectors}
                if "lock" in actions:
                    state.locked, data["locked"] = True, True
                elif "degrade" in actions:
                    state.degraded, data["degraded"] = True, True
            self._apply(self.ledger.record("defense-gap", data))

    def _defense_view(self) -> dict[str, Any] | None:
        """What ``status`` shows of the defenses' state. To a licensed client: what it observes
        anyway (queries seen, refused, locked, labels only), never the detectors' verdicts or
        alarms, which would be a free oracle telling an adaptive attacker which of its queries
        look like an attack (the provider reads the alarms in the receipts). With the dev key
        (the provider's own audit), everything."""
        ds = self.defense_state
        if ds is None:
            return None
        summary = ds.summary()
        if self.ledger is None:
            return summary
        return {k: summary[k] for k in ("queries", "refused", "locked", "degraded", "unlock_seq")}

    def _defense_blob(self) -> bytes:
        return b"" if self.defense_state is None else self.defense_state.to_bytes()

    def _record_alarms(self, alarms: list[Alarm]) -> None:
        if self.ledger is None:
            return  # dev key: nothing to report to
        assert self.defense_state is not None
        self._apply(self.ledger.record("alarm", {"alarms": [a.to_dict() for a in alarms],
                                                 "defense": self.defense_state.summary()}))

    def _kennen_scores(self, x: np.ndarray) -> np.ndarray:
        """The kennen-io detector's probability that each query is a probe (its class 1)."""
        sess = self._kennen
        inp = sess.get_inputs()[0]
        batch = np.asarray(x, dtype=np.float32)
        shape = [d if isinstance(d, int) else -1 for d in inp.shape]
        probs = sess.run(None, {inp.name: batch.reshape([len(batch), *shape[1:]])})[0]
        return np.asarray(probs, dtype=np.float64)[:, 1]

    def _build_model(self, capsule: CapsuleFile, content_key: bytes) -> Model:
        m = capsule.manifest
        graph = self._decrypt(capsule, "graph", content_key)
        # The reader decrypts chunk by chunk and drops the ciphertext pages it has read from the
        # process, so the mapped capsule does not count twice in the enclave's memory.
        reader = WeightReader(capsule, content_key, threads=self.threads)
        if self.memory_limit_mb:
            try:
                return StreamingModel(graph, reader, int(self.memory_limit_mb * MiB), threads=self.threads)
            except BaseException:
                reader.close()
                raise
        t0 = time.perf_counter()
        try:
            weights = mapped_buffer(reader.plain_length)
            reader.read_into(weights.data, 0)
        finally:
            reader.close()
        t1 = time.perf_counter()
        model = ResidentModel(graph, weights, m.runtime, placeholder_dir=self.run_dir, threads=self.threads)
        model.load_breakdown = {"decrypt_seconds": t1 - t0, "session_seconds": time.perf_counter() - t1}
        return model

    @staticmethod
    def _decrypt(capsule: CapsuleFile, name: str, key: bytes) -> bytearray:
        return capsule.plaintext(name, key)


def _detector(m: Manifest) -> Detector | None:
    """The detector of a capsule charged per detection, else None."""
    if not m.policy.charge:
        return None
    policy = ChargePolicy.from_dict(m.policy.charge)
    if policy.per != "detection":
        return None
    shape = m.outputs[0].shape
    if len(m.outputs) != 1 or len(shape) != 2 or not isinstance(shape[1], int) or shape[1] < 1:
        raise FormatError("a capsule charged per detection must have one output of shape (batch, classes)")
    return Detector(policy, shape[1])


def check_inputs(specs: tuple[TensorSpec, ...], inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Inputs must match the manifest exactly: names, dtypes, ranks and fixed dimensions.

    Returns the inputs and the batch size, which is what a call is charged: the leading
    dimension that every input of rank 1 or more shares, wherever that input sits in the
    manifest's order (a model whose inputs are all 0-d answers one query per call). Charging the
    first input's leading dimension instead let a model with a 0-d first input answer a batch of
    5,000 rows for the price of one (red team, issue 9)."""
    names = {s.name for s in specs}
    if set(inputs) != names:
        raise InputError(f"the model takes inputs {sorted(names)}, got {sorted(inputs)}")
    batch = None
    for s in specs:
        x = inputs[s.name]
        if x.dtype.name != s.dtype:
            raise InputError(f"input {s.name!r} must be {s.dtype}, got {x.dtype.name}")
        if x.ndim != len(s.shape):
            raise InputError(f"input {s.name!r} must have {len(s.shape)} dimensions, got shape {list(x.shape)}")
        for want, got in zip(s.shape, x.shape, strict=True):
            if isinstance(want, int) and want > 0 and want != got:
                raise InputError(f"input {s.name!r} must have shape {list(s.shape)}, got {list(x.shape)}")
        if x.ndim:
            if batch is not None and x.shape[0] != batch:
                raise InputError("all inputs must have the same batch size")
            batch = x.shape[0]
    if batch == 0:
        raise InputError("the batch is empty")
    return inputs, 1 if batch is None else int(batch)


__all__ = ["EnclaveCore", "check_inputs", "ProtocolError"]
