"""The license ledger (enclave/ledger.py), driven without a worker.

A hypothesis state machine runs the pure ledger and the real SealedStore logic over an in-memory
disk and in-memory monotonic counters, through schedules of: charges, crashes (the state lost
after its last persist), power cuts between a write and its counter steps, restores of ANY
earlier written state, the clock turned forward and back across the expiry, vouchers in and out
of order (and again after a restore), two sessions of one license at once, reports and
acknowledgements. Whatever the schedule, the queries answered never exceed the budget plus the
vouchers (each counted once), no voucher is accepted twice, and once the license has been seen
expired no session opened afterwards answers.

Also: the signed acknowledgement at the enclave (an unsigned one, one for another head, one
replayed from another license: refused, and no receipt dropped).
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from mlcapsule.enclave.ledger import Ledger, Persist, Refuse
from mlcapsule.enclave.state import EnclaveState, SealedStore
from mlcapsule.enclave.errors import (BudgetExhaustedError, FormatError, IntegrityError, LicenseExpiredError, RollbackError,
                              SignatureError)
from mlcapsule.enclave.messages.receipts import Ack, entry_hash
from mlcapsule.enclave.messages.voucher import Voucher

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
BUDGET, LEASE = 12, 4
EXPIRES = T0 + dt.timedelta(days=1)


class _PowerCut(Exception):
    """The machine stops between writing the state and stepping a counter."""


class MemoryBackend:
    """Monotonic counters in memory (starting high, as a new TPM NV counter does); sealing is
    the identity (the store's logic is what is under test, not AES-GCM)."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.cut_next_step = False

    def counter_read(self, name: str) -> int:
        return self.counters.setdefault(name, 1000)

    def counter_increment(self, name: str) -> int:
        if self.cut_next_step:
            self.cut_next_step = False
            raise _PowerCut()
        self.counters[name] = self.counter_read(name) + 1
        return self.counters[name]

    def seal(self, plaintext: bytes, *, label: bytes) -> bytes:
        return plaintext

    def unseal(self, blob: bytes, *, label: bytes) -> bytes:
        return blob


class MemoryStore(SealedStore):
    """The real SealedStore, writing to a list instead of a file: every blob ever written is
    kept, so a schedule can restore any of them."""

    def __init__(self, backend: MemoryBackend) -> None:
        super().__init__(backend, Path("/nonexistent"), str(uuid.uuid4()), 1)  # type: ignore[arg-type]
        self.disk: bytes | None = None
        self.written: list[bytes] = []

    def _read(self) -> bytes:
        assert self.disk is not None
        return self.disk

    def _write(self, blob: bytes) -> None:
        self.disk = blob
        self.written.append(blob)


def new_state(store: MemoryStore, *, budget: int | None = BUDGET, expires: dt.datetime | None = EXPIRES) -> EnclaveState:
    key = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return EnclaveState(capsule_id="c", version=1, content_key=b"k" * 32, license={}, license_id=str(uuid.uuid4()),
                        device_id="d", receipt_key=key, budget=budget,
                        expires=None if expires is None else expires.isoformat(), lease_size=LEASE)


def set_up(store: MemoryStore, now: dt.datetime = T0, **kw: Any) -> Ledger:
    state = store.bind(new_state(store, **kw))
    ledger, effects = Ledger.setup(state, store.counters(state), now, "m")
    store.apply(effects)
    return ledger


def open_ledger(store: MemoryStore) -> Ledger:
    state = store.bind(store.load())
    ledger, effects = Ledger.open(state, store.counters(state))
    store.apply(effects)
    return ledger


class Session:
    def __init__(self, ledger: Ledger, opened_after_expiry: bool) -> None:
        self.ledger = ledger
        self.opened_after_expiry = opened_after_expiry


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.backend = MemoryBackend()
        self.store = MemoryStore(self.backend)
        self.provider = {"issued": {}}  # voucher seq -> queries
        self.accepted: list[int] = []   # voucher seqs accepted, in order
        self.answered = 0
        self.now = T0
        self.expired_seen = False
        self.sessions: dict[str, Session | None] = {"a": None, "b": None}

    @initialize()
    def setup(self) -> None:
        self.sessions["a"] = Session(set_up(self.store, self.now), False)

    def _apply(self, name: str, effects: tuple[Any, ...]) -> None:
        """Carry out effects as EnclaveCore does: a failed effect poisons the session."""
        s = self.sessions[name]
        assert s is not None
        try:
            self.store.apply(effects)
        except _PowerCut:
            self.sessions[name] = None  # the machine is off: the ledger is gone
            raise
        except Exception as e:
            if not any(isinstance(x, Refuse) and x.error is e for x in effects):
                s.ledger.poison(e)  # type: ignore[arg-type]
            raise

    # -- sessions ---------------------------------------------------------------------------------
    @precondition(lambda self: None in self.sessions.values())
    @rule(name=st.sampled_from(["a", "b"]))
    def open_session(self, name: str) -> None:
        if self.sessions[name] is not None:
            return
        try:
            self.sessions[name] = Session(open_ledger(self.store), self.expired_seen)
        except RollbackError:
            pass  # another session moved the counter while this one caught up

    @precondition(lambda self: any(v is not None for v in self.sessions.values()))
    @rule(name=st.sampled_from(["a", "b"]))
    def crash(self, name: str) -> None:
        self.sessions[name] = None

    @precondition(lambda self: any(v is not None for v in self.sessions.values()))
    @rule(name=st.sampled_from(["a", "b"]))
    def close(self, name: str) -> None:
        s = self.sessions[name]
        if s is not None:
            self.store.apply(s.ledger.close())
            self.sessions[name] = None

    # -- queries ----------------------------------------------------------------------------------
    @precondition(lambda self: any(v is not None for v in self.sessions.values()))
    @rule(name=st.sampled_from(["a", "b"]), n=st.integers(1, 2 * LEASE + 1), cut=st.booleans())
    def charge(self, name: str, n: int, cut: bool) -> None:
        s = self.sessions[name]
        if s is None:
            return
        self.backend.cut_next_step = cut
        try:
            self._apply(name, s.ledger.charge(n, self.now))
        except _PowerCut:
            return
        except LicenseExpiredError:
            self.expired_seen = True
            return
        except (BudgetExhaustedError, RollbackError):
            return
        finally:
            self.backend.cut_next_step = False
        assert not (self.expired_seen and s.opened_after_expiry), "a license seen expired answered again"
        self.answered += n

    @precondition(lambda self: any(v is not None for v in self.sessions.values()))
    @rule(name=st.sampled_from(["a", "b"]), n=st.integers(1, 2 * LEASE + 1))
    def charge_more(self, name: str, n: int) -> None:
        self.charge(name, n, False)

    @rule(hours=st.sampled_from([-24 * 300, -2, 0, 1, 23, 25, 48]))  # across the expiry at +24 h
    def set_clock(self, hours: int) -> None:
        self.now = T0 + dt.timedelta(hours=hours)

    # -- restores -----------------------------------------------------------------------------------
    @rule(data=st.data(), keep_b=st.booleans())
    def restore_any_earlier_state(self, data: st.DataObject, keep_b: bool) -> None:
        """The owner restores a copy of the state (usually with the enclave stopped, which the
        next open_session restarts; sometimes while a session runs on)."""
        self.store.disk = data.draw(st.sampled_from(self.store.written))
        self.sessions["a"] = None
        if not keep_b:
            self.sessions["b"] = None

    # -- vouchers -----------------------------------------------------------------------------------
    @precondition(lambda self: any(v is not None for v in self.sessions.values()))
    @rule(name=st.sampled_from(["a", "b"]), data=st.data())
    def voucher(self, name: str, data: st.DataObject) -> None:
        s = self.sessions[name]
        if s is None:
            return
        issued = self.provider["issued"]
        seq = data.draw(st.integers(1, len(issued) + 1))  # an old one (a replay) or the next new one
        queries = issued.setdefault(seq, data.draw(st.integers(1, 10)))
        v = Voucher(s.ledger.state.license_id, "d", seq, queries)
        try:
            self._apply(name, s.ledger.voucher(v))
        except (RollbackError, _PowerCut):
            return
        assert seq not in self.accepted, f"voucher {seq} accepted twice"
        self.accepted.append(seq)

    # -- reports and acknowledgements ---------------------------------------------------------------
    @precondition(lambda self: any(v is not None for v in self.sessions.values()))
    @rule(name=st.sampled_from(["a", "b"]), good=st.booleans())
    def report_and_ack(self, name: str, good: bool) -> None:
        s = self.sessions[name]
        if s is None:
            return
        try:
            receipts, effects = s.ledger.report()
            self._apply(name, effects)
        except (RollbackError, _PowerCut):
            return
        last = receipts[-1]
        ack = Ack(s.ledger.state.license_id, "d", last["body"]["seq"], entry_hash(last) if good else "0" * 64)
        before = len(s.ledger.state.receipts)
        try:
            self._apply(name, s.ledger.ack(ack))
        except IntegrityError:
            assert not good and len(s.ledger.state.receipts) == before  # nothing dropped
            return
        except (RollbackError, _PowerCut):
            return
        assert good

    # -- invariants ---------------------------------------------------------------------------------
    @invariant()
    def never_more_than_the_budget_and_the_vouchers(self) -> None:
        paid = BUDGET + sum(self.provider["issued"][q] for q in set(self.accepted))
        assert self.answered <= paid, (self.answered, paid)


def test_ledger_stateful() -> None:
    """Thousands of schedules in seconds. The hypothesis profile (tests/conftest.py) decides the rest:
    "ci", the same schedules every run; "dev" (HYPOTHESIS_PROFILE=dev), fresh random ones, and more."""
    run_state_machine_as_test(LedgerMachine, settings=settings(
        max_examples=max(1000, settings.default.max_examples), stateful_step_count=40,
        deadline=None, suppress_health_check=list(HealthCheck)))


# -- targeted schedules -----------------------------------------------------------------------------
def test_a_restored_state_never_redeems_a_voucher_again() -> None:
    store = MemoryStore(MemoryBackend())
    led = set_up(store)
    store.apply(led.charge(BUDGET, T0))
    snapshot = store.disk
    store.apply(led.voucher(Voucher(led.state.license_id, "d", 1, 100)))
    store.disk = snapshot
    again = open_ledger(store)
    assert again.state.rollbacks_detected == 1
    effects = again.voucher(Voucher(led.state.license_id, "d", 1, 100))
    assert isinstance(effects[-1], Refuse) and "already redeemed" in effects[-1].error.message


def test_expiry_is_persisted_before_the_refusal() -> None:
    store = MemoryStore(MemoryBackend())
    led = set_up(store)
    effects = led.charge(1, T0 + dt.timedelta(days=2))
    assert [type(e) for e in effects] == [Persist, Refuse] and effects[0].expire
    assert isinstance(effects[1].error, LicenseExpiredError)


def test_fast_path_persists_nothing() -> None:
    store = MemoryStore(MemoryBackend())
    led = set_up(store)
    assert len(led.charge(1, T0)) == 1  # the first lease
    writes = len(store.written)
    for _ in range(LEASE - 1):
        assert led.charge(1, T0) == ()
    assert len(store.written) == writes


# -- the signed acknowledgement, at the enclave -------------------------------------------------------
@pytest.fixture()
def licensed(tmp_path: Path) -> Any:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from provider_sim import Provider

    from mlcapsule.enclave.backends.software import SoftwareBackend
    from mlcapsule.enclave.core import EnclaveCore

    provider = Provider(tmp_path / "provider")
    cap, ckey = provider.pack()
    run = tmp_path / "run"
    run.mkdir()
    core = EnclaveCore(SoftwareBackend(tmp_path / "platform"), cap, tmp_path / "state", run)
    nonce = os.urandom(32)
    begin = core.setup_begin(nonce=nonce)
    payload, lic = provider.answer(begin, nonce, ckey, budget=100, lease_size=10)
    core.setup_finish(payload=payload)
    yield core, provider, lic
    core.close()


def _ack(provider: Any, lic: dict[str, Any], seq: int, h: str, key: Ed25519PrivateKey | None = None) -> dict[str, Any]:
    return Ack(lic["body"]["license_id"], lic["body"]["device_id"], seq, h).sign(key or provider.key)


def test_unsigned_or_foreign_acknowledgements_drop_no_receipt(licensed: Any) -> None:
    """The host used to make the enclave forget receipts that never reached the server
    (`usage_ack(seq=2**62)`); now only the provider's signed acknowledgement of exactly a head
    the enclave holds does."""
    core, provider, lic = licensed
    import numpy as np

    core.infer({"input": np.ones((3, 8), np.float32)})
    report = core.usage_report()
    last = report["receipts"][-1]
    seq, good = last["body"]["seq"], entry_hash(last)
    pending = len(report["receipts"])
    forged = _ack(provider, lic, seq, good, key=Ed25519PrivateKey.generate())  # not the provider's key
    unsigned = {**_ack(provider, lic, seq, good), "signature": ""}
    other_head = _ack(provider, lic, seq, "f" * 64)
    other_license = Ack(str(uuid.uuid4()), lic["body"]["device_id"], seq, good).sign(provider.key)
    legacy = {"seq": 2 ** 62}
    for bad, err in ((forged, SignatureError), (unsigned, (FormatError, IntegrityError)),
                     (other_head, IntegrityError), (other_license, IntegrityError), (legacy, FormatError)):
        with pytest.raises(err):
            core.usage_ack(ack=bad)
        assert core.status()["license_status"]["receipts_pending"] == pending
    assert core.usage_ack(ack=_ack(provider, lic, seq, good)) == {"pending": 0}
    assert core.usage_ack(ack=_ack(provider, lic, seq, good)) == {"pending": 0}  # a repeated ack: nothing to do
