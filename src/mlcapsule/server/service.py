"""The provider server's transactional logic, separate from HTTP.

:class:`ProviderService` holds the rules; :mod:`.app` only maps HTTP to these methods and
:mod:`mlcapsule.cli.admin` calls the administrative ones. Time is injected (``clock``) so tests
can expire nonces and grants without sleeping. Trust decisions on evidence and receipts are the
pure functions of :mod:`mlcapsule.attestation` and :mod:`mlcapsule.enclave.messages.receipts`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import secrets
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from sqlalchemy import CursorResult, delete, exc as sa_exc, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from ..attestation import AttestationPolicy, EvidenceVerifier
from ..enclave._util import b64d, canonical_json
from ..enclave.crypto.keys import ContentKey, ed25519_public_from_raw, raw_public
from ..enclave.errors import FormatError, IntegrityError, SignatureError, UsageError
from ..enclave.messages.license import License
from ..enclave.messages.receipts import GENESIS, ChainHead, alarm_records, entry_hash, gap_record, verify_chain
from ..enclave.messages.setup import NONCE_LEN, report_data, seal_payload
from ..enclave.messages.unlock import Unlock
from ..enclave.messages.voucher import Voucher as VoucherMsg
from .db import Account, AlarmRecord, Capsule, Device, Grant, Nonce, Voucher
from .errors import (
    ChainConflict,
    DeviceLimitReached,
    GrantExpired,
    GrantRefused,
    Misconfigured,
    NonceExpired,
    NonceRefused,
    NonceReplayed,
    TooManyChallenges,
    Unauthorized,
    Unavailable,
    UnknownCapsule,
    UnknownLicense,
)

log = logging.getLogger("mlcapsule.server")

Clock = Callable[[], dt.datetime]
TOKEN_PREFIX = "mlc_"
NONCE_RETENTION = dt.timedelta(days=1)  # expired nonces are deleted after this
NONCE_SWEEP_EVERY = dt.timedelta(seconds=60)  # how often a process deletes them (from a challenge)
#: Unused, unexpired challenges one account may hold at once, by default: a bound on what
#: /v1/challenge can make the database store (ServerSettings.max_open_challenges).
MAX_OPEN_CHALLENGES = 1000
_ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_token() -> str:
    """A random bearer token (256 bits). Shown once; only its hash is stored."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def provision_fingerprint(account_id: int, capsule_id: uuid.UUID, version: int, nonce: bytes, hpke_pub: bytes,
                          receipt_pub: bytes, evidence: Any) -> str:
    """The SHA-256 (hex) of a provisioning request: the account, the capsule, the challenge, both
    enclave keys and the evidence (canonical JSON). A used challenge is bound to it: only a
    request with the same fingerprint (the client retrying after a lost answer) may use the
    challenge again, and it gets the stored answer (see :meth:`ProviderService.provision`)."""
    try:
        ev = canonical_json(evidence)
    except (TypeError, ValueError) as e:
        raise FormatError("the evidence is not a JSON object") from e
    h = hashlib.sha256(b"mlcapsule/provision-request/v1\0")
    for part in (str(account_id).encode(), str(capsule_id).encode(), str(version).encode(), nonce, hpke_pub,
                 receipt_pub, ev):
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()


# -- fault injection (crash tests) ------------------------------------------------------------
#: The points where the crash tests (tests/test_server_crash.py) make the server process kill
#: itself with SIGKILL: a provisioning after its evidence is verified, after the device row is
#: inserted (not committed), after the commit, and before the answer is returned; an upload
#: likewise (after the chain is verified, after the head is updated, after the commit, before
#: the answer).
CRASH_POINTS = frozenset({"provision.after_verify", "provision.after_insert", "provision.after_commit",
                          "provision.before_response", "usage.after_verify", "usage.after_update",
                          "usage.after_commit", "usage.before_response"})
#: Set in the *server process's* environment only (nothing a client sends reaches it); read once,
#: when the service is built. Unset, a crash point costs one comparison with None.
CRASH_ENV = "MLCAPSULE_SERVER_CRASH_AT"
#: Optional: a file path; the first process to create it crashes, later ones (a restarted
#: worker) do not.
CRASH_ONCE_ENV = "MLCAPSULE_SERVER_CRASH_ONCE"


def _crash_point_from_env() -> str | None:
    point = os.environ.get(CRASH_ENV) or None
    if point is not None and point not in CRASH_POINTS:
        raise Misconfigured(f"{CRASH_ENV}={point[:64]!r} is not a crash point",
                            hint=f"unset it (it is for crash tests); points: {', '.join(sorted(CRASH_POINTS))}")
    return point


@dataclass(frozen=True)
class AccountRef:
    id: int
    name: str


@dataclass(frozen=True)
class Challenge:
    nonce: bytes
    expires_at: dt.datetime


@dataclass(frozen=True)
class Provisioned:
    license_id: str
    device_id: str
    payload: bytes  # seal_payload(hpke_pub, nonce, content_key, license_envelope), gated for tpm
    credential: dict[str, str] | None = None  # tpm: the credential that opens the gated payload
    replayed: bool = False  # the stored answer of an identical earlier request (a client retry)


def drop_already_accepted(entries: Any, head: ChainHead) -> Any:
    """Drop a leading run of receipts the server already holds, so a retried upload succeeds.

    The enclave forgets receipts only when the server acknowledges them, so after a lost
    response it sends them again. A leading run is dropped only if it is a linked chain whose
    last entry has exactly ``head.seq`` and hashes to ``head.hash``: then it *is* the chain the
    server accepted, and ignoring it changes nothing. Anything else is returned unchanged for
    :func:`verify_chain` to refuse.
    """
    if not isinstance(entries, list) or not entries or head.seq == 0:
        return entries
    try:
        seqs = [int(e["body"]["seq"]) for e in entries]
    except (KeyError, TypeError, ValueError):
        return entries
    k = 0
    while k < len(seqs) and seqs[k] <= head.seq:
        k += 1
    if k == 0:
        return entries
    if seqs[k - 1] != head.seq or entry_hash(entries[k - 1]) != head.hash:
        return entries
    for j in range(k - 1):
        if seqs[j] + 1 != seqs[j + 1] or entries[j + 1]["body"].get("prev") != entry_hash(entries[j]):
            return entries
    return entries[k:]


