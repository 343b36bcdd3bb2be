"""The enclave's persistent state, and the store that seals it and steps the counters.

The state is sealed by the backend and written atomically by :class:`SealedStore`. It holds the
content key, the signed license, the receipt key, and the budget's counters. Every rule about
them (leases, the carried rest, rollback, time and expiry, vouchers, receipts) lives in
:mod:`.ledger`, a pure state machine; the store only carries out its effects.

Three monotonic counters per license: the *main* one (one step per lease; a state behind it was
restored, and is charged one lease per missing step), the *voucher* counter (at the last voucher
redeemed: a restored state never redeems it again) and the *expiry* counter (stepped once, when
the enclave first sees the license expired). On the `software` backend the counters are files the
owner can restore as well, so there they stop only restores of the state file alone; the TPM
backend's NV counters make them hold.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ._util import atomic_write, b64d, b64e
from .backends.base import Backend
from .errors import FormatError, NotProvisionedError, RollbackError

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
    def from_bytes(cls, data: bytes) -> EnclaveState:
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
            # Text that has no UTF-8 (a lone surrogate from JSON "\ud800") escaped later, where a
            # license id is hashed, as UnicodeEncodeError (fuzzing, issue 15).
            json.dumps(d, ensure_ascii=False).encode("utf-8")
            d["content_key"] = b64d(d["content_key"])
            d["receipt_key"] = b64d(d["receipt_key"])
            state = cls(**d)
            # What the ledger and the receipt key use later, checked now (fuzzing, issue 15): a
            # key of another length, or a time that is not an aware ISO 8601 one, escaped from
            # load() as pyca's ValueError or datetime's ValueError / TypeError.
            # As the ledger reads them: last_time when not empty, expires when not None.
            times = [t for t in (state.last_time or None, state.expires) if t is not None]
            if (len(state.content_key) != 32 or len(state.receipt_key) != 32 or not 1 <= state.lease_size <= 1_000_000
                    or any(dt.datetime.fromisoformat(t).tzinfo is None for t in times)):
                raise ValueError("bad key length, lease size or time")  # a lease of 0 divided by zero
            return state
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


@dataclass(frozen=True)
class Counters:
    """The backend's monotonic counters for one license: the main one (absolute), and the voucher
    and expiry counters relative to the license's base."""
    main: int
    vouchers: int
    expiry: int


