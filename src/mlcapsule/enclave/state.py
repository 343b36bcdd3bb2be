"""The enclave's persistent state and the budget arithmetic, as pure code.

The state is sealed by the backend and written atomically by :class:`SealedStore`. It holds the
content key, the signed license, the receipt key, and the counters below.

Budget with leases (DESIGN §7). Persisting per query would put an fsync on every answer, so
the enclave charges the budget in *leases* of ``lease_size`` queries:

* ``charged``  queries paid for so far; persisted *before* any of them is answered;
* ``remaining`` (memory only) queries of the current lease not yet answered.

A query batch of ``n`` needs ``n <= remaining``; otherwise a new lease of
``ceil((n - remaining) / L) * L`` queries (capped by the budget) is charged and persisted first.
A crash forgets ``remaining``: at most ``L - 1`` queries the client paid for are lost, and none
is ever given away. ``answered <= charged`` always holds.

Rollback: each persist increments the backend's monotonic counter and records its value. A
state whose recorded value is below the counter is older than the newest one: every lease that
may have been spent since then is charged again (``missing * L``), so restoring old state never
buys queries. On the `software` backend the counter is a file the owner can restore as well,
so there this check stops only careless rollbacks; the TPM backend makes it hold.

Two more monotonic counters bind what a lease count cannot (red-team finding: a restored state
used to accept the same voucher again, and an expired license revived with the clock turned
back):

* the *voucher* counter stands at the last voucher sequence number redeemed: a state whose
  ``voucher_seq`` is behind it was restored, and no voucher at or below the counter is ever
  accepted again;
* the *expiry* counter is stepped once, when the enclave first sees the license expired: a
  restored state from before that is still expired.

Every persist writes the sealed file first and then brings the voucher and expiry counters up
to the state's values, and only then steps the main counter (:meth:`SealedStore.save`). A crash
after the write leaves a state *ahead* of the counters, which the next load catches up; a
state restored from before the write is behind whichever counter was stepped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .._util import atomic_write, b64d, b64e
from ..errors import BudgetExhaustedError, FormatError, LicenseExpiredError, NotProvisionedError, RollbackError
from .backends.base import Backend

STATE_FORMAT = "mlcapsule-enclave-state/v1"
STATE_FILE = "state.sealed"


@dataclass(frozen=True)
class EnclaveState:
    capsule_id: str
    version: int
    content_key: bytes
    license: dict[str, Any]  # the signed envelope, as received
    license_id: str
    device_id: str
    receipt_key: bytes  # Ed25519 private key, raw 32 bytes
    budget: int | None  # license budget plus redeemed vouchers; None = unlimited
    expires: str | None
    lease_size: int
    charged: int = 0
    answered: int = 0
    voucher_seq: int = 0
    last_time: str = ""  # the latest wall-clock time seen (ISO 8601, UTC)
    counter: int = 0  # backend monotonic counter value at the last persist
    receipts: list[dict[str, Any]] = field(default_factory=list)  # not yet uploaded
    head_seq: int = 0
    head_hash: str = "0" * 64
    rollbacks_detected: int = 0
    #: Unanswered queries of the last lease, written at a clean close (:meth:`SealedStore.
    #: save_in_place`); the next session may answer them after one counter step.
    carry: int = 0
    #: Sticky: the enclave saw the license expired (also recorded by the expiry counter).
    expired: bool = False
    #: The voucher and expiry counters' values when this license was set up (a new TPM NV
    #: counter starts at the highest value any counter had, not at 0); None in a state sealed
    #: before these counters existed, bound at its next load.
    voucher_base: int | None = None
    expiry_base: int | None = None

    def to_bytes(self) -> bytes:
        d = self.__dict__.copy()
        d["content_key"] = b64e(self.content_key)
        d["receipt_key"] = b64e(self.receipt_key)
        d["format"] = STATE_FORMAT
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "EnclaveState":
        """Parse a state; anything malformed raises FormatError. Every field's JSON type is
        checked against this class's annotations before it is used: fields of the wrong type
        used to escape as AttributeError or TypeError (red team, issue 9)."""
        import dataclasses

        def type_ok(annotation: str, v: Any) -> bool:
            base = annotation.removesuffix(" | None")
            if v is None:
                return base != annotation
            if base == "int":
                return type(v) is int  # not bool
            if base == "bool":
                return type(v) is bool
            if base in ("str", "bytes"):  # bytes travel as base64 text
                return isinstance(v, str)
            if base.startswith("dict["):
                return isinstance(v, dict)
            if base.startswith("list[dict["):
                return isinstance(v, list) and all(isinstance(x, dict) for x in v)
            # A field added with a type this check does not know: a programming error, loudly.
            raise TypeError(f"EnclaveState.from_bytes cannot check a field of type {annotation}")

        try:
            d = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise FormatError("the sealed state is malformed") from e
        fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        if (not isinstance(d, dict) or d.get("format") != STATE_FORMAT
                or not all(k in fields and type_ok(fields[k], v) for k, v in d.items() if k != "format")):
            raise FormatError("the sealed state is malformed")
        d = {k: v for k, v in d.items() if k != "format"}
        try:
            d["content_key"] = b64d(d["content_key"])
            d["receipt_key"] = b64d(d["receipt_key"])
            return cls(**d)
        except (ValueError, KeyError, TypeError) as e:  # not base64, or a required field missing
            raise FormatError("the sealed state is malformed") from e

    def receipt_key_public(self) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        key = Ed25519PrivateKey.from_private_bytes(self.receipt_key)
        return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def remaining_budget(self) -> int | None:
        return None if self.budget is None else self.budget - self.charged


def lease_for(state: EnclaveState, remaining: int, n: int) -> int:
    """Queries to charge so that a batch of ``n`` can be answered; 0 if the lease covers it.

    Raises BudgetExhaustedError if the budget cannot cover the batch.
    """
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


def check_time(state: EnclaveState, now: dt.datetime) -> tuple[EnclaveState, dt.datetime]:
    """The effective time (never before the last time seen) and the license's expiry check.

    Raises LicenseExpiredError when the state is expired; use :func:`observe_time` where the
    observation must be persisted before the refusal."""
    state, effective, expired = observe_time(state, now)
    if expired:
        raise expired_error(state)
    return state, effective


def observe_time(state: EnclaveState, now: dt.datetime) -> tuple[EnclaveState, dt.datetime, bool]:
    """``(state with the latest time seen, effective time, expired)``, without raising.

    The effective time is never before the last time seen (a clock turned back is not believed).
    Once expired, always expired: ``state.expired`` is sticky, so the caller persists the state
    *before* it refuses, and a clock turned back later cannot revive the license."""
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
    """Apply the anti-rollback rule for a state whose recorded counter is behind the backend's."""
    missing = counter_now - state.counter
    if missing <= 0:
        return state
    extra = missing * state.lease_size
    charged = state.charged + extra if state.budget is None else min(state.budget, state.charged + extra)
    return replace(state, charged=charged, answered=charged, counter=counter_now, carry=0,
                   rollbacks_detected=state.rollbacks_detected + 1)