def verify_fork(entries: Any, key: Any, *, license_id: str, head: ChainHead) -> ChainHead | None:
    """The head of ``entries`` if they are a chain signed by the device's receipt key that forks
    from the stored one (``head``); None if they are not.

    An enclave never signs two different entries with one sequence number on a chain the server
    has seen, so a validly signed branch comes from an enclave that ran from an older copy of its
    state. It is accepted as a fork when it reaches past the stored head, or when it carries the
    ``rollback`` receipt that such an enclave writes: otherwise a replay of old entries could
    rewind the stored head.
    """
    if not isinstance(entries, list) or not entries:
        return None
    try:
        first = entries[0]["body"]
        start = ChainHead(int(first["seq"]) - 1, str(first["prev"]), 0, 0)
    except (KeyError, TypeError, ValueError):
        return None
    if start.seq < 0 or start.seq > head.seq:
        return None  # a gap after the stored head is not a fork
    try:
        branch = verify_chain(entries, key, license_id=license_id, head=start)
    except (IntegrityError, FormatError):
        return None
    if branch.seq <= head.seq and not any(e["body"]["kind"] == "rollback" for e in entries):
        return None
    return branch


@dataclass
class _DefenseReports:
    """What an upload's ``alarm`` and ``defense-gap`` receipts report (see :func:`_defense_reports`)."""

    alarms: list[dict[str, Any]]  # AlarmRecord columns, without device_pk and received
    summary: dict[str, Any] | None  # the defense counters of the last alarm or defense receipt
    gaps: int
    gap_queries: int


#: The largest defense summary (canonical JSON bytes) stored per device.
MAX_DEFENSE_SUMMARY = 16 * 1024


def _defense_reports(entries: list[dict[str, Any]]) -> _DefenseReports:
    """The alarms and defense gaps in receipts already verified (signed, linked, of this license).
    A malformed ``data`` is refused with FormatError (HTTP 422), naming the receipt: the server
    never stores half of an upload."""
    from ..enclave._util import canonical_json

    out = _DefenseReports([], None, 0, 0)
    for e in entries:
        body = e["body"]
        kind, seq = body["kind"], body["seq"]
        try:
            if kind == "alarm":
                alarms, summary = alarm_records(body["data"])
                if len(canonical_json(summary)) > MAX_DEFENSE_SUMMARY:
                    raise FormatError(f"its defense summary is larger than {MAX_DEFENSE_SUMMARY} bytes")
            elif kind == "defense-gap":
                queries, _reason = gap_record(body["data"])
            elif kind == "defense":  # the counters after an unlock
                summary = body["data"]
                if len(canonical_json(summary)) > MAX_DEFENSE_SUMMARY:
                    raise FormatError(f"its defense summary is larger than {MAX_DEFENSE_SUMMARY} bytes")
                out.summary = summary
                continue
            else:
                continue
        except (FormatError, TypeError, ValueError) as ex:
            what = ex.message if isinstance(ex, FormatError) else "its data does not encode"
            raise FormatError(f"usage receipts refused: receipt {seq} ({kind}) is malformed: {what}",
                              hint="the enclave that signed it is faulty or of an incompatible version; "
                                   "upgrade mlcapsule on the device, or tell the provider") from None
        if kind == "alarm":
            h = entry_hash(e)
            out.summary = summary
            out.alarms.extend({"receipt_seq": seq, "receipt_hash": h, "position": i, "signed_time": body["time"][:64],
                               **a} for i, a in enumerate(alarms))
        else:
            out.gaps += 1
            out.gap_queries += queries
    return out


