"""The enclave's logic behind the ECALLs: load a capsule, check inputs, run the model.

Runs inside the hardened worker. It holds the content key and the plaintext model and never
returns either: every reply is built from public manifest fields, status, and model outputs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from .._util import b64e
from ..crypto.chunks import SegmentCipher
from ..crypto.keys import ContentKey, ed25519_public_from_raw
from ..errors import (InputError, IntegrityError, LicenseExpiredError, NotProvisionedError, ProtocolError,
                      RollbackError)
from ..format.trust import UnsafeTrustManifestKey
from ..format.container import CapsuleFile
from ..format.manifest import Manifest, TensorSpec
from ..protocol.license import License, verify_license
from ..protocol.receipts import entry_hash, make_entry
from ..protocol.setup import NONCE_LEN, open_payload, report_data
from ..protocol.voucher import verify_voucher
from ..runtime.resident import ResidentModel, mapped_buffer
from ..runtime.streaming import MiB, StreamingModel, WeightReader, memory_status
from .backends.base import Backend
from .protocol import PROTOCOL_VERSION
from .state import (EnclaveState, SealedStore, check_time, expired_error, lease_for, next_voucher_seq,
                    observe_time, reconcile)

Model = ResidentModel | StreamingModel



Clock = Callable[[], dt.datetime]


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


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
        # Licensed mode only:
        self.state: EnclaveState | None = None
        self.store: SealedStore | None = None
        self.remaining = 0  # unanswered queries of the current lease (memory only)
        #: Queries carried from the last session's lease (clean close), usable after a counter step.
        self.carried = 0
        self._setup: dict[str, Any] | None = None  # ephemeral keys between setup_begin and setup_finish
        # Per-query bookkeeping in memory (licensed mode): the latest time seen and the expiry, so
        # a query within the current lease costs no state copy, parse or write.
        self._clock_floor: dt.datetime | None = None
        self._expiry: dt.datetime | None = None

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
                self._verify_license(m, state.license, state.receipt_key_public())
                state = store.bind(state)
                state, rollback = reconcile(state, store.counters(state))
                if rollback is not None:
                    # An older copy of the state was restored: charged, and reported to the
                    # provider in the signed receipt chain (`admin usage` counts these).
                    store.rebase(state)
                    state = store.save(self._append_receipt(state, "rollback", rollback))
                else:
                    store.catch_up(state)
                # Queries of a lease cut short by a crash count as answered: they were paid for.
                # After a clean close the state carries the rest of its lease (state.carry).
                state = replace(state, answered=state.charged - state.carry)
                self.state, self.store, self.remaining, self.carried = state, store, 0, state.carry
                content_key, mode = state.content_key, "license"
            self.model = self._build_model(capsule, content_key)
        finally:
            capsule.close()
        self.manifest = m
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
            model = self._build_model(capsule, content_key)  # also proves the key fits the capsule
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
        state, _ = check_time(state, self.clock())
        state = self._append_receipt(state, "setup", {"measurement": self.backend.measurement().hex()})
        self.state = store.save(state)
        # A new license inherits nothing from one this enclave had loaded before (a deliberate
        # `setup --replace`): no lease rest, no carried rest, no clock floor, no expiry.
        self.store, self.remaining, self.carried = store, 0, 0
        self._clock_floor = self._expiry = None
        if self.model is not None:
            self.model.close()
        self.model, self.manifest, self.license_mode = model, m, "license"
        return self._license_status()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.model is None or self.manifest is None:
            raise NotProvisionedError("no capsule is loaded in the enclave")
        feeds, n = check_inputs(self.manifest.inputs, inputs)
        if self.state is not None:
            self._charge(n)  # before the model runs: no partial answer can leak
        outputs = self.model.run(feeds)
        self.queries += n
        return {spec.name: out for spec, out in zip(self.manifest.outputs, outputs)}

    def infer_arrays(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """``infer`` on the fast path: inputs and outputs in the manifest's order."""
        m = self.manifest
        if self.model is None or m is None:
            raise NotProvisionedError("no capsule is loaded in the enclave")
        if len(arrays) != len(m.inputs):
            raise InputError(f"the model takes {len(m.inputs)} input(s), got {len(arrays)}")
        feeds, n = check_inputs(m.inputs, {spec.name: x for spec, x in zip(m.inputs, arrays)})
        if self.state is not None:
            self._charge(n)  # before the model runs: no partial answer can leak
        outputs = self.model.run(feeds)
        self.queries += n
        return outputs

    def apply_voucher(self, *, voucher: dict[str, Any]) -> dict[str, Any]:
        state, store, m = self._licensed()
        v = verify_voucher(voucher, ed25519_public_from_raw(m.provider_key),
                           license_id=state.license_id, device_id=state.device_id)
        # Bound to the voucher counter, not only to the sealed state: a state restored from
        # before a voucher was redeemed still refuses that voucher.
        expected = next_voucher_seq(state, store.voucher_counter(state))
        if v.seq < expected:
            raise RollbackError(f"voucher {v.seq} was already redeemed on this device",
                                hint="a voucher can be redeemed once; ask the provider for a new one")
        if v.seq != expected:
            raise RollbackError(f"voucher {v.seq} is out of order: the next one must be number {expected}",
                                hint="a voucher can be redeemed once, and in order")
        budget = None if state.budget is None else state.budget + v.queries
        state = replace(state, budget=budget, voucher_seq=v.seq, answered=self._answered(state))
        state = self._append_receipt(state, "voucher", {"seq": v.seq, "queries": v.queries})
        self.state = store.save(state)
        return self._license_status()

    def usage_report(self) -> dict[str, Any]:
        """Receipts not yet uploaded, ending with a fresh 'report' entry."""
        state, store, _ = self._licensed()
        state = self._append_receipt(replace(state, answered=self._answered(state)), "report", {})
        self.state = store.save(state)
        return {"license_id": state.license_id, "device_id": state.device_id, "receipts": state.receipts}

    def usage_ack(self, *, seq: int) -> dict[str, Any]:
        """The server has stored the chain up to ``seq``: forget those receipts."""
        state, store, _ = self._licensed()
        kept = [r for r in state.receipts if int(r["body"]["seq"]) > seq]
        if len(kept) != len(state.receipts):
            self.state = store.save(replace(state, receipts=kept))
        return {"pending": len(kept)}

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
            "license_status": self._license_status() if self.state is not None else None,
            "queries_this_session": self.queries,
            "ecall_profile": dict(self.ecall_profile),
            "load_seconds": self.load_seconds,
            "runtime": None if m is None else m.runtime.to_dict(),
            "model": model,
            "memory": {"baseline": self.memory_baseline, "now": memory_status(),
                       "limit": None if not self.memory_limit_mb else int(self.memory_limit_mb * MiB)},
        }

    # -- helpers ------------------------------------------------------------------------------
    def _licensed(self) -> tuple[EnclaveState, SealedStore, Manifest]:
        if self.state is None or self.store is None or self.manifest is None:
            raise NotProvisionedError("this capsule has no license loaded in the enclave")
        floor = self._clock_floor
        if floor is not None and (not self.state.last_time or floor > dt.datetime.fromisoformat(self.state.last_time)):
            self.state = replace(self.state, last_time=floor.isoformat())  # what the fast path saw
        return self.state, self.store, self.manifest

    def _answered(self, state: EnclaveState) -> int:
        return state.charged - self.remaining - self.carried

    def close(self) -> None:
        """A clean close: keep the unanswered rest of the current lease for the next session
        (a crash loses it), then drop the model."""
        try:
            state = self.state
            floor = self._clock_floor
            later = floor is not None and state is not None and (
                not state.last_time or floor > dt.datetime.fromisoformat(state.last_time))
            if state is not None and self.store is not None and (self.remaining or self.carried or later):
                carry = self.remaining + self.carried
                self.remaining = self.carried = 0
                if later:  # the latest time the fast path saw: a clock turned back later cannot undercut it
                    assert floor is not None
                    state = replace(state, last_time=floor.isoformat())
                try:
                    self.state = self.store.save_in_place(replace(state, answered=state.charged - carry, carry=carry))
                except RollbackError:
                    pass  # another session has moved the license on: its state stands, the rest is lost
        finally:
            if self.model is not None:
                self.model.close()

    def _charge(self, n: int) -> None:
        floor = self._clock_floor
        if n <= self.remaining and floor is not None:
            # Fast path: the current lease covers the batch; nothing to persist.
            now = self.clock()
            if now < floor:
                now = floor  # the clock went back: do not believe it
            if self._expiry is None or now < self._expiry:
                self._clock_floor = now
                self.remaining -= n
                return
        state, store, _ = self._licensed()
        now = self.clock()
        state, effective, expired = observe_time(state, now if floor is None or now > floor else floor)
        self._clock_floor = effective
        self._expiry = dt.datetime.fromisoformat(state.expires) if state.expires else None
        if expired:
            # Persist what was seen (sticky, and stepped into the expiry counter) *before*
            # refusing: a clock turned back afterwards, or a restored older state, cannot
            # revive the license. The unanswered rest of the lease is forfeit with it.
            if not self.state or not self.state.expired:
                carry = self.remaining + self.carried
                self.remaining = self.carried = 0
                self.state = store.save(replace(state, answered=state.charged - carry, carry=0))
            raise expired_error(state)
        if self.carried:
            # The rest of the last session's lease: usable once the counter has stepped past
            # the file that carried it (so restoring that file is a rollback, charged).
            self.state = state = store.save(replace(state, carry=0))
            self.remaining, self.carried = self.remaining + self.carried, 0
        extra = lease_for(state, self.remaining, n)
        if extra:
            state = replace(state, charged=state.charged + extra)
            state = replace(state, answered=state.charged - self.remaining - extra)
            state = self._append_lease(state, extra)
            self.state = store.save(state)  # persisted before anything is answered
            self.remaining += extra
        else:
            self.state = state
        self.remaining -= n

    def _append_lease(self, state: EnclaveState, queries: int) -> EnclaveState:
        """A lease receipt; if the last pending receipt is a lease too, it is replaced by one
        that covers both (same seq and link, the new cumulative counters), so a device offline
        for a long time keeps one receipt per run of leases, not one per lease. That entry
        cannot have reached the server: a usage report always ends with a 'report' entry, so a
        lease that was reported is never the last one."""
        last = state.receipts[-1]["body"] if state.receipts else None
        if last is None or last["kind"] != "lease" or set(last["data"]) != {"queries", "leases"}:
            return self._append_receipt(state, "lease", {"queries": queries, "leases": 1})
        key = Ed25519PrivateKey.from_private_bytes(state.receipt_key)
        entry = make_entry(key, seq=last["seq"], prev=last["prev"], kind="lease", license_id=state.license_id,
                           time=state.last_time or self.clock().isoformat(), charged=state.charged,
                           answered=min(state.answered, state.charged),
                           data={"queries": last["data"]["queries"] + queries, "leases": last["data"]["leases"] + 1})
        return replace(state, receipts=state.receipts[:-1] + [entry], head_hash=entry_hash(entry))

    def _append_receipt(self, state: EnclaveState, kind: str, data: dict[str, Any]) -> EnclaveState:
        key = Ed25519PrivateKey.from_private_bytes(state.receipt_key)
        seq = state.head_seq + 1
        entry = make_entry(key, seq=seq, prev=state.head_hash, kind=kind, license_id=state.license_id,
                           time=state.last_time or self.clock().isoformat(), charged=state.charged,
                           answered=min(state.answered, state.charged), data=data)
        return replace(state, receipts=state.receipts + [entry], head_seq=seq, head_hash=entry_hash(entry))

    def _license_status(self) -> dict[str, Any]:
        state = self.state
        assert state is not None
        return {
            "license_id": state.license_id, "device_id": state.device_id,
            "budget": state.budget, "charged": state.charged, "answered": self._answered(state),
            "remaining": None if state.budget is None else state.budget - self._answered(state),
            "lease_size": state.lease_size, "expires": state.expires, "vouchers_redeemed": state.voucher_seq,
            "receipts_pending": len(state.receipts), "rollbacks_detected": state.rollbacks_detected,
            "rollback_protected": self.backend.threat_model.rollback_protected,
        }

    @staticmethod
    def _verify_license(m: Manifest, envelope: dict[str, Any], receipt_pub: bytes) -> License:
        return verify_license(envelope, ed25519_public_from_raw(m.provider_key), capsule_id=m.capsule_id,
                              version=m.version, receipt_key=receipt_pub)

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
            reader.read_into(memoryview(weights), 0)
        finally:
            reader.close()
        t1 = time.perf_counter()
        model = ResidentModel(graph, weights, m.runtime, placeholder_dir=self.run_dir, threads=self.threads)
        model.load_breakdown = {"decrypt_seconds": t1 - t0, "session_seconds": time.perf_counter() - t1}
        return model

    @staticmethod
    def _decrypt(capsule: CapsuleFile, name: str, key: bytes) -> bytearray:
        m = capsule.manifest
        seg = m.segment(name)
        stored = capsule.segment_view(seg)
        try:
            if not seg.encrypted:
                if hashlib.sha256(stored).hexdigest() != seg.sha256:
                    raise IntegrityError("the capsule failed its integrity check")
                return bytearray(stored)
            return SegmentCipher(key, m.capsule_id, m.version, seg.index, seg.chunk_size).decrypt(stored, seg.plain_length)
        finally:
            stored.release()


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
        for want, got in zip(s.shape, x.shape):
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