@dataclass(frozen=True)
class Counters:
    """The backend's monotonic counters for one license: leases (main), vouchers, expiry."""
    main: int
    vouchers: int
    expiry: int


def reconcile(state: EnclaveState, c: Counters) -> tuple[EnclaveState, dict[str, int] | None]:
    """Check a loaded state against the monotonic counters.

    Returns ``(state, rollback)``: ``rollback`` is None when the state is the newest one written
    (or ahead of the counters by an honest crash between write and increment, which the store
    catches up), else what was detected, for the receipt the provider will see:

    * ``missing_steps``: main-counter steps the state is behind; one lease is charged for each
      (never beyond the state's budget: every lease charged after the snapshot was one step, and
      every voucher redeemed after it is bound by the voucher counter, so the restored budget is
      never above the true one);
    * ``vouchers_behind``: vouchers redeemed after the snapshot; they stay redeemed (the state's
      ``voucher_seq`` moves up to the counter, their queries are not restored);
    * ``expired``: the license had been seen expired; it stays expired.
    """
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
    """The only voucher sequence number the enclave accepts next: one past both the state's and
    the voucher counter's, so a voucher redeemed on this device is never accepted again, even by
    a state restored from before it was redeemed."""
    return max(state.voucher_seq, voucher_counter) + 1


