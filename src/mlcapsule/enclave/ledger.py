"""The license ledger: every rule of the budget, in one sans-I/O state machine.

After python-tuf's ``TrustedMetadataSet``: this class decides, the caller carries out. Each event
— ``open`` (load, including a restored older state), ``setup``, ``charge``, ``close``,
``voucher``, ``report``, ``ack`` — takes the state, the monotonic counters' values as last read,
and the time, and returns *effects* for :class:`~.state.SealedStore` to carry out in order:

* :class:`Persist` — seal and write a state; bring the voucher and expiry counters up to it;
  then step the main counter from ``expect`` to ``state.counter``. The store refuses
  (``RollbackError``) when the main counter does not stand at ``expect`` before, or does not
  reach ``state.counter`` after: another session of the license moved it;
* :class:`CatchUp` — the loaded state is the newest one: bring the counters up to it (after a
  crash between a write and its counter steps, which charges nothing);
* :class:`Refuse` — raise this error, *after* the effects before it (an expiry is persisted
  before the refusal).

The ledger updates itself as if every effect succeeds; if one fails, the caller poisons it
(:meth:`Ledger.poison`) and every later event is refused, so a lease that was not persisted is
never answered.

The rules, each in one place:

* **Leases** (:func:`lease_for`, :meth:`Ledger.charge`): the budget is charged in leases of
  ``lease_size`` queries, persisted before anything is answered; a batch the budget cannot cover
  in full is refused whole. A crash loses the unanswered rest of a lease (at most N - 1).
* **The carried rest** (:meth:`Ledger.close`): a clean close writes the unanswered rest
  (``carry``) at the counter's current value, without a step; the next session spends it only
  after a step, so restoring that file is a rollback like any other.
* **Rollback** (:func:`reconcile`): a state behind the main counter is charged one lease per
  missing step; behind the voucher counter, its vouchers stay spent; behind the expiry counter,
  it is expired. Each appends a signed ``rollback`` receipt.
* **Time** (:func:`observe_time`): the effective time never goes back past the latest seen;
  expiry is sticky and persisted before the refusal.
* **Vouchers** (:func:`next_voucher_seq`): only ``max(state's, counter's) + 1`` is accepted.
* **Receipts** (:meth:`Ledger._append_lease`): consecutive unreported leases merge into one
  entry; a report ends with a ``report`` entry, so what the server may hold is never rewritten.
* **Acknowledgements** (:meth:`Ledger.ack`): receipts are forgotten only on the provider's
  signed acknowledgement of exactly an entry this enclave holds.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import BudgetExhaustedError, IntegrityError, LicenseExpiredError, MlcapsuleError, RollbackError
from .messages.receipts import Ack, entry_hash, make_entry
from .messages.voucher import Voucher
from .state import Counters, EnclaveState


# -- effects ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Persist:
    state: EnclaveState
    #: The main counter's value before the write (the state is written at ``state.counter``).
    expect: int
    #: The absolute value the voucher counter must reach after the write, if it must move.
    vouchers_to: int | None = None
    #: Step the expiry counter (once) after the write.
    expire: bool = False
    #: A clean close: if another session has moved the license on, write nothing and say nothing.
    best_effort: bool = False

    @property
    def steps(self) -> int:
        return self.state.counter - self.expect


@dataclass(frozen=True)
class CatchUp:
    state: EnclaveState


@dataclass(frozen=True)
class Refuse:
    error: MlcapsuleError


Effect = Persist | CatchUp | Refuse
NOTHING: tuple[Effect, ...] = ()


# -- pure rules ---------------------------------------------------------------------------------------
def lease_for(state: EnclaveState, remaining: int, n: int) -> int:
    """Queries to charge so that a batch of ``n`` can be answered; 0 if the lease covers it.

    Raises BudgetExhaustedError if the budget cannot cover the batch."""
    if n <= remaining:
        return 0
    need = n - remaining
    L = state.lease_size
    charge = -(-need // L) * L
    if state.budget is not None:
        left = state.budget - state.charged
        charge = min(charge, left)
        if charge < need:
            raise BudgetExhaustedError(
                f"the query budget is exhausted ({state.budget} queries; {max(left + remaining, 0)} left, {n} asked)")
    return charge


def observe_time(state: EnclaveState, now: dt.datetime) -> tuple[EnclaveState, dt.datetime, bool]:
    """``(state with the latest time seen, effective time, expired)``, without raising.

    The effective time is never before the last time seen (a clock turned back is not believed).
    Once expired, always expired: ``state.expired`` is sticky."""
    last = dt.datetime.fromisoformat(state.last_time) if state.last_time else None
    effective = now
    if last is not None and now < last:
        effective = last  # the clock went back: do not believe it
    if last is None or effective > last:
        state = replace(state, last_time=effective.isoformat())
    expired = state.expired or (state.expires is not None and effective >= dt.datetime.fromisoformat(state.expires))
    if expired and not state.expired:
        state = replace(state, expired=True)
    return state, effective, expired


def expired_error(state: EnclaveState) -> LicenseExpiredError:
    return LicenseExpiredError(f"the license expired at {state.expires}")


def charge_rollback(state: EnclaveState, counter_now: int) -> EnclaveState:
    """One lease charged for each main-counter step the state is behind (never beyond its budget)."""
    missing = counter_now - state.counter
    if missing <= 0:
        return state
    extra = missing * state.lease_size
    charged = state.charged + extra if state.budget is None else min(state.budget, state.charged + extra)
    return replace(state, charged=charged, answered=charged, counter=counter_now, carry=0,
                   rollbacks_detected=state.rollbacks_detected + 1)


def reconcile(state: EnclaveState, c: Counters) -> tuple[EnclaveState, dict[str, int] | None]:
    """Check a loaded state against the monotonic counters (voucher and expiry relative to the
    license's base). ``(state, None)`` when it is the newest one written (or ahead by an honest
    crash between a write and its steps); else the charged state and what was detected:

    * ``missing_steps``: main-counter steps behind; one lease charged for each (never beyond the
      state's budget: every lease charged after the snapshot was a step, and every voucher
      redeemed after it is bound by the voucher counter, so the restored budget is never above
      the true one);
    * ``vouchers_behind``: vouchers redeemed after the snapshot stay redeemed (``voucher_seq``
      moves up to the counter; their queries are not restored);
    * ``expired``: the license had been seen expired; it stays expired."""
    missing = c.main - state.counter
    vouchers_behind = c.vouchers - state.voucher_seq
    expired_behind = c.expiry > 0 and not state.expired
    if missing <= 0 and vouchers_behind <= 0 and not expired_behind:
        return state, None
    charged_before = state.charged
    if missing > 0:
        state = charge_rollback(state, c.main)
    else:
        state = replace(state, answered=state.charged, carry=0, rollbacks_detected=state.rollbacks_detected + 1)
    if vouchers_behind > 0:
        state = replace(state, voucher_seq=c.vouchers)
    if expired_behind:
        state = replace(state, expired=True)
    return state, {"missing_steps": max(missing, 0), "charged_extra": state.charged - charged_before,
                   "vouchers_behind": max(vouchers_behind, 0), "expired": int(expired_behind)}


def next_voucher_seq(state: EnclaveState, voucher_counter: int) -> int:
    """The only voucher sequence number accepted next: one past both the state's and the voucher
    counter's, so a voucher redeemed on this device is never accepted again, even by a state
    restored from before it was redeemed."""
    return max(state.voucher_seq, voucher_counter) + 1


# -- the ledger ---------------------------------------------------------------------------------------
class Ledger:
    """The budget of one license in one session (see the module docstring)."""

    def __init__(self, state: EnclaveState, counters: Counters) -> None:
        self.state = state
        #: Unanswered queries of the current lease (memory only: a crash loses them).
        self.remaining = 0
        #: Queries carried from the last session's lease (clean close), usable after a step.
        self.carried = 0
        #: The latest time seen by queries that persisted nothing (the fast path).
        self.floor: dt.datetime | None = None
        self.expiry = dt.datetime.fromisoformat(state.expires) if state.expires else None
        self._expected = counters.main  # the main counter's value our state stands at
        self._saved_charged = state.charged
        self._vouchers = counters.vouchers  # the voucher counter (relative), as known
        self._expired_counter = counters.expiry > 0
        self._poison: MlcapsuleError | None = None

    # -- events that start a session ----------------------------------------------------------------
    @classmethod
    def open(cls, state: EnclaveState, counters: Counters) -> tuple[Ledger, tuple[Effect, ...]]:
        """A sealed state loaded from disk: the newest one, or a restored older copy."""
        state, rollback = reconcile(state, counters)
        led = cls(state, counters)
        if rollback is not None:
            led._expected, led._saved_charged = counters.main, state.charged  # charged already covered
            effects: tuple[Effect, ...] = (led._persist(led._append(state, "rollback", rollback)),)
        else:
            led._expected = state.counter
            led._vouchers = max(counters.vouchers, state.voucher_seq)
            led._expired_counter = led._expired_counter or state.expired
            effects = (CatchUp(state),)
        # Queries of a lease cut short by a crash count as answered: they were paid for. After a
        # clean close the state carries the rest of its lease.
        led.state = replace(led.state, answered=led.state.charged - led.state.carry)
        led.carried = led.state.carry
        return led, effects

    @classmethod
    def setup(cls, state: EnclaveState, counters: Counters, now: dt.datetime,
              measurement: str) -> tuple[Ledger, tuple[Effect, ...]]:
        """A fresh license (its counters' bases recorded in ``state``)."""
        state, _, expired = observe_time(replace(state, counter=counters.main), now)
        if expired:
            raise expired_error(state)
        led = cls(state, counters)
        return led, (led._persist(led._append(state, "setup", {"measurement": measurement})),)

    # -- events of a session ------------------------------------------------------------------------
    def charge(self, n: int, now: dt.datetime) -> tuple[Effect, ...]:
        """Queries about to be answered: charged first (a new lease is persisted before)."""
        floor = self.floor
        if n <= self.remaining and floor is not None:
            t = now if now >= floor else floor  # the clock went back: do not believe it
            if self.expiry is None or t < self.expiry:
                self.floor = t
                self.remaining -= n
                return NOTHING
        if self._poison is not None:
            return (Refuse(self._poison),)
        state, effective, expired = observe_time(self._current(), now if floor is None or now > floor else floor)
        self.floor = effective
        effects: list[Effect] = []
        if expired:
            # Persisted (sticky, and stepped into the expiry counter) *before* the refusal: a clock
            # turned back later, or a restored older state, cannot revive the license. The rest
            # of the lease is forfeit with it.
            if not self.state.expired:
                carry, self.remaining, self.carried = self.remaining + self.carried, 0, 0
                effects.append(self._persist(replace(state, answered=state.charged - carry, carry=0)))
            return (*effects, Refuse(expired_error(state)))
        if self.carried:
            # The rest of the last session's lease: usable once the counter has stepped past the
            # file that carried it (restoring that file is then a rollback, charged).
            effects.append(self._persist(replace(state, carry=0)))
            state = self.state
            self.remaining, self.carried = self.remaining + self.carried, 0
        try:
            extra = lease_for(state, self.remaining, n)
        except BudgetExhaustedError as e:
            self.state = state
            return (*effects, Refuse(e))
        if extra:
            state = replace(state, charged=state.charged + extra)
            state = replace(state, answered=state.charged - self.remaining - extra)
            effects.append(self._persist(self._append_lease(state, extra)))
            self.remaining += extra
        else:
            self.state = state
        self.remaining -= n
        return tuple(effects)

    def close(self, *, force: bool = False) -> tuple[Effect, ...]:
        """A clean close: keep the unanswered rest of the lease, and the latest time seen.
        ``force``: write even if neither changed (the defenses' state did, and is sealed with it)."""
        if self._poison is not None:
            return NOTHING
        state, floor = self.state, self.floor
        later = floor is not None and (not state.last_time or floor > dt.datetime.fromisoformat(state.last_time))
        if not (self.remaining or self.carried or later or force):
            return NOTHING
        carry = self.remaining + self.carried
        self.remaining = self.carried = 0
        state = self._current()
        return (self._persist(replace(state, answered=state.charged - carry, carry=carry), steps=0,
                              best_effort=True),)

    def voucher(self, v: Voucher) -> tuple[Effect, ...]:
        """A provider-signed top-up (its signature and addressee already verified)."""
        return self._redeem(v.seq, v.queries, "voucher", {"seq": v.seq, "queries": v.queries})

    def unlock(self, seq: int, data: dict[str, Any]) -> tuple[Effect, ...]:
        """A provider-signed unlock voucher for the defenses (verified by the caller). Unlock
        vouchers are numbered in the same sequence as top-ups, so the voucher counter that keeps
        a top-up from being redeemed twice keeps an unlock from being replayed after a restore."""
        return self._redeem(seq, 0, "unlock", {"seq": seq, **data})

    def record(self, kind: str, data: dict[str, Any]) -> tuple[Effect, ...]:
        """A receipt entry the provider must see (a defense alarm, queries whose defense updates
        were lost), persisted with a counter step before the enclave answers: restoring the
        state from before it is a detected rollback, so the entry cannot be made to vanish."""
        if self._poison is not None:
            return (Refuse(self._poison),)
        state = replace(self._current(), answered=self.answered)
        return (self._persist(self._append(state, kind, data), steps=1),)

    def _redeem(self, seq: int, queries: int, kind: str, data: dict[str, Any]) -> tuple[Effect, ...]:
        if self._poison is not None:
            return (Refuse(self._poison),)
        state = self._current()
        expected = next_voucher_seq(state, self._vouchers)
        if seq < expected:
            return (Refuse(RollbackError(f"voucher {seq} was already redeemed on this device",
                                         hint="a voucher can be redeemed once; ask the provider for a new one")),)
        if seq != expected:
            return (Refuse(RollbackError(f"voucher {seq} is out of order: the next one must be number {expected}",
                                         hint="a voucher can be redeemed once, and in order")),)
        budget = None if state.budget is None else state.budget + queries
        state = replace(state, budget=budget, voucher_seq=seq, answered=self.answered)
        return (self._persist(self._append(state, kind, data)),)

    def report(self) -> tuple[list[dict[str, Any]], tuple[Effect, ...]]:
        """The receipts not yet acknowledged, ending with a fresh ``report`` entry."""
        if self._poison is not None:
            return [], (Refuse(self._poison),)
        state = self._append(replace(self._current(), answered=self.answered), "report", {})
        effects = (self._persist(state),)
        return self.state.receipts, effects

    def ack(self, ack: Ack) -> tuple[Effect, ...]:
        """The provider's signed acknowledgement (signature and addressee already verified):
        forget the receipts up to the acknowledged entry, which must be one this enclave holds."""
        if self._poison is not None:
            return (Refuse(self._poison),)
        state = self.state
        pending = state.receipts
        first = int(pending[0]["body"]["seq"]) if pending else state.head_seq + 1
        if ack.seq < first:
            return NOTHING  # already forgotten (a repeated acknowledgement)
        match = next((r for r in pending if r["body"]["seq"] == ack.seq), None)
        if match is None or entry_hash(match) != ack.hash:
            return (Refuse(IntegrityError("the usage acknowledgement names receipts this enclave did not send",
                                          hint="sync again")),)
        kept = [r for r in pending if r["body"]["seq"] > ack.seq]
        return (self._persist(replace(self._current(), receipts=kept)),)

    def poison(self, error: MlcapsuleError) -> None:
        """An effect failed: this session answers nothing more."""
        self._poison = error if isinstance(error, RollbackError) else RollbackError(
            "the license state could not be saved", hint="start again")
        self.remaining = self.carried = 0

    # -- views ---------------------------------------------------------------------------------------
    @property
    def answered(self) -> int:
        return self.state.charged - self.remaining - self.carried

    def status(self, rollback_protected: bool) -> dict[str, Any]:
        s = self.state
        return {
            "license_id": s.license_id, "device_id": s.device_id,
            "budget": s.budget, "charged": s.charged, "answered": self.answered,
            "remaining": None if s.budget is None else s.budget - self.answered,
            "lease_size": s.lease_size, "expires": s.expires, "expired": s.expired,
            "vouchers_redeemed": s.voucher_seq, "receipts_pending": len(s.receipts),
            "rollbacks_detected": s.rollbacks_detected, "rollback_protected": rollback_protected,
        }

    # -- internals ------------------------------------------------------------------------------------
    def _current(self) -> EnclaveState:
        """The state with the latest time the fast path saw."""
        floor, state = self.floor, self.state
        if floor is not None and (not state.last_time or floor > dt.datetime.fromisoformat(state.last_time)):
            state = replace(state, last_time=floor.isoformat())
        return state

    def _persist(self, state: EnclaveState, *, steps: int | None = None, best_effort: bool = False) -> Persist:
        """The effect that writes ``state``; the ledger moves on as if it succeeds.

        Steps: one per lease charged since the last persist (at least one), so that the rollback
        rule charges back *every* lease spent after a restored snapshot, even when one batch
        took several leases; none for a clean close."""
        if steps is None:
            steps = 1
            if state.charged > self._saved_charged:
                steps = max(1, -(-(state.charged - self._saved_charged) // state.lease_size))
        expect = self._expected
        state = replace(state, counter=expect + steps)
        vouchers_to = None
        if state.voucher_seq > self._vouchers:
            assert state.voucher_base is not None
            vouchers_to, self._vouchers = state.voucher_base + state.voucher_seq, state.voucher_seq
        expire = state.expired and not self._expired_counter
        self._expired_counter = self._expired_counter or expire
        self._expected, self._saved_charged, self.state = state.counter, state.charged, state
        return Persist(state, expect, vouchers_to, expire, best_effort)

    def _append_lease(self, state: EnclaveState, queries: int) -> EnclaveState:
        """A lease receipt; if the last pending receipt is a lease too, it is replaced by one that
        covers both (same seq and link, the new cumulative counters), so a device offline for a
        long time keeps one receipt per run of leases. That entry cannot have reached the server:
        a report always ends with a 'report' entry, so a reported lease is never the last one."""
        last = state.receipts[-1]["body"] if state.receipts else None
        if last is None or last["kind"] != "lease" or set(last["data"]) != {"queries", "leases"}:
            return self._append(state, "lease", {"queries": queries, "leases": 1})
        key = Ed25519PrivateKey.from_private_bytes(state.receipt_key)
        entry = make_entry(key, seq=last["seq"], prev=last["prev"], kind="lease", license_id=state.license_id,
                           time=state.last_time, charged=state.charged, answered=min(state.answered, state.charged),
                           data={"queries": last["data"]["queries"] + queries, "leases": last["data"]["leases"] + 1})
        return replace(state, receipts=state.receipts[:-1] + [entry], head_hash=entry_hash(entry))

    @staticmethod
    def _append(state: EnclaveState, kind: str, data: dict[str, Any]) -> EnclaveState:
        key = Ed25519PrivateKey.from_private_bytes(state.receipt_key)
        seq = state.head_seq + 1
        entry = make_entry(key, seq=seq, prev=state.head_hash, kind=kind, license_id=state.license_id,
                           time=state.last_time, charged=state.charged, answered=min(state.answered, state.charged),
                           data=data)
        return replace(state, receipts=state.receipts + [entry], head_seq=seq, head_hash=entry_hash(entry))
