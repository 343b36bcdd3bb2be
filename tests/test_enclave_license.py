"""The enclave's side of the license: setup, budget, expiry, vouchers, receipts, sealing.

The provider is simulated in memory (tests/provider_sim.py) with the real signing and HPKE
code; the enclave is the real worker process unless a test needs an injected clock.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mlcapsule.enclave._util import b64d
from mlcapsule.enclave.crypto.keys import ed25519_public_from_raw
from mlcapsule.enclave.backends.software import SoftwareBackend
from mlcapsule.enclave.core import EnclaveCore
from mlcapsule.host import EnclaveProcess
from mlcapsule.enclave.state import STATE_FILE
from mlcapsule.enclave.errors import (BudgetExhaustedError, FormatError, IntegrityError, LicenseExpiredError,
                              NotProvisionedError, RollbackError)
from mlcapsule.enclave.messages.receipts import GENESIS, ChainHead, verify_chain
from mlcapsule.enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey  # noqa: F401

from provider_sim import Provider, b64

X1 = np.ones((1, 8), np.float32)


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setenv("MLCAPSULE_HOME", str(tmp_path / "home"))
    return {"state": tmp_path / "state", "platform": tmp_path / "platform", "root": tmp_path}


@pytest.fixture()
def provider(env: dict[str, Path]) -> Provider:
    return Provider(env["root"] / "provider")


def enclave(cap: Path, env: dict[str, Path], **kw: object) -> EnclaveProcess:
    return EnclaveProcess(cap, state_dir=env["state"], platform_dir=env["platform"], **kw)  # type: ignore[arg-type]


def set_up(e: EnclaveProcess, provider: Provider, ckey, **kw):  # type: ignore[no-untyped-def]
    nonce = os.urandom(32)
    begin = e.call("setup_begin", {"nonce": b64(nonce)})
    payload, env = provider.answer(begin, nonce, ckey, **kw)
    return e.call("setup_finish", {"payload": b64(payload)}), env, begin


def query(e: EnclaveProcess, n: int = 1) -> np.ndarray:
    return e.infer([np.ones((n, 8), np.float32)])[0]


# -- setup ---------------------------------------------------------------------------------------
def test_setup_then_offline_predictions_after_restart(env, provider):
    cap, ckey = provider.pack()
    with enclave(cap, env) as e:
        info, _, _ = set_up(e, provider, ckey, budget=10, lease_size=4)
        assert info["budget"] == 10 and info["charged"] == 0
        assert query(e, 2).shape == (2, 3)
    with enclave(cap, env) as e:
        e.call("load", {"dev_key": None})
        st_ = e.call("status")["license_status"]
        # A clean close keeps the rest of the lease: a CLI call per query must not burn a lease each.
        assert st_["charged"] == 4 and st_["answered"] == 2 and st_["remaining"] == 8
        assert query(e, 2).shape == (2, 3)
        st_ = e.call("status")["license_status"]
        assert st_["charged"] == 4 and st_["answered"] == 4  # answered from the carried rest, no new lease
        assert query(e, 1).shape == (1, 3)
        e.kill()  # a crash: the rest of this lease (3 queries) is lost, as the lease rule says
    with enclave(cap, env) as e:
        e.call("load", {"dev_key": None})
        st_ = e.call("status")["license_status"]
        assert st_["charged"] == 8 and st_["answered"] == 8 and st_["remaining"] == 2


def test_restoring_the_state_written_at_a_clean_close_does_not_refill_the_lease(env, provider):
    """Rollback of the carried lease: the rest of a lease kept at a clean close is spent only
    after the counter has stepped, so restoring that file later is a rollback, charged."""
    cap, ckey = provider.pack()
    with enclave(cap, env) as e:
        set_up(e, provider, ckey, budget=20, lease_size=10)
        query(e, 1)  # lease of 10 charged, 9 carried at close
    shutil.copytree(env["state"], env["root"] / "snap")
    answered = 1
    with enclave(cap, env) as e:
        e.call("load", {"dev_key": None})
        answered += len(query(e, 9))  # the carried 9
    shutil.rmtree(env["state"])
    shutil.copytree(env["root"] / "snap", env["state"])  # the sealed state only: the counter stays
    with enclave(cap, env) as e:
        e.call("load", {"dev_key": None})
        st_ = e.call("status")["license_status"]
        assert st_["rollbacks_detected"] == 1
        while True:
            try:
                answered += len(query(e, 1))
            except BudgetExhaustedError:
                break
    assert answered <= 20


def test_predict_without_setup_is_refused(env, provider):
    cap, _ = provider.pack()
    with enclave(cap, env) as e:
        with pytest.raises(NotProvisionedError):
            e.call("load", {"dev_key": None})
        with pytest.raises(NotProvisionedError):
            query(e)


def test_license_signed_by_another_key_refused(env, provider):
    cap, ckey = provider.pack()
    with enclave(cap, env) as e, pytest.raises(IntegrityError):
        set_up(e, provider, ckey, key=Ed25519PrivateKey.generate())
    assert not (env["state"] / STATE_FILE).exists()


def test_license_for_another_capsule_or_version_refused(env, provider):
    cap, ckey = provider.pack()
    other, _ = provider.pack("other")
    from mlcapsule.enclave.format.container import CapsuleFile

    other_id = CapsuleFile(other, trust=UnsafeTrustManifestKey()).manifest.capsule_id
    with enclave(cap, env) as e, pytest.raises(IntegrityError, match="another capsule"):
        set_up(e, provider, ckey, capsule_id=other_id)
    with enclave(cap, env) as e, pytest.raises(IntegrityError, match="another capsule"):
        set_up(e, provider, ckey, version=ckey.version + 1)


def test_tampered_hpke_payload_refused(env, provider):
    cap, ckey = provider.pack()
    with enclave(cap, env) as e:
        nonce = os.urandom(32)
        begin = e.call("setup_begin", {"nonce": b64(nonce)})
        payload, _ = provider.answer(begin, nonce, ckey)
        for pos in (0, 40, len(payload) // 2, len(payload) - 1):
            bad = bytearray(payload)
            bad[pos] ^= 1
            e.call("setup_begin", {"nonce": b64(nonce)})
            with pytest.raises(IntegrityError):
                e.call("setup_finish", {"payload": b64(bytes(bad))})
    assert not (env["state"] / STATE_FILE).exists()


def test_payload_for_another_setup_nonce_refused(env, provider):
    """A payload recorded from one setup cannot be replayed into another (the nonce is HPKE info)."""
    cap, ckey = provider.pack()
    with enclave(cap, env) as e:
        begin = e.call("setup_begin", {"nonce": b64(os.urandom(32))})
        payload, _ = provider.answer(begin, os.urandom(32), ckey)
        with pytest.raises(IntegrityError):
            e.call("setup_finish", {"payload": b64(payload)})


def test_content_key_of_another_capsule_refused(env, provider):
    cap, _ = provider.pack()
    _, other_key = provider.pack("other")
    with enclave(cap, env) as e:
        nonce = os.urandom(32)
        begin = e.call("setup_begin", {"nonce": b64(nonce)})
        import dataclasses

        mixed = dataclasses.replace(other_key, capsule_id=_capsule_id(cap), version=1)
        payload, _ = provider.answer(begin, nonce, mixed)
        with pytest.raises(IntegrityError):
            e.call("setup_finish", {"payload": b64(payload)})


def _capsule_id(cap: Path):  # type: ignore[no-untyped-def]
    from mlcapsule.enclave.format.container import CapsuleFile

    with CapsuleFile(cap, trust=UnsafeTrustManifestKey()) as cf:
        return cf.manifest.capsule_id


def test_sealed_state_copied_to_another_installation_refused(env, provider):
    cap, ckey = provider.pack()
    with enclave(cap, env) as e:
        set_up(e, provider, ckey)
    with EnclaveProcess(cap, state_dir=env["state"], platform_dir=env["root"] / "other-platform") as e:
        with pytest.raises(IntegrityError, match="cannot be opened on this installation"):
            e.call("load", {"dev_key": None})


# -- budget ----------------------------------------------------------------------------------------
def test_budget_charged_before_answer_and_exhaustion_leaks_nothing(env, provider):
    cap, ckey = provider.pack()
    with enclave(cap, env) as e:
        set_up(e, provider, ckey, budget=5, lease_size=2)
        assert query(e, 3).shape == (3, 3)
        with pytest.raises(BudgetExhaustedError) as exc:
            query(e, 3)  # 2 left: the whole batch is refused, no partial answer
        assert "2 left" in str(exc.value)
        assert query(e, 2).shape == (2, 3)
        with pytest.raises(BudgetExhaustedError):
            query(e, 1)
        assert e.call("status")["license_status"]["answered"] == 5


def test_voucher_tops_up_offline_and_replay_or_reorder_refused(env, provider):
    cap, ckey = provider.pack()
    with enclave(cap, env) as e:
        _, lic, _ = set_up(e, provider, ckey, budget=2, lease_size=2)
        query(e, 2)
        with pytest.raises(BudgetExhaustedError):
            query(e)
        with pytest.raises(RollbackError):  # voucher 2 before voucher 1: reordering
            e.call("apply_voucher", {"voucher": provider.voucher(lic, 2, 5)})
        info = e.call("apply_voucher", {"voucher": provider.voucher(lic, 1, 5)})
        assert info["budget"] == 7 and info["remaining"] == 5
        with pytest.raises(RollbackError):  # the same voucher again: replay
            e.call("apply_voucher", {"voucher": provider.voucher(lic, 1, 5)})
        assert query(e, 5).shape == (5, 3)


def test_voucher_for_another_device_or_forged_refused(env, provider):
    cap, ckey = provider.pack()
    with enclave(cap, env) as e:
        _, lic, _ = set_up(e, provider, ckey)
        other = {**lic, "body": {**lic["body"], "device_id": "someone-else"}}
        with pytest.raises(IntegrityError):
            e.call("apply_voucher", {"voucher": provider.voucher(other, 1, 5)})
        forged = provider.voucher(lic, 1, 5)
        forged["body"]["queries"] = 5000
        with pytest.raises(IntegrityError):
            e.call("apply_voucher", {"voucher": forged})
        with pytest.raises(FormatError):  # a license is not a voucher
            e.call("apply_voucher", {"voucher": lic})


def test_budget_rollback_by_restoring_sealed_state_is_not_detected_on_software(env, provider):
    """Documented limitation: on `software`, restoring state AND the counter file buys queries back."""
    cap, ckey = provider.pack()
    with enclave(cap, env) as e:
        set_up(e, provider, ckey, budget=4, lease_size=2)
    snapshot = env["root"] / "snap"
    shutil.copytree(env["state"], snapshot / "state", ignore=shutil.ignore_patterns("run-*"))
    shutil.copytree(env["platform"], snapshot / "platform")
    with enclave(cap, env) as e:
        e.call("load", {"dev_key": None})
        query(e, 4)
    shutil.rmtree(env["state"])
    shutil.rmtree(env["platform"])
    shutil.copytree(snapshot / "state", env["state"])
    shutil.copytree(snapshot / "platform", env["platform"])
    with enclave(cap, env) as e:
        e.call("load", {"dev_key": None})
        assert query(e, 4).shape == (4, 3)  # the attack works: nothing on this backend can stop it


def test_restoring_only_the_sealed_state_is_charged(env, provider):
    """Restoring the state file without the counter is caught by the counter check."""
    cap, ckey = provider.pack()
    with enclave(cap, env) as e:
        set_up(e, provider, ckey, budget=6, lease_size=2)
    old = (env["state"] / STATE_FILE).read_bytes()
    with enclave(cap, env) as e:
        e.call("load", {"dev_key": None})
        query(e, 2)
    (env["state"] / STATE_FILE).write_bytes(old)
    with enclave(cap, env) as e:
        e.call("load", {"dev_key": None})
        lic = e.call("status")["license_status"]
        assert lic["rollbacks_detected"] == 1
        assert lic["charged"] >= 2  # the lease spent after the snapshot still counts
        query(e, 4)  # 2 answered before the restore + 4 = the budget of 6
        with pytest.raises(BudgetExhaustedError):
            query(e, 1)


# -- expiry and the clock (in process: the clock is injected) ---------------------------------------
class _Clock:
    def __init__(self, t: dt.datetime) -> None:
        self.t = t

    def __call__(self) -> dt.datetime:
        return self.t


def _core(cap: Path, env: dict[str, Path], clock: _Clock) -> EnclaveCore:
    run = env["root"] / "run"
    run.mkdir(exist_ok=True)
    return EnclaveCore(SoftwareBackend(env["platform"]), cap, env["state"], run, clock=clock)


def _set_up_core(cap: Path, env: dict[str, Path], clock: _Clock, provider: Provider, ckey: Any,
                 **license_kw: Any) -> EnclaveCore:
    """An in-process enclave core, set up with a license from ``provider``."""
    core = _core(cap, env, clock)
    nonce = os.urandom(32)
    begin = core.setup_begin(nonce=nonce)
    payload, _ = provider.answer(begin, nonce, ckey, **license_kw)
    core.setup_finish(payload=payload)
    return core


@pytest.mark.parametrize("copied_state", [False, True])
def test_double_spending_with_two_sessions_of_one_license_is_refused(env, provider, copied_state):
    """Two enclaves of one license at once (on the same state folder, or on a copy of it, with
    the installation's counter) cannot each spend the same budget: the one whose state the
    counter has moved past refuses to charge, and later loads charge what it cannot prove."""
    cap, ckey = provider.pack()
    with enclave(cap, env) as e:
        set_up(e, provider, ckey, budget=12, lease_size=2)
    other = env["root"] / "state2"
    if copied_state:
        shutil.copytree(env["state"], other)
    a = enclave(cap, env)
    b = EnclaveProcess(cap, state_dir=other if copied_state else env["state"], platform_dir=env["platform"])
    answered = 0
    try:
        for x in (a, b):
            x.call("load", {"dev_key": None})
        live = [a, b]
        while live:
            for x in list(live):
                try:
                    answered += len(query(x, 1))
                except (BudgetExhaustedError, RollbackError):
                    live.remove(x)
    finally:
        a.close()
        b.close()
    assert answered <= 12
    with enclave(cap, env) as e:  # and what is left afterwards does not add up to more either
        e.call("load", {"dev_key": None})
        while True:
            try:
                answered += len(query(e, 1))
            except BudgetExhaustedError:
                break
    assert answered <= 12


def test_upgrading_mlcapsule_keeps_the_license_and_the_budget(env, provider, monkeypatch):
    """A new mlcapsule version (another measurement) opens the state the previous one sealed:
    an upgrade must not cost the client its license, nor a device slot for a second setup."""
    import mlcapsule.enclave.backends.software as sw

    clock = _Clock(dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc))
    cap, ckey = provider.pack()
    core = _set_up_core(cap, env, clock, provider, ckey, budget=5, lease_size=1)
    old_measurement = core.backend.measurement()
    core.infer({"input": X1})
    monkeypatch.setattr(sw, "measurement", lambda: hashlib.sha256(b"mlcapsule, the next version").digest())
    upgraded = _core(cap, env, clock)
    assert upgraded.backend.measurement() != old_measurement
    upgraded.load(dev_key=None)
    assert upgraded._license_status()["remaining"] == 4
    for _ in range(4):
        upgraded.infer({"input": X1})
    with pytest.raises(BudgetExhaustedError):
        upgraded.infer({"input": X1})


def test_clock_turned_back_after_a_clean_close_does_not_extend_the_license(env, provider):
    """Queries within a lease persist nothing, but a clean close records the latest time they saw:
    turning the clock back before the next session does not buy time before expiry."""
    t0 = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    clock = _Clock(t0)
    cap, ckey = provider.pack()
    core = _set_up_core(cap, env, clock, provider, ckey, budget=100, lease_size=50,
                        expires=t0 + dt.timedelta(days=1))
    core.infer({"input": X1})  # charges the lease at t0
    clock.t = t0 + dt.timedelta(hours=20)
    core.infer({"input": X1})  # within the lease: nothing persisted
    core.close()
    later = _core(cap, env, _Clock(t0 + dt.timedelta(hours=1)))  # the clock turned back 19 hours
    later.load(dev_key=None)
    assert later.state is not None and later.state.last_time == (t0 + dt.timedelta(hours=20)).isoformat()


def test_expired_license_refused_and_clock_rollback_does_not_revive_it(env, provider):
    """Red team (issue 9, break 3): a license refused at +2 days answered again once the clock
    was turned back to +23 h and to +0 (libfaketime), because the expiry check raised before it
    recorded the time it saw. Once seen expired, it stays expired: in this session, in the next
    ones, whatever the clock says."""
    t0 = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    clock = _Clock(t0)
    cap, ckey = provider.pack()
    core = _set_up_core(cap, env, clock, provider, ckey, budget=100, lease_size=10,
                        expires=t0 + dt.timedelta(days=1))
    core.infer({"input": X1})
    clock.t = t0 + dt.timedelta(days=2)
    with pytest.raises(LicenseExpiredError):
        core.infer({"input": X1})
    clock.t = t0 + dt.timedelta(hours=23)  # the same session, clock turned back
    with pytest.raises(LicenseExpiredError):
        core.infer({"input": X1})
    core.close()
    for back in (dt.timedelta(hours=23), dt.timedelta(0), -dt.timedelta(days=300)):
        later = _core(cap, env, _Clock(t0 + back))
        later.load(dev_key=None)
        with pytest.raises(LicenseExpiredError):
            later.infer({"input": X1})
        later.close()


def test_restoring_the_state_from_before_expiry_does_not_revive_the_license(env, provider):
    """The expiry seen is also stepped into a monotonic counter: restoring the sealed state from
    before it (with the clock turned back) is a detected rollback, and the license stays expired."""
    t0 = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    clock = _Clock(t0)
    cap, ckey = provider.pack()
    core = _set_up_core(cap, env, clock, provider, ckey, budget=100, lease_size=10,
                        expires=t0 + dt.timedelta(days=1))
    core.infer({"input": X1})
    core.close()
    before = (env["state"] / STATE_FILE).read_bytes()
    late = _core(cap, env, _Clock(t0 + dt.timedelta(days=2)))
    late.load(dev_key=None)
    with pytest.raises(LicenseExpiredError):
        late.infer({"input": X1})
    late.close()
    (env["state"] / STATE_FILE).write_bytes(before)
    revived = _core(cap, env, _Clock(t0 + dt.timedelta(hours=1)))
    revived.load(dev_key=None)
    assert revived.state is not None and revived.state.rollbacks_detected == 1
    with pytest.raises(LicenseExpiredError):
        revived.infer({"input": X1})


# -- receipts --------------------------------------------------------------------------------------
def test_receipt_chain_verifies_and_tampering_or_gap_is_detected(env, provider):
    cap, ckey = provider.pack()
    with enclave(cap, env) as e:
        _, lic, begin = set_up(e, provider, ckey, budget=20, lease_size=2)
        for n in (1, 3, 2):
            query(e, n)
        e.call("apply_voucher", {"voucher": provider.voucher(lic, 1, 5)})
        report = e.call("usage_report")
    receipts = report["receipts"]
    key = ed25519_public_from_raw(b64d(begin["receipt_pub"]))
    lid = lic["body"]["license_id"]
    head = verify_chain(receipts, key, license_id=lid, head=ChainHead(0, GENESIS, 0, 0))
    assert head.seq == len(receipts) and head.answered == 6 and head.charged == 6
    with pytest.raises(IntegrityError):  # a gap
        verify_chain(receipts[:1] + receipts[2:], key, license_id=lid, head=ChainHead(0, GENESIS, 0, 0))
    edited = [dict(r) for r in receipts]
    edited[1] = {**edited[1], "body": {**edited[1]["body"], "answered": 0, "charged": 0}}
    with pytest.raises(IntegrityError):  # an edit
        verify_chain(edited, key, license_id=lid, head=ChainHead(0, GENESIS, 0, 0))
    with pytest.raises(IntegrityError):  # reordering
        verify_chain(list(reversed(receipts)), key, license_id=lid, head=ChainHead(0, GENESIS, 0, 0))


def test_offline_lease_receipts_stay_bounded_and_reported_ones_are_never_rewritten(env, provider):
    """A device offline for many leases keeps one receipt per run of leases (the sealed state
    and each persist stay small), and receipts already reported are never replaced, so an upload
    after a report whose ack was lost still continues the server's chain."""
    cap, ckey = provider.pack()
    with enclave(cap, env) as e:
        _, lic, begin = set_up(e, provider, ckey, budget=None, lease_size=1)
        for _ in range(150):
            query(e, 1)
        assert e.call("status")["license_status"]["receipts_pending"] <= 3  # setup?, lease run, ...
        first = e.call("usage_report")["receipts"]
        for _ in range(5):  # the ack of the first report never arrives
            query(e, 1)
        second = e.call("usage_report")["receipts"]
    key = ed25519_public_from_raw(b64d(begin["receipt_pub"]))
    lid = lic["body"]["license_id"]
    assert len(first) <= 3 and second[:len(first)] == first  # reported receipts are unchanged
    server = verify_chain(first, key, license_id=lid, head=ChainHead(0, GENESIS, 0, 0))
    assert server.charged == 150 and server.answered == 150
    leases = [r for r in first if r["body"]["kind"] == "lease"]
    assert sum(r["body"]["data"]["queries"] for r in leases) == 150
    head = verify_chain(second[len(first):], key, license_id=lid, head=server)
    assert head.charged == 155 and head.answered == 155


# -- stateful: queries, crashes, restarts ---------------------------------------------------------
BUDGET, LEASE = 23, 4


class BudgetMachine(RuleBasedStateMachine):
    """Queries answered never exceed the budget; each crash loses at most one lease, and a
    clean restart loses nothing."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.tmp = Path(tempfile.mkdtemp(prefix="mlc-budget-"))
        self.env = {"state": self.tmp / "state", "platform": self.tmp / "platform", "root": self.tmp}
        self.answered = 0
        self.crashes = 0
        self.e: EnclaveProcess | None = None

    @initialize()
    def setup(self) -> None:
        os.environ["MLCAPSULE_HOME"] = str(self.tmp / "home")
        self.provider = Provider(self.tmp / "provider")
        self.cap, ckey = self.provider.pack()
        self.e = enclave(self.cap, self.env)
        set_up(self.e, self.provider, ckey, budget=BUDGET, lease_size=LEASE)

    @precondition(lambda self: self.e is not None)
    @rule(n=st.integers(1, 6))
    def query(self, n: int) -> None:
        assert self.e is not None
        before = self.e.call("status")["license_status"]
        try:
            query(self.e, n)
            self.answered += n
        except BudgetExhaustedError:
            assert before["budget"] - before["charged"] + self._remaining_in_lease(before) < n

    @staticmethod
    def _remaining_in_lease(s: dict) -> int:  # type: ignore[type-arg]
        return s["charged"] - s["answered"]

    @precondition(lambda self: self.e is not None)
    @rule()
    def crash(self) -> None:
        assert self.e is not None
        self.e.kill()
        self.e = None
        self.crashes += 1

    @precondition(lambda self: self.e is not None)
    @rule()
    def clean_restart(self) -> None:
        """A clean close and a new session lose nothing: the rest of the lease is carried."""
        assert self.e is not None
        self.e.close()
        self.e = enclave(self.cap, self.env)
        self.e.call("load", {"dev_key": None})

    @precondition(lambda self: self.e is None)
    @rule()
    def restart(self) -> None:
        self.e = enclave(self.cap, self.env)
        self.e.call("load", {"dev_key": None})

    @invariant()
    def never_more_than_budget(self) -> None:
        assert self.answered <= BUDGET

    @invariant()
    def loss_per_crash_at_most_one_lease(self) -> None:
        if self.e is None:
            return
        s = self.e.call("status")["license_status"]
        assert s["charged"] <= BUDGET
        assert s["charged"] - self.answered <= (self.crashes + 1) * (LEASE - 1)

    def teardown(self) -> None:
        if self.e is not None:
            self.e.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


TestBudgetMachine = BudgetMachine.TestCase
TestBudgetMachine.settings = settings(max_examples=8, stateful_step_count=12, deadline=None,
                                      suppress_health_check=list(HealthCheck))