class SealedStore:
    """The sealed state file in the host's state directory (the host stores it, cannot read it)."""

    def __init__(self, backend: Backend, state_dir: Path, capsule_id: str, version: int) -> None:
        self.backend = backend
        self.path = state_dir / STATE_FILE
        self.label = f"mlcapsule-state/v1\0{capsule_id}\0{version}".encode()
        self.counter_name = f"c-{capsule_id}-v{version}"
        self._saved_charged: int | None = None  # `charged` of the state last loaded or saved
        #: The counter value this session's state stands at (set once the state was checked
        #: against the counter at load); a save finding another value means another session
        #: of the same license has moved on (see :meth:`save`).
        self._expected: int | None = None
        #: The voucher and expiry counters' values as last read or stepped by this session, so
        #: a save that changes neither costs no extra counter read.
        self._vouchers: int | None = None
        self._expiry: int | None = None

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> EnclaveState:
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError as e:
            raise NotProvisionedError("this capsule is not set up on this device") from e
        state = EnclaveState.from_bytes(self.backend.unseal(blob, label=self.label))
        self._saved_charged = state.charged
        return state

    @staticmethod
    def license_counter_name(kind: str, state: EnclaveState) -> str:
        """The voucher (``v``) and expiry (``x``) counters belong to one license: a new license
        for the same capsule on the same device (a new setup) starts its own."""
        return f"{kind}-{hashlib.sha256(state.license_id.encode()).hexdigest()[:40]}"

    def bind(self, state: EnclaveState) -> EnclaveState:
        """Record where the license's voucher and expiry counters start (at setup; or at the
        first load of a state sealed before they existed)."""
        if state.voucher_base is None or state.expiry_base is None:
            v = self.backend.counter_read(self.license_counter_name("v", state))
            x = self.backend.counter_read(self.license_counter_name("x", state))
            state = replace(state, voucher_base=v - state.voucher_seq, expiry_base=x - int(state.expired))
        return state

    def counters(self, state: EnclaveState) -> Counters:
        """Read all three counters (at load); voucher and expiry relative to the license's base."""
        assert state.voucher_base is not None and state.expiry_base is not None
        c = Counters(main=self.backend.counter_read(self.counter_name),
                     vouchers=self.backend.counter_read(self.license_counter_name("v", state)) - state.voucher_base,
                     expiry=self.backend.counter_read(self.license_counter_name("x", state)) - state.expiry_base)
        self._vouchers, self._expiry = c.vouchers, c.expiry
        return c

    def voucher_counter(self, state: EnclaveState) -> int:
        """Vouchers redeemed by this license, by its counter."""
        if self._vouchers is None:
            assert state.voucher_base is not None
            self._vouchers = self.backend.counter_read(self.license_counter_name("v", state)) - state.voucher_base
        return self._vouchers

    def rebase(self, state: EnclaveState) -> None:
        """Count ``state.charged`` as already covered by counter steps (after a rollback charge)."""
        self._saved_charged = state.charged
        self._expected = state.counter

    def _check_current(self) -> int:
        """The counter's value, which must be the one this session's state stands at."""
        now = self.backend.counter_read(self.counter_name)
        if self._expected is not None and now != self._expected:
            raise RollbackError(
                "another session of this license has used it since this one started",
                hint="run one session per license at a time; start again to continue from the newest state")
        return now

    def _bring_up(self, state: EnclaveState) -> None:
        """Step the voucher and expiry counters up to what ``state`` records (after its write)."""
        if state.voucher_seq and (self._vouchers is None or self._vouchers < state.voucher_seq):
            assert state.voucher_base is not None
            name = self.license_counter_name("v", state)
            v = self.backend.counter_read(name) - state.voucher_base
            while v < state.voucher_seq:
                v = self.backend.counter_increment(name) - state.voucher_base
            self._vouchers = v
        if state.expired and not self._expiry:
            assert state.expiry_base is not None
            name = self.license_counter_name("x", state)
            x = self.backend.counter_read(name) - state.expiry_base
            if x <= 0:
                x = self.backend.counter_increment(name) - state.expiry_base
            self._expiry = x

    def save(self, state: EnclaveState) -> EnclaveState:
        """Seal and write ``state`` with counter value c+k, bring the voucher and expiry counters
        up to it, then advance the main counter k times.

        k is the number of leases charged since the last save (at least 1), so that the rollback
        rule — one lease charged per missing counter step — charges back *every* lease spent
        after a restored snapshot, even when one batch took several leases. Wear stays at one
        increment per lease of N queries (plus one per voucher, and one when the license is
        first seen expired).

        In this order a crash between the steps leaves a state *ahead* of the counters, which
        :meth:`catch_up` repairs at the next load, and charges nothing: only the enclave can make
        such a state. The other order would charge a whole lease for an honest crash. The
        voucher and expiry counters step before the main one, so a kill between the two cannot
        leave a redeemed voucher (or a seen expiry) that a restored state would not notice.
        """
        steps = 1
        if self._saved_charged is not None and state.charged > self._saved_charged:
            steps = max(1, -(-(state.charged - self._saved_charged) // state.lease_size))
        now = self._check_current()
        state = replace(state, counter=now + steps)
        atomic_write(self.path, self.backend.seal(state.to_bytes(), label=self.label), mode=0o600)
        self._bring_up(state)
        for _ in range(steps):
            after = self.backend.counter_increment(self.counter_name)
        self._saved_charged = state.charged
        self._expected = state.counter
        if after != state.counter:
            # Another session stepped the counter between our read and our increments: one of
            # the two state files is now behind the counter, and the next load charges it. This
            # session answers nothing more on a lease it cannot prove is its own.
            raise RollbackError("another session of this license is running at the same time",
                                hint="run one session per license at a time; start again")
        return state

    def save_in_place(self, state: EnclaveState) -> EnclaveState:
        """Seal and write ``state`` at the counter's current value, without a step: for a clean
        close that keeps the unanswered rest of a lease (``carry``). The file then equals the
        last one written in what it can be used for, and the carry is spent only after the next
        session has stepped the counter (:meth:`save`), so restoring this file afterwards is a
        rollback like any other."""
        state = replace(state, counter=self._check_current())
        atomic_write(self.path, self.backend.seal(state.to_bytes(), label=self.label), mode=0o600)
        self._saved_charged = state.charged
        return state

    def counter(self) -> int:
        return self.backend.counter_read(self.counter_name)

    def catch_up(self, state: EnclaveState) -> None:
        """After a crash between write and increments, bring the counters up to the state's."""
        self._bring_up(state)
        while self.counter() < state.counter:
            self.backend.counter_increment(self.counter_name)
        self._expected = state.counter