class ProviderService:
    """Accounts, capsules, grants, challenges, provisioning, usage and vouchers.

    ``provider_key`` signs licenses and vouchers; it may be None for administrative use that
    signs nothing. ``verifier`` (an :class:`~mlcapsule.attestation.EvidenceVerifier`, built by
    ``create_app`` from the server's settings) decides which enclave evidence is accepted;
    ``policy`` alone builds one with the default verifiers.
    """

    def __init__(self, sessions: sessionmaker[Session], *, policy: AttestationPolicy | None = None,
                 verifier: EvidenceVerifier | None = None,
                 provider_key: Ed25519PrivateKey | None = None, nonce_ttl_seconds: int = 120,
                 max_open_challenges: int = MAX_OPEN_CHALLENGES, clock: Clock = utcnow) -> None:
        if (policy is None) == (verifier is None):
            raise TypeError("give exactly one of policy and verifier")
        self.sessions = sessions
        self.verifier = verifier if verifier is not None else EvidenceVerifier(policy)  # type: ignore[arg-type]
        self.policy = self.verifier.policy
        self.provider_key = provider_key
        self.nonce_ttl = dt.timedelta(seconds=nonce_ttl_seconds)
        self.max_open_challenges = max_open_challenges
        self.clock = clock
        self._swept: dt.datetime | None = None  # when this process last deleted old nonces
        self._crash_at = _crash_point_from_env()
        if self._crash_at is not None:
            log.warning("FAULT INJECTION: this server process kills itself at %s (%s is set)", self._crash_at,
                        CRASH_ENV)

    # -- plumbing ---------------------------------------------------------------------------
    def now(self) -> dt.datetime:
        t = self.clock()
        if t.tzinfo is None:
            raise ValueError("the clock must return aware datetimes")
        return t.astimezone(dt.UTC)

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        """One transaction. Database outages become :class:`Unavailable` (details go to the log)."""
        try:
            with self.sessions() as s, s.begin():
                yield s
        except sa_exc.OperationalError as e:
            log.error("database error: %s", e)
            raise Unavailable("the server's database is unavailable") from e

    @contextmanager
    def _read(self) -> Iterator[Session]:
        """One read-only statement. On PostgreSQL in autocommit mode: one round trip instead of
        three (BEGIN, the SELECT, COMMIT), with the same snapshot a transaction of one statement
        would see. Elsewhere (SQLite, whose transactions begin with a write lock): :meth:`_tx`."""
        bind = self.sessions.kw.get("bind")
        if bind is None or bind.dialect.name != "postgresql":
            with self._tx() as s:
                yield s
            return
        try:
            with bind.connect() as conn, Session(conn.execution_options(isolation_level="AUTOCOMMIT")) as s:
                yield s
        except sa_exc.OperationalError as e:
            log.error("database error: %s", e)
            raise Unavailable("the server's database is unavailable") from e

    def _crash(self, point: str) -> None:
        """SIGKILL this process if the crash tests asked for ``point`` (see :data:`CRASH_POINTS`)."""
        if self._crash_at != point:
            return
        once = os.environ.get(CRASH_ONCE_ENV)
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)

    def _key(self) -> Ed25519PrivateKey:
        if self.provider_key is None:
            raise Misconfigured("the server has no provider signing key loaded")
        return self.provider_key

    @staticmethod
    def _capsule(s: Session, capsule_id: uuid.UUID, version: int) -> Capsule:
        cap = s.scalar(select(Capsule).where(Capsule.capsule_id == str(capsule_id), Capsule.version == version))
        if cap is None:
            raise UnknownCapsule(f"the server does not know capsule {capsule_id} version {version}")
        return cap

    def _live_grant(self, s: Session, account: AccountRef, cap: Capsule, now: dt.datetime, *,
                    lock: bool = False) -> Grant:
        q = select(Grant).where(Grant.account_id == account.id, Grant.capsule_pk == cap.id)
        grant = s.scalar(q.with_for_update() if lock else q)
        what = f"capsule {cap.name} ({cap.capsule_id} v{cap.version})"
        if grant is None:
            raise GrantRefused(f"account {account.name!r} has no grant for {what}")
        if grant.revoked:
            raise GrantRefused(f"the provider revoked account {account.name!r}'s grant for {what}",
                               hint="ask the provider")
        if grant.expires is not None and grant.expires <= now:
            raise GrantExpired(f"account {account.name!r}'s grant for {what} expired at {grant.expires.isoformat()}")
        return grant

    # -- HTTP operations --------------------------------------------------------------------
    def authenticate(self, token: str | None) -> AccountRef:
        if not token or len(token) > 512:
            raise Unauthorized("missing or malformed bearer token")
        with self._read() as s:
            acc = s.scalar(select(Account).where(Account.token_hash == hash_token(token)))
        if acc is None:
            raise Unauthorized("the access token is not valid")
        return AccountRef(acc.id, acc.name)

    def challenge(self, account: AccountRef, capsule_id: uuid.UUID, version: int) -> Challenge:
        """A fresh single-use nonce, refused unless the account holds a live grant."""
        now = self.now()
        nonce = os.urandom(NONCE_LEN)
        expires = now + self.nonce_ttl
        with self._tx() as s:
            cap = self._capsule(s, capsule_id, version)
            self._live_grant(s, account, cap, now)
            open_ = s.scalar(select(func.count()).select_from(Nonce).where(
                Nonce.account_id == account.id, Nonce.used_at.is_(None), Nonce.expires_at >= now))
            if (open_ or 0) >= self.max_open_challenges:
                raise TooManyChallenges(
                    f"this account already holds {open_} open challenges (at most {self.max_open_challenges}); "
                    f"each expires {int(self.nonce_ttl.total_seconds())} s after it was issued")
            s.add(Nonce(nonce=nonce, account_id=account.id, capsule_pk=cap.id, created=now, expires_at=expires))
            # Housekeeping only (an expired nonce is refused whether or not it was deleted): at
            # most once per NONCE_SWEEP_EVERY per process, not a round trip per challenge.
            if self._swept is None or not dt.timedelta(0) <= now - self._swept < NONCE_SWEEP_EVERY:
                s.execute(delete(Nonce).where(Nonce.expires_at < now - NONCE_RETENTION)
                          .execution_options(synchronize_session=False))
                self._swept = now
        return Challenge(nonce, expires)

    def provision(self, account: AccountRef, *, capsule_id: uuid.UUID, version: int, nonce: bytes,
                  hpke_pub: bytes, receipt_pub: bytes, evidence: Any) -> Provisioned:
        """Provision one device: the setup phase's server side (DESIGN §2, step 3-4).

        Checks, in order: the nonce (exists, is this account's and this capsule's, is not
        expired, was not used: it is consumed here, in its own committed transaction, and bound
        to this request's :func:`provision_fingerprint`, so a failed attempt cannot be retried
        with other evidence or keys); the evidence; the grant (not revoked, not expired); the
        device limit. Then the device is recorded and the license signed.

        *Idempotent.* The device row keeps the nonce, the request's fingerprint and the sealed
        answer, in the transaction that takes the slot. A request identical to one already
        answered (same account, capsule, nonce, ``hpke_pub``, ``receipt_pub`` and evidence: a
        client retrying after the answer was lost, or after the server died) gets that stored
        answer again, and no second slot. It is useless to anyone else: the payload is sealed
        (HPKE) to ``hpke_pub``, whose private key only the attested enclave holds, and a request
        that differs in anything is refused as a replay. A retry of a request that was
        verified but not committed (the server died in between) runs again, even after the
        nonce expired: the evidence was fresh when the nonce was consumed.

        *Provision once* under concurrency. The device count and the insert happen in one
        transaction that first locks the grant:

        * PostgreSQL: ``SELECT ... FROM grants WHERE ... FOR UPDATE`` blocks every other
          provision of the same grant until this transaction ends. Under READ COMMITTED the next
          statement of the waiter takes a fresh snapshot, so its device count includes the row
          committed by the lock's previous holder.
        * SQLite: every transaction begins with ``BEGIN IMMEDIATE`` (see :mod:`.db`), which takes
          the database write lock before the first read; transactions are therefore serial.

        Independently of the locks, the device takes the lowest free ``slot`` in
        ``[0, grant.devices)`` and ``UNIQUE (grant_id, slot)`` holds in the database. Even if two
        transactions saw the same count, they would pick the same slot and one insert would
        fail; so ``devices provisioned <= grant.devices`` is an invariant the database enforces
        on any engine and isolation level. The locks only make sure no request is refused
        spuriously by that race. A unique violation is reported as the device limit.
        """
        now = self.now()
        try:
            expected = report_data(nonce, hpke_pub, receipt_pub)
            ed25519_public_from_raw(receipt_pub)
        except (FormatError, SignatureError, ValueError) as e:
            raise FormatError("nonce, hpke_pub and receipt_pub must be 32 bytes each") from e
        try:  # a low-order X25519 point gives an all-zero shared secret: refuse it before the nonce is spent
            X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(hpke_pub))
        except ValueError as e:
            raise FormatError("hpke_pub is not a usable X25519 public key") from e
        key = self._key()
        fingerprint = provision_fingerprint(account.id, capsule_id, version, nonce, hpke_pub, receipt_pub, evidence)
        with self._tx() as s:
            cap = self._capsule(s, capsule_id, version)
            if cap.provider_key != raw_public(key.public_key()):
                raise Misconfigured(f"capsule {cap.capsule_id} v{cap.version} is signed by another provider key "
                                    "than the one this server signs licenses with")
            done = self._answered(s, nonce, fingerprint)
            if done is None:
                self._use_nonce(s, account, cap, nonce, fingerprint, now)
        if done is not None:  # a retry of a request already answered
            return self._answer_again(done, account)
        # The nonce is spent now, whatever happens next.
        verified = self.verifier.verify(evidence, expected_report_data=expected, now=now, capsule_id=str(capsule_id))
        self._crash("provision.after_verify")
        try:
            with self._tx() as s:
                cap = self._capsule(s, capsule_id, version)
                grant = self._live_grant(s, account, cap, now, lock=True)
                # A copy of this request (a retry racing the original) may have taken the slot
                # while this one waited for the grant's lock.
                done = self._answered(s, nonce, fingerprint)
                if done is not None:
                    return self._answer_again(done, account)
                slot, held = self._free_slot(s, grant)
                if slot is None:
                    raise DeviceLimitReached(
                        f"account {account.name!r} has already provisioned {held} of the {grant.devices} "
                        f"device(s) its grant allows for capsule {cap.name} v{cap.version}")
                lic = License(license_id=str(uuid.uuid4()), capsule_id=uuid.UUID(cap.capsule_id),
                              version=cap.version, device_id=str(uuid.uuid4()), account=account.name,
                              receipt_key=receipt_pub, budget=grant.budget, expires=grant.expires, issued=now,
                              lease_size=cap.lease_size,
                              policy={"defenses": list(grant.defenses)} if grant.defenses else {})
                payload = seal_payload(hpke_pub, nonce, cap.content_key, lic.sign(key))
                credential = None
                if verified.type == "tpm":
                    # Only the TPM that holds both the certified EK and the quoting AK can recover
                    # the secret that unwraps the payload (TPM2_ActivateCredential).
                    from ..attestation.tpm import credential_challenge

                    gated = credential_challenge(evidence, payload)
                    payload, credential = b64d(gated["payload"]), gated["credential"]
                s.add(Device(device_id=lic.device_id, license_id=lic.license_id, grant_id=grant.id, slot=slot,
                             receipt_pub=receipt_pub, measurement=verified.measurement,
                             evidence_type=verified.type, platform_id=verified.platform_id, created=now,
                             head_seq=0, head_hash=GENESIS, charged=0, answered=0, nonce=nonce,
                             request_sha256=fingerprint, answer_payload=payload, answer_credential=credential))
                s.flush()
                self._crash("provision.after_insert")
        except sa_exc.IntegrityError as e:
            # UNIQUE (grant_id, slot): another provision took the slot; or ux_devices_nonce: a
            # copy of this request did, and its answer is this one's.
            with self._tx() as s:
                done = self._answered(s, nonce, fingerprint)
            if done is None:
                raise DeviceLimitReached(f"account {account.name!r} has no device left on its grant") from e
            return self._answer_again(done, account)
        self._crash("provision.after_commit")
        log.info("provisioned device %s (license %s) for account %s, capsule %s v%s, %s evidence",
                 lic.device_id, lic.license_id, account.name, cap.capsule_id, cap.version, verified.type)
        self._crash("provision.before_response")
        return Provisioned(lic.license_id, lic.device_id, payload, credential)

    @staticmethod
    def _free_slot(s: Session, grant: Grant) -> tuple[int | None, int]:
        """(the lowest free device slot of ``grant`` or None, the slots taken). Slots are usually
        dense (0..n-1): then a count and a max say it, without reading every device's slot."""
        n, top = s.execute(select(func.count(Device.id), func.max(Device.slot))
                           .where(Device.grant_id == grant.id)).one()
        n = int(n or 0)
        if top is None or int(top) == n - 1:
            return (n if n < grant.devices else None), n
        used = set(s.scalars(select(Device.slot).where(Device.grant_id == grant.id)))
        return next((i for i in range(grant.devices) if i not in used), None), len(used)

    @staticmethod
    def _use_nonce(s: Session, account: AccountRef, cap: Capsule, nonce: bytes, fingerprint: str,
                   now: dt.datetime) -> None:
        """Consume the challenge for the request ``fingerprint``, or check that it was consumed
        by the identical request (a retry whose first attempt died before its commit)."""
        row = s.get(Nonce, nonce)
        if row is None or row.account_id != account.id or row.capsule_pk != cap.id:
            raise NonceRefused("unknown challenge nonce (not issued by this server, or not for this account "
                               "and capsule)")
        if row.used_at is None:
            if row.expires_at <= now:
                raise NonceExpired(f"the challenge nonce expired at {row.expires_at.isoformat()}")
            # An UPDATE's result is a CursorResult (it has rowcount); Session.execute is typed as Result.
            marked = cast(CursorResult[Any],
                          s.execute(update(Nonce).where(Nonce.nonce == nonce, Nonce.used_at.is_(None))
                                    .values(used_at=now, request_sha256=fingerprint)
                                    .execution_options(synchronize_session=False)))
            if marked.rowcount == 1:
                return
        # Used: by this very request? A column query, so it reads the committed row (on
        # PostgreSQL the UPDATE above waited for a racing transaction's lock), not the session's copy.
        held = s.scalar(select(Nonce.request_sha256).where(Nonce.nonce == nonce))
        if held != fingerprint:
            raise NonceReplayed("the challenge nonce was already used")

    @staticmethod
    def _answered(s: Session, nonce: bytes, fingerprint: str) -> Provisioned | None:
        """The stored answer if a device was provisioned with ``nonce`` by the identical request,
        else None (then the nonce's own checks decide: unknown, another account's, replayed)."""
        dev = s.scalar(select(Device).where(Device.nonce == nonce))
        if dev is None or dev.request_sha256 != fingerprint or dev.answer_payload is None:
            return None
        return Provisioned(dev.license_id, dev.device_id, dev.answer_payload, dev.answer_credential, replayed=True)

    def _answer_again(self, done: Provisioned, account: AccountRef) -> Provisioned:
        log.info("provisioning of device %s (license %s) for account %s answered again: a retry of the same "
                 "request, no new slot", done.device_id, done.license_id, account.name)
        self._crash("provision.before_response")
        return done

    def upload_usage(self, account: AccountRef, *, license_id: str, device_id: str, receipts: Any) -> ChainHead:
        """Verify receipts continue the stored chain; store the new head (compare-and-swap).

        *Idempotent.* Receipts the server already holds are dropped first
        (:func:`drop_already_accepted`), so a retried upload (the answer was lost, or the server
        died after its commit) is acknowledged with the stored head and counts nothing twice;
        one that died before its commit left nothing behind and is applied whole. The new head,
        its counters and the alarms are written in one transaction, guarded by the head it
        was verified against: if another upload (possibly a copy of this one, on another
        server instance) moved the head meanwhile, this one is verified again against the new
        head, a few times, before it is refused.
        """
        for _ in range(5):
            new = self._upload_once(account, license_id=license_id, device_id=device_id, receipts=receipts)
            if new is not None:
                self._crash("usage.before_response")
                return new
        raise ChainConflict("other uploads for this device kept changing the chain meanwhile; upload again")

    def _upload_once(self, account: AccountRef, *, license_id: str, device_id: str, receipts: Any) -> ChainHead | None:
        """One attempt of :meth:`upload_usage`; None if another upload moved the head meanwhile."""
        now = self.now()
        with self._tx() as s:
            dev = s.scalar(select(Device).join(Grant, Device.grant_id == Grant.id)
                           .where(Device.license_id == license_id, Device.device_id == device_id,
                                  Grant.account_id == account.id))
            if dev is None:
                raise UnknownLicense(f"no license {license_id[:64]} for device {device_id[:64]} on this account")
            head = ChainHead(dev.head_seq, dev.head_hash, dev.charged, dev.answered)
            dev_pk, receipt_pub = dev.id, dev.receipt_pub
        entries = drop_already_accepted(receipts, head)
        key = ed25519_public_from_raw(receipt_pub)
        forked = False
        try:
            new = verify_chain(entries, key, license_id=license_id, head=head)
        except IntegrityError as e:
            branch = verify_fork(entries, key, license_id=license_id, head=head)
            if branch is None:
                raise ChainConflict(f"usage receipts refused: {e.message}") from e
            # Signed by this device's enclave, yet not on the stored chain: the enclave ran from
            # an older copy of its state. Recorded, and the branch becomes the stored chain (the
            # books keep the larger counters), so the device can go on syncing.
            new, forked = branch, True
            log.warning("device %s (license %s) uploaded a receipt chain that forks from the stored one at "
                        "seq %s: its enclave state was restored from an older copy", device_id[:64],
                        license_id[:64], head.seq)
        self._crash("usage.after_verify")
        if new == head:
            return head
        rollbacks = sum(1 for e in entries if e["body"]["kind"] == "rollback")
        defense = _defense_reports(entries)  # FormatError (422) on a malformed alarm or gap receipt
        with self._tx() as s:
            values: dict[str, Any] = {}
            if defense.summary is not None:
                values["defense_summary"] = defense.summary
            res = cast(CursorResult[Any], s.execute(
                update(Device)
                .where(Device.id == dev_pk, Device.head_seq == head.seq, Device.head_hash == head.hash)
                .values(head_seq=new.seq, head_hash=new.hash, charged=max(new.charged, head.charged),
                        answered=max(new.answered, head.answered), last_sync=now,
                        rollbacks=Device.rollbacks + rollbacks, forks=Device.forks + int(forked),
                        defense_gaps=Device.defense_gaps + defense.gaps,
                        gap_queries=Device.gap_queries + defense.gap_queries, **values)
                .execution_options(synchronize_session=False)))
            if res.rowcount != 1:
                return None  # nothing written: verified again against the head now stored
            if defense.alarms:
                # Receipts that continue the stored chain are all new; a forked chain may repeat
                # receipts the server holds, whose alarms are stored once.
                held: set[str] = set()
                hashes = sorted({a["receipt_hash"] for a in defense.alarms}) if forked else []
                for i in range(0, len(hashes), 500):
                    held.update(s.scalars(select(AlarmRecord.receipt_hash).where(
                        AlarmRecord.device_pk == dev_pk, AlarmRecord.receipt_hash.in_(hashes[i:i + 500]))))
                s.add_all(AlarmRecord(device_pk=dev_pk, received=now, **a) for a in defense.alarms
                          if a["receipt_hash"] not in held)
                s.flush()
            self._crash("usage.after_update")
        self._crash("usage.after_commit")
        if defense.alarms:
            log.warning("device %s (license %s) reported %d defense alarm(s)", device_id[:64], license_id[:64],
                        len(defense.alarms))
        return new

    def sign_ack(self, license_id: str, device_id: str, head: ChainHead) -> dict[str, Any]:
        """The provider-signed acknowledgement of the chain head stored for this device: the
        enclave forgets receipts only on this (usage protocol 2)."""
        from ..enclave.messages.receipts import Ack

        return Ack(license_id, device_id, head.seq, head.hash).sign(self._key())

    # -- administration (CLI) ---------------------------------------------------------------
    def add_account(self, name: str) -> tuple[AccountRef, str]:
        """Create an account; returns it and its token (the only time the token exists in clear)."""
        if not _ACCOUNT_NAME.match(name):
            raise UsageError(f"{name[:80]!r} is not a valid account name",
                             hint="use 1-128 letters, digits and . _ @ + - (starting with a letter or digit)")
        token = new_token()
        try:
            with self._tx() as s:
                acc = Account(name=name, token_hash=hash_token(token), created=self.now())
                s.add(acc)
                s.flush()
                ref = AccountRef(acc.id, acc.name)
        except sa_exc.IntegrityError as e:
            raise UsageError(f"account {name!r} already exists") from e
        return ref, token

    def list_accounts(self) -> list[dict[str, Any]]:
        with self._tx() as s:
            rows = s.execute(select(Account, func.count(Grant.id)).outerjoin(Grant, Grant.account_id == Account.id)
                             .group_by(Account.id).order_by(Account.name)).all()
            return [{"name": a.name, "created": a.created, "grants": n} for a, n in rows]

    def register_capsule(self, capsule_path: str | os.PathLike[str], key_path: str | os.PathLike[str], *,
                         provider_public: bytes | None) -> tuple[dict[str, Any], bool]:
        """Register a capsule version and its content key. Returns (info, newly registered).

        Checks: the capsule's signature and structure; the key file names the same capsule id
        and version; the key authenticates the first chunk of an encrypted segment (so it is
        the key this capsule was packed with); and that the capsule is signed by the provider key
        (licenses signed by another key would be refused by every enclave).

        Trust decision: the capsule is opened pinned to ``provider_public`` if given, else to the
        public half of the key this server signs licenses with. Only an administrative service
        with no provider key loaded (``mlcapsule admin capsule add`` without the key, which
        warns) falls back to the manifest's own key; provisioning then still refuses a capsule
        whose key is not the one licenses are signed with.
        """
        from ..enclave.crypto.chunks import TAG_LEN, SegmentCipher, n_chunks
        from ..enclave.format.container import CapsuleFile
        from ..enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey, UntrustedProviderKey

        pinned = provider_public if provider_public is not None else (
            raw_public(self.provider_key.public_key()) if self.provider_key is not None else None)
        trust = TrustProviderKey(pinned) if pinned is not None else UnsafeTrustManifestKey()
        try:
            cf = CapsuleFile(capsule_path, trust=trust)
        except UntrustedProviderKey as e:
            raise UsageError(f"capsule {capsule_path} is signed by another provider key than this server's",
                             hint="pack it with the server's provider key (--provider-key / provider_key_path)") from e
        with cf:
            m = cf.manifest
            manifest_sha = hashlib.sha256(cf.manifest_bytes).hexdigest()
            ck = ContentKey.load(key_path)
            if ck.capsule_id != m.capsule_id or ck.version != m.version:
                raise UsageError(f"the key file {key_path} is for capsule {ck.capsule_id} v{ck.version}, "
                                 f"not {m.capsule_id} v{m.version}")
            enc = [seg for seg in m.segments if seg.encrypted]
            if enc:
                seg = enc[0]
                view = cf.segment_view(seg)
                try:
                    ct = view[:min(seg.chunk_size + TAG_LEN, len(view))]
                    out = bytearray(len(ct) - TAG_LEN)
                    try:
                        SegmentCipher(ck.key, m.capsule_id, m.version, seg.index, seg.chunk_size).decrypt_chunk_into(
                            ct, 0, n_chunks(seg.plain_length, seg.chunk_size), memoryview(out))
                    except IntegrityError as e:
                        raise UsageError(f"the key in {key_path} does not decrypt capsule {capsule_path}",
                                         hint="use the .key file written when this capsule was packed") from e
                    finally:
                        out[:] = bytes(len(out))
                        ct.release()
                finally:
                    view.release()
            # Then every byte: the segment hashes (signed), and every chunk's tag under the key.
            # A damaged capsule registered here would be provisioned to clients who then cannot
            # load it, each setup using one of their device slots (issue 11, item 2).
            try:
                cf.verify_segments()
                _check_all_chunks(cf, ck.key)
            except IntegrityError as e:
                raise IntegrityError(f"capsule {capsule_path} is damaged: {e.message}",
                                     hint="nothing was registered; pack it again or copy it again from the packer's "
                                          "output") from None
        info = {"capsule_id": str(m.capsule_id), "version": m.version, "name": m.name,
                "lease_size": m.policy.lease_size}
        defenses = dict(getattr(m.policy, "defenses", None) or {})
        with self._tx() as s:
            old = s.scalar(select(Capsule).where(Capsule.capsule_id == str(m.capsule_id), Capsule.version == m.version))
            if old is not None:
                if old.content_key == ck.key and old.manifest_sha256 == manifest_sha:
                    if old.defense_policy is None:  # registered before revision 0004: now it is known
                        old.defense_policy = defenses
                    return info, False
                raise UsageError(f"capsule {m.capsule_id} v{m.version} is already registered with another "
                                 "manifest or key", hint="pack a new version (--version) instead")
            s.add(Capsule(capsule_id=str(m.capsule_id), version=m.version, name=m.name, content_key=ck.key,
                          manifest_sha256=manifest_sha, provider_key=m.provider_key,
                          lease_size=m.policy.lease_size, registered=self.now(), defense_policy=defenses))
        return info, True

    def _resolve_capsule(self, s: Session, ref: str) -> Capsule:
        """CAPSULE as a capsule file path, ``UUID`` (latest registered version) or ``UUID:VERSION``."""
        version: int | None
        if Path(ref).is_file():
            from ..enclave.format.container import CapsuleFile
            from ..enclave.format.trust import UnsafeTrustManifestKey

            # The file only names an id and version (the decision is the registered row, which
            # was pinned at registration): its manifest's own key is enough for that.
            with CapsuleFile(ref, trust=UnsafeTrustManifestKey()) as cf:
                cid, version = cf.manifest.capsule_id, cf.manifest.version
        else:
            text, _, vtext = ref.partition(":")
            try:
                cid = uuid.UUID(text)
                version = int(vtext) if vtext else None
            except ValueError as e:
                raise UsageError(f"{ref!r} is neither a capsule file nor CAPSULE_ID[:VERSION]") from e
        q = select(Capsule).where(Capsule.capsule_id == str(cid))
        q = q.where(Capsule.version == version) if version is not None else q.order_by(Capsule.version.desc())
        cap = s.scalars(q).first()
        if cap is None:
            raise UsageError(f"capsule {cid}{'' if version is None else f' v{version}'} is not registered",
                             hint="register it with `mlcapsule admin capsule add CAPSULE --key CAPSULE.key`")
        return cap

    @staticmethod
    def _account(s: Session, name: str) -> Account:
        acc = s.scalar(select(Account).where(Account.name == name))
        if acc is None:
            raise UsageError(f"no account named {name!r}", hint="create it with `mlcapsule admin account add NAME`")
        return acc

    def grant(self, account_name: str, capsule_ref: str, *, budget: int | None, devices: int,
              expires: dt.datetime | None, defenses: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
        """Create or replace the account's grant for a capsule version (clears a revocation).

        ``budget`` is the query budget of *each* device's license. New terms apply to devices
        provisioned from now on; licenses already issued keep theirs (top up with vouchers).

        ``defenses`` are defense specs (``prada:delta=0.95``, ``round:2``...) that tighten the
        capsule's signed policy; each license issued under the grant carries them (its
        ``policy["defenses"]``). They are parsed (DefenseSpecError) and applied over the capsule's
        own policy, which the server read at registration: a grant that would loosen it is refused
        (DefenseGrantError). For a capsule registered before the server kept policies, they are
        checked against the capsule file when CAPSULE is one, else only parsed (the enclave checks
        them again at setup); ``checked`` in the result says which.
        """
        if devices < 1 or (budget is not None and budget < 0):
            raise UsageError("--devices must be at least 1 and --budget at least 0")
        if devices > 2**31 - 1 or (budget is not None and budget > 2**63 - 1):  # the database's integer columns
            raise UsageError("--devices must be below 2^31 and --budget below 2^63")
        if expires is not None and expires.tzinfo is None:
            raise UsageError("--expires must carry a time zone")
        specs = _grant_specs(defenses)
        with self._tx() as s:
            acc = self._account(s, account_name)
            cap = self._resolve_capsule(s, capsule_ref)
            base = cap.defense_policy
            if base is None:  # registered before the server kept policies: from the file, if it is one
                base = cap.defense_policy = _file_defense_policy(capsule_ref, cap)
            policy = _tightened(base, specs)
            g = s.scalar(select(Grant).where(Grant.account_id == acc.id, Grant.capsule_pk == cap.id).with_for_update())
            created = g is None
            if g is None:
                g = Grant(account_id=acc.id, capsule_pk=cap.id, created=self.now())
                s.add(g)
            g.budget, g.devices, g.expires, g.revoked, g.revoked_at = budget, devices, expires, False, None
            g.defenses = specs or None
            used = s.scalar(select(func.count(Device.id)).join(Grant).where(
                Grant.account_id == acc.id, Grant.capsule_pk == cap.id)) or 0
            return {"account": acc.name, "capsule": f"{cap.name} {cap.capsule_id} v{cap.version}",
                    "budget": budget, "devices": devices, "expires": expires, "created": created,
                    "devices_provisioned": used, "defenses": specs, "checked": base is not None,
                    "policy": policy.describe() if policy is not None else []}

    def revoke(self, account_name: str, capsule_ref: str) -> dict[str, Any]:
        """Refuse every later challenge and provision under this grant.

        Devices already provisioned keep working offline until their license expires or their
        budget runs out: the server cannot reach an offline enclave.
        """
        with self._tx() as s:
            acc = self._account(s, account_name)
            cap = self._resolve_capsule(s, capsule_ref)
            g = s.scalar(select(Grant).where(Grant.account_id == acc.id, Grant.capsule_pk == cap.id).with_for_update())
            if g is None:
                raise UsageError(f"account {account_name!r} has no grant for capsule {cap.capsule_id} v{cap.version}")
            g.revoked, g.revoked_at = True, self.now()
            n = s.scalar(select(func.count(Device.id)).where(Device.grant_id == g.id)) or 0
            return {"account": acc.name, "capsule": f"{cap.name} {cap.capsule_id} v{cap.version}",
                    "devices_provisioned": n}

    @staticmethod
    def _find_device(s: Session, license_id: str, *, lock: bool = False) -> Device:
        """The device of ``license_id``, or of a unique prefix of it of at least 8 characters (as
        ``admin usage`` shows it); UsageError if there is none."""
        def one(q: Any) -> Device | None:
            return s.scalar(q.with_for_update() if lock else q)

        dev = one(select(Device).where(Device.license_id == license_id))
        if dev is None and len(license_id) >= 8:  # a unique prefix, as `admin usage` shows it
            found = s.scalars(select(Device.license_id)
                              .where(Device.license_id.startswith(license_id, autoescape=True)).limit(2)).all()
            if len(found) > 1:
                raise UsageError(f"{license_id!r} matches several licenses", hint="give more of the id")
            if found:
                dev = one(select(Device).where(Device.license_id == found[0]))
        if dev is None and len(license_id) < 8:
            raise UsageError(f"license id prefix {license_id[:80]!r} is too short (at least 8 characters)",
                             hint="give at least the 8 characters `mlcapsule admin usage` shows, or the "
                                  "whole id (`mlcapsule admin usage --json`)")
        if dev is None:
            raise UsageError(f"no license {license_id[:80]!r}",
                             hint="`mlcapsule admin usage` lists the licenses")
        return dev

    def _device_by_license(self, s: Session, license_id: str, *, what: str) -> Device:
        """:meth:`_find_device`, locked for update, refused if its grant is revoked."""
        dev = self._find_device(s, license_id, lock=True)
        grant = s.get(Grant, dev.grant_id)
        if grant is not None and grant.revoked:
            raise UsageError(f"the grant behind license {dev.license_id} is revoked",
                             hint=f"grant it again first if you mean to {what} it")
        return dev

    def issue_voucher(self, license_id: str, queries: int) -> dict[str, Any]:
        """A provider-signed top-up for ``license_id``, numbered after the last one issued."""
        if not 0 < queries <= 10**12:
            raise UsageError("--queries must be between 1 and 10^12")
        key = self._key()
        try:
            with self._tx() as s:
                dev = self._device_by_license(s, license_id, what="top up")
                license_id = dev.license_id
                seq = (s.scalar(select(func.max(Voucher.seq)).where(Voucher.license_id == license_id)) or 0) + 1
                s.add(Voucher(license_id=license_id, seq=seq, queries=queries, issued=self.now()))
                s.flush()
                envelope = VoucherMsg(license_id, dev.device_id, seq, queries).sign(key)
        except sa_exc.IntegrityError as e:
            raise Unavailable("another voucher for this license was issued at the same time; try again") from e
        return envelope

    def issue_unlock(self, license_id: str, *, device_id: str | None = None,
                     reset_detectors: bool = False) -> dict[str, Any]:
        """A provider-signed unlock voucher (``unlock/v1``) for the device of ``license_id``
        (a unique prefix of at least 8 characters will do), numbered after the last voucher
        issued for it, top-up or unlock: the two kinds share one sequence, as the enclave counts
        them. ``device_id``, if given, must name that device (a prefix of at least 8
        characters will do). ``reset_detectors`` also empties the detectors' state when applied.
        The client applies it with ``mlcapsule topup CAPSULE FILE``; it lifts a defense lock or
        degradation once."""
        key = self._key()
        try:
            with self._tx() as s:
                dev = self._device_by_license(s, license_id, what="unlock")
                if device_id is not None and not (dev.device_id == device_id or (
                        len(device_id) >= 8 and dev.device_id.startswith(device_id))):
                    raise UsageError(f"license {dev.license_id} belongs to device {dev.device_id}, "
                                     f"not {device_id[:80]!r}", hint="`mlcapsule admin usage` lists the devices")
                # One sequence with the top-ups: the enclave's voucher counter then refuses a
                # replayed unlock, even in a restored state.
                seq = (s.scalar(select(func.max(Voucher.seq)).where(Voucher.license_id == dev.license_id)) or 0) + 1
                s.add(Voucher(license_id=dev.license_id, seq=seq, queries=0, kind="unlock", issued=self.now()))
                dev.unlock_seq = seq
                s.flush()
                envelope = Unlock(dev.license_id, dev.device_id, seq, reset=reset_detectors).sign(key)
        except sa_exc.IntegrityError as e:
            raise Unavailable("another voucher for this license was issued at the same time; try again") from e
        log.info("unlock voucher %d issued for device %s (license %s)%s", seq, dev.device_id, dev.license_id,
                 ", detectors reset" if reset_detectors else "")
        return envelope

    def alarms(self, license_id: str | None = None) -> list[dict[str, Any]]:
        """Every alarm the devices reported (oldest first), or those of one license (a unique
        prefix of at least 8 characters will do)."""
        with self._tx() as s:
            q = (select(AlarmRecord, Device.device_id, Device.license_id, Account.name, Capsule.name, Capsule.version)
                 .join(Device, AlarmRecord.device_pk == Device.id).join(Grant, Device.grant_id == Grant.id)
                 .join(Account, Grant.account_id == Account.id).join(Capsule, Grant.capsule_pk == Capsule.id))
            if license_id is not None:
                q = q.where(AlarmRecord.device_pk == self._find_device(s, license_id).id)
            rows = s.execute(q.order_by(AlarmRecord.received, AlarmRecord.device_pk, AlarmRecord.receipt_seq,
                                        AlarmRecord.position)).all()
            return [{"account": acc, "capsule": f"{cname} v{ver}", "license_id": lic_id, "device_id": dev_id,
                     "detector": a.detector, "query": a.query, "statistic": a.statistic, "threshold": a.threshold,
                     "action": a.action, "receipt": a.receipt_seq, "time": a.signed_time, "received": a.received}
                    for a, dev_id, lic_id, acc, cname, ver in rows]

    def list_capsules(self) -> list[dict[str, Any]]:
        """Registered capsule versions, with how many grants and devices each has."""
        with self._tx() as s:
            grants = dict(s.execute(select(Grant.capsule_pk, func.count(Grant.id)).group_by(Grant.capsule_pk)).all())
            devices = dict(s.execute(select(Grant.capsule_pk, func.count(Device.id))
                                     .join(Device, Device.grant_id == Grant.id)
                                     .group_by(Grant.capsule_pk)).all())
            caps = s.scalars(select(Capsule).order_by(Capsule.name, Capsule.version)).all()
            return [{"name": c.name, "capsule_id": c.capsule_id, "version": c.version, "lease_size": c.lease_size,
                     "registered": c.registered, "grants": int(grants.get(c.id) or 0),
                     "devices": int(devices.get(c.id) or 0)} for c in caps]

    def import_usage(self, report: Any) -> tuple[str, ChainHead]:
        """Ingest a usage report a client exported (``mlcapsule setup --replace --export-receipts
        FILE``): the same verification as ``POST /v1/usage`` (:meth:`upload_usage`), on behalf of
        the account that owns the device. Returns (account name, the stored chain head)."""
        if not isinstance(report, dict) or not isinstance(report.get("license_id"), str) \
                or not isinstance(report.get("device_id"), str) or not isinstance(report.get("receipts"), list):
            raise UsageError("not a usage report: expected a JSON object with license_id, device_id and receipts",
                             hint="give the file written by `mlcapsule setup --replace --export-receipts FILE`")
        license_id, device_id = report["license_id"], report["device_id"]
        with self._tx() as s:
            row = s.execute(select(Account.id, Account.name).select_from(Device)
                            .join(Grant, Device.grant_id == Grant.id).join(Account, Grant.account_id == Account.id)
                            .where(Device.license_id == license_id, Device.device_id == device_id)).first()
        if row is None:
            raise UsageError(f"no license {license_id[:64]!r} for device {device_id[:64]!r} on this server",
                             hint="check that the file comes from a device this server provisioned "
                                  "(`mlcapsule admin usage` lists them)")
        head = self.upload_usage(AccountRef(row[0], row[1]), license_id=license_id, device_id=device_id,
                                 receipts=report["receipts"])
        return row[1], head

    def usage(self) -> list[dict[str, Any]]:
        with self._tx() as s:
            rows = s.execute(
                select(Account.name, Capsule.name, Capsule.capsule_id, Capsule.version, Device, Grant.budget,
                       Grant.revoked, Grant.defenses)
                .select_from(Device).join(Grant, Device.grant_id == Grant.id)
                .join(Account, Grant.account_id == Account.id).join(Capsule, Grant.capsule_pk == Capsule.id)
                .order_by(Account.name, Capsule.name, Device.created)).all()
            vouchers = dict(s.execute(select(Voucher.license_id, func.sum(Voucher.queries))
                                      .where(Voucher.kind == "topup").group_by(Voucher.license_id)).all())
            alarms = dict(s.execute(select(AlarmRecord.device_pk, func.count(AlarmRecord.id))
                                    .group_by(AlarmRecord.device_pk)).all())
            return [{"account": a, "capsule": f"{cname} v{ver}", "capsule_id": cid, "device_id": d.device_id,
                     "license_id": d.license_id, "budget": budget, "vouchers": int(vouchers.get(d.license_id) or 0),
                     "charged": d.charged, "answered": d.answered, "receipts": d.head_seq,
                     "last_sync": d.last_sync, "created": d.created, "revoked": revoked, "evidence": d.evidence_type,
                     "rollbacks": d.rollbacks, "forks": d.forks, "alarms": int(alarms.get(d.id) or 0),
                     "defense_gaps": d.defense_gaps, "gap_queries": d.gap_queries, "unlock_seq": d.unlock_seq,
                     "defenses": list(defenses or []), "defense": d.defense_summary}
                    for a, cname, cid, ver, d, budget, revoked, defenses in rows]


def _grant_specs(defenses: Any) -> list[str]:
    """The grant's defense specs, stripped, after checking they parse as a policy (each defense
    once): DefenseSpecError otherwise. At most what a license carries (32 specs of 256 characters)."""
    from ..enclave.defenses import DefensePolicy
    from ..enclave.messages.license import MAX_DEFENSE_SPEC, MAX_GRANT_DEFENSES

    if defenses is None:
        return []
    if isinstance(defenses, str) or not all(isinstance(d, str) for d in defenses):
        raise UsageError("defenses must be a list of defense specs, e.g. ['prada:delta=0.95', 'round:2']")
    specs = [d.strip() for d in defenses]
    if len(specs) > MAX_GRANT_DEFENSES or any(len(d) > MAX_DEFENSE_SPEC for d in specs):
        raise UsageError(f"a grant carries at most {MAX_GRANT_DEFENSES} --defense specs of at most "
                         f"{MAX_DEFENSE_SPEC} characters")
    DefensePolicy.from_specs(specs)
    return specs


def _tightened(base: dict[str, Any] | None, specs: list[str]) -> Any:
    """The capsule's policy ``base`` (``DefensePolicy.to_dict()``, {} for none; None if not known)
    tightened by the grant's ``specs``: DefenseGrantError if they would loosen it. With an
    unknown base, the specs alone (already parsed); None when there are none."""
    from ..enclave.defenses import DefensePolicy, tighten

    if base is None:
        return DefensePolicy.from_specs(specs) if specs else None
    return tighten(DefensePolicy.from_dict(base) if base else DefensePolicy(), specs)


def _file_defense_policy(ref: str, cap: Capsule) -> dict[str, Any] | None:
    """The defense policy of the capsule file ``ref`` if it is the registered manifest of ``cap``
    (same SHA-256), for a capsule registered before the server kept policies; None otherwise."""
    if not Path(ref).is_file():
        return None
    from ..enclave.format.container import CapsuleFile
    from ..enclave.format.trust import UnsafeTrustManifestKey

    with CapsuleFile(ref, trust=UnsafeTrustManifestKey()) as cf:  # compared with the registered hash below
        if hashlib.sha256(cf.manifest_bytes).hexdigest() != cap.manifest_sha256:
            return None
        return dict(getattr(cf.manifest.policy, "defenses", None) or {})


def _check_all_chunks(cf: Any, key: bytes) -> None:
    """Authenticate every chunk of every encrypted segment of ``cf`` with ``key`` (about a second
    per GB), wiping each plaintext chunk as soon as it is checked."""
    from ..enclave.crypto.chunks import TAG_LEN, SegmentCipher, n_chunks

    m = cf.manifest
    for seg in m.segments:
        if not seg.encrypted:
            continue
        cipher = SegmentCipher(key, m.capsule_id, m.version, seg.index, seg.chunk_size)
        total = n_chunks(seg.plain_length, seg.chunk_size)
        step = seg.chunk_size + TAG_LEN
        buf = bytearray(seg.chunk_size)
        view = cf.segment_view(seg)
        try:
            for i in range(total):
                ct = view[i * step: min((i + 1) * step, len(view))]
                try:
                    cipher.decrypt_chunk_into(ct, i, total, memoryview(buf)[:len(ct) - TAG_LEN])
                finally:
                    ct.release()
        finally:
            buf[:] = bytes(len(buf))
            view.release()