class SealedStore:
    """The sealed state file and the backend's counters: carries out what the ledger decides
    (:mod:`.ledger`), and decides nothing itself but the two checks that need the counters'
    real values (another session of the license moved them)."""

    def __init__(self, backend: Backend, state_dir: Path, capsule_id: str, version: int) -> None:
        self.backend = backend
        self.path = state_dir / STATE_FILE
        self.label = f"mlcapsule-state/v1\0{capsule_id}\0{version}".encode()
        self.counter_name = f"c-{capsule_id}-v{version}"
        #: The defenses' state (issue 12), sealed in the same file as the license state, so the
        #: counter that protects the budget protects it too: called at every write.
        self.extra: Callable[[], bytes] | None = None
        #: What the last :meth:`load` found beside the license state (b"" if nothing).
        self.loaded_extra = b""

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> EnclaveState:
        """The license state; the defenses' state, if any, goes to :attr:`loaded_extra`. The
        payload is the state's JSON, then (format 2) a NUL and the defenses' blob: JSON text
        never holds a raw NUL."""
        payload = self.backend.unseal(self._read(), label=self.label)
        head, sep, tail = payload.partition(b"\0")
        self.loaded_extra = tail if sep else b""
        return EnclaveState.from_bytes(head)

    def _payload(self, state: EnclaveState) -> bytes:
        extra = self.extra() if self.extra is not None else b""
        return state.to_bytes() + (b"\0" + extra if extra else b"")

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError as e:
            raise NotProvisionedError("this capsule is not set up on this device") from e

    def _write(self, blob: bytes) -> None:
        atomic_write(self.path, blob, mode=0o600)

    @staticmethod
    def license_counter_name(kind: str, state: EnclaveState) -> str:
        """The voucher (``v``) and expiry (``x``) counters belong to one license: a new license
        for the same capsule on the same device (a new setup) starts its own."""
        return f"{kind}-{hashlib.sha256(state.license_id.encode()).hexdigest()[:40]}"

    def bind(self, state: EnclaveState) -> EnclaveState:
        """Record where the license's voucher and expiry counters start (at setup; or at the first
        load of a state sealed before they existed). A new TPM NV counter starts at the highest
        value any counter had, not at 0."""
        if state.voucher_base is None or state.expiry_base is None:
            v = self.backend.counter_read(self.license_counter_name("v", state))
            x = self.backend.counter_read(self.license_counter_name("x", state))
            state = replace(state, voucher_base=v - state.voucher_seq, expiry_base=x - int(state.expired))
        return state

    def counters(self, state: EnclaveState) -> Counters:
        """All three counters (voucher and expiry relative to the license's base)."""
        assert state.voucher_base is not None and state.expiry_base is not None
        return Counters(main=self.counter(),
                        vouchers=self.backend.counter_read(self.license_counter_name("v", state)) - state.voucher_base,
                        expiry=self.backend.counter_read(self.license_counter_name("x", state)) - state.expiry_base)

    def counter(self) -> int:
        return self.backend.counter_read(self.counter_name)

    # -- carrying out the ledger's effects ----------------------------------------------------------
    def apply(self, effects: Iterable[Any]) -> None:
        """Carry out the ledger's effects in order (:class:`.ledger.Persist`, ``CatchUp``,
        ``Refuse``)."""
        for e in effects:
            kind = type(e).__name__
            if kind == "Persist":
                self._persist(e)
            elif kind == "CatchUp":
                self._catch_up(e.state)
            else:
                raise e.error

    def _persist(self, e: Any) -> None:
        """Write the state, bring the voucher and expiry counters up to it, then step the main
        counter. In this order a crash between the steps leaves a state *ahead* of the counters,
        which the next load catches up for free (only the enclave can make such a state); the
        voucher and expiry counters step before the main one, so a kill between the two cannot
        leave a redeemed voucher (or a seen expiry) that a restored state would not notice."""
        state = e.state
        now = self.counter()
        if now != e.expect:
            if e.best_effort:
                return  # a clean close: another session's state stands, this one's rest is lost
            raise RollbackError(
                "another session of this license has used it since this one started",
                hint="run one session per license at a time; start again to continue from the newest state")
        self._write(self.backend.seal(self._payload(state), label=self.label))
        self._bring_up(state, e.vouchers_to, e.expire)
        after = now
        for _ in range(e.steps):
            after = self.backend.counter_increment(self.counter_name)
        if after != state.counter:
            # Another session stepped the counter between our read and our increments: one of
            # the two state files is now behind the counter, and the next load charges it. This
            # session answers nothing more on a lease it cannot prove is its own.
            raise RollbackError("another session of this license is running at the same time",
                                hint="run one session per license at a time; start again")

    def _bring_up(self, state: EnclaveState, vouchers_to: int | None, expire: bool) -> None:
        if vouchers_to is not None:
            name = self.license_counter_name("v", state)
            v = self.backend.counter_read(name)
            while v < vouchers_to:
                v = self.backend.counter_increment(name)
        if expire:
            assert state.expiry_base is not None
            name = self.license_counter_name("x", state)
            if self.backend.counter_read(name) <= state.expiry_base:
                self.backend.counter_increment(name)

    def _catch_up(self, state: EnclaveState) -> None:
        """After a crash between a write and its steps, bring the counters up to the state's."""
        assert state.voucher_base is not None
        self._bring_up(state, state.voucher_base + state.voucher_seq if state.voucher_seq else None, state.expired)
        while self.counter() < state.counter:
            self.backend.counter_increment(self.counter_name)
