"""The provider server's database: SQLAlchemy 2 models, engine and session factory.

SQLite is the embedded default, PostgreSQL the production choice; both are tested.

**Protect the database like the key files.** The ``capsules`` table holds every capsule's
32-byte content key in the clear, because the server must hand it to attested enclaves.
Anyone who reads the database (or a backup of it) can decrypt every registered capsule. A
SQLite file is created with mode 0600 in a 0700 folder; for PostgreSQL, restrict the role,
encrypt backups, and do not share the database with other services.

Access tokens are never stored: ``accounts.token_hash`` is the SHA-256 of the random token,
which is shown once when the account is created.

How the concurrency guarantees hold on both engines:

* **Single-use nonces**: ``UPDATE nonces SET used_at = now WHERE nonce = ? AND used_at IS NULL``
  and a check that exactly one row changed. The database applies the UPDATE atomically, so of
  two racing requests exactly one sees rowcount 1. (On PostgreSQL the second UPDATE waits for
  the first one's row lock, then re-checks ``used_at IS NULL`` against the committed row.)
* **Provision once** (device limit): see :func:`~mlcapsule.server.service.ProviderService.provision`;
  a grant's row is locked (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite every transaction
  starts with ``BEGIN IMMEDIATE``, which takes the database's write lock up front), and the
  ``UNIQUE (grant_id, slot)`` constraint with ``0 <= slot < devices`` enforces the limit in the
  database itself, whatever the isolation level.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from ..enclave.errors import TransportError, UsageError

UTC = dt.UTC


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes on every engine (SQLite stores naive UTC, PostgreSQL timestamptz)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # hex SHA-256 of the token
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class Capsule(Base):
    __tablename__ = "capsules"
    __table_args__ = (UniqueConstraint("capsule_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    capsule_id: Mapped[str] = mapped_column(String(36))  # UUID, canonical text form
    version: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(256))
    #: The AES-256-GCM content key, in the clear: protect the database like the key file.
    content_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    provider_key: Mapped[bytes] = mapped_column(LargeBinary(32))  # raw Ed25519 key the manifest pins
    lease_size: Mapped[int] = mapped_column(Integer)
    registered: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    #: The manifest's signed defense policy (``DefensePolicy.to_dict()``, {} for none), read at
    #: registration; NULL for a capsule registered before revision 0004 (not known).
    defense_policy: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Grant(Base):
    """An account's right to provision devices for one capsule version."""

    __tablename__ = "grants"
    __table_args__ = (UniqueConstraint("account_id", "capsule_pk"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    capsule_pk: Mapped[int] = mapped_column(ForeignKey("capsules.id"))
    budget: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # per device license; None = unlimited
    devices: Mapped[int] = mapped_column(Integer)  # max devices that may be provisioned
    expires: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    #: Defense specs that tighten the capsule's policy (``admin grant --defense``), carried in
    #: each license issued under the grant as ``policy["defenses"]``; NULL for none (revision 0004).
    defenses: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)


class Device(Base):
    """One provisioned enclave, its license, and the head of its usage-receipt chain."""

    __tablename__ = "devices"
    # ux_devices_nonce (revision 0006): at most one device per challenge, so two copies of one
    # provisioning request (a retry racing the original) cannot take two slots.
    __table_args__ = (UniqueConstraint("grant_id", "slot"), Index("ux_devices_nonce", "nonce", unique=True))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(36), unique=True)
    license_id: Mapped[str] = mapped_column(String(36), unique=True)
    grant_id: Mapped[int] = mapped_column(ForeignKey("grants.id"))
    slot: Mapped[int] = mapped_column(Integer)  # 0 <= slot < grant.devices when inserted
    receipt_pub: Mapped[bytes] = mapped_column(LargeBinary(32))
    measurement: Mapped[str] = mapped_column(String(64))
    evidence_type: Mapped[str] = mapped_column(String(64))
    platform_id: Mapped[str] = mapped_column(String(64))
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    head_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    head_hash: Mapped[str] = mapped_column(String(64))
    charged: Mapped[int] = mapped_column(BigInteger, default=0)
    answered: Mapped[int] = mapped_column(BigInteger, default=0)
    last_sync: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: Rollbacks the enclave detected and reported (``rollback`` receipts), and uploads whose
    #: chain forked from the stored one (only a restored older enclave state makes one):
    #: revision 0003.
    rollbacks: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    forks: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    #: Defenses (revision 0004): the number of the last unlock voucher issued (``admin unlock``;
    #: numbered in the voucher sequence, see :class:`Voucher`), the
    #: ``defense-gap`` receipts and the queries they say went undefended, and the defense summary
    #: counters of the latest ``alarm`` receipt. Each alarm is a row of ``alarms``.
    unlock_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    defense_gaps: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    gap_queries: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    defense_summary: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: Idempotent provisioning (revision 0006): the challenge this device was provisioned with,
    #: the SHA-256 of the request (see ``service.provision_fingerprint``), and the answer sent
    #: (the HPKE-sealed payload, and for ``tpm`` evidence the credential that gates it). A retry
    #: of the identical request gets this answer again instead of a second slot. NULL for
    #: devices provisioned before 0006.
    nonce: Mapped[bytes | None] = mapped_column(LargeBinary(32), nullable=True)
    request_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Deferred: loaded only when a retry needs them, not with every device row (uploads, usage).
    answer_payload: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    answer_credential: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, deferred=True)


class AlarmRecord(Base):
    """One alarm a device's enclave raised, from an ``alarm`` receipt (revision 0004).

    ``(device_pk, receipt_hash, position)`` is unique: a receipt stored twice (a forked chain
    that repeats entries the server holds) adds its alarms once.
    """

    __tablename__ = "alarms"
    __table_args__ = (UniqueConstraint("device_pk", "receipt_hash", "position"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id"))
    receipt_seq: Mapped[int] = mapped_column(BigInteger)
    receipt_hash: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer)  # index in the receipt's list of alarms
    detector: Mapped[str] = mapped_column(String(64))
    query: Mapped[int] = mapped_column(BigInteger)  # the query's index in the device's stream (0-based)
    statistic: Mapped[float | None] = mapped_column(Float, nullable=True)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    action: Mapped[str] = mapped_column(String(16))
    signed_time: Mapped[str] = mapped_column(String(64))  # the receipt's time, as the enclave signed it
    received: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class Nonce(Base):
    __tablename__ = "nonces"
    # account_id: /v1/challenge counts an account's open challenges (revision 0002).
    __table_args__ = (Index("ix_nonces_expires_at", "expires_at"), Index("ix_nonces_account_id", "account_id"))
    nonce: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    capsule_pk: Mapped[int] = mapped_column(ForeignKey("capsules.id"))
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: The SHA-256 of the provisioning request that used this nonce (revision 0006): only the
    #: identical request may use it again (a client retrying after a lost answer).
    request_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Voucher(Base):
    """Every provider-signed voucher of a license, in its one sequence: top-ups and (revision
    0004) unlock vouchers, whose ``queries`` is 0."""

    __tablename__ = "vouchers"
    __table_args__ = (UniqueConstraint("license_id", "seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    license_id: Mapped[str] = mapped_column(ForeignKey("devices.license_id"))
    seq: Mapped[int] = mapped_column(Integer)
    queries: Mapped[int] = mapped_column(BigInteger)
    issued: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(16), default="topup", server_default="topup")  # or "unlock"


class AdminToken(Base):
    """A token for the admin API (``/v1/admin/...``), revision 0005: only the SHA-256 of the
    random token is stored, as for accounts, in a table of its own, so an admin token never
    authenticates a client and an account token never authenticates an administrator.
    ``role`` is ``read`` (lists only) or ``operator`` (everything)."""

    __tablename__ = "admin_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # hex SHA-256 of the token
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


# -- engine -----------------------------------------------------------------------------------
def _prepare_sqlite_file(database: str) -> None:
    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():  # created 0600: it holds content keys
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def make_engine(database_url: str, *, echo: bool = False) -> Engine:
    """An engine for SQLite or PostgreSQL, configured for the server's locking rules."""
    try:
        url = make_url(database_url)
    except ArgumentError as e:
        raise UsageError(f"{database_url!r} is not a database URL",
                         hint="use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB") from e
    backend = url.get_backend_name()
    if backend == "sqlite":
        memory = url.database in (None, "", ":memory:")
        if not memory:
            _prepare_sqlite_file(url.database)  # type: ignore[arg-type]
        engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False, "timeout": 60},
                               **({"poolclass": StaticPool} if memory else {"pool_size": 20, "max_overflow": 40,
                                                                           "pool_timeout": 60}))

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not pysqlite, emit BEGIN (pysqlite would defer it, see below).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # Take the write lock when the transaction starts, not at its first write. Every
            # transaction is then serialized against every other writer, so a read-then-write
            # (count devices, insert one) cannot interleave with another, and no deadlock-prone
            # lock upgrade happens mid-transaction. Waiters block on busy_timeout.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if backend == "postgresql":
        # pool_size matches the 40 threads that run a worker's (sync) endpoints: with 20, a busy
        # worker opened and closed overflow connections all the time (a PostgreSQL backend forked
        # per connection). At most 60 connections per process, as before.
        engine = create_engine(url, echo=echo, pool_size=40, max_overflow=20, pool_timeout=60)
        _ping_when_idle(engine)
        return engine
    raise UsageError(f"database {backend!r} is not supported", hint="use sqlite:///PATH or postgresql+psycopg://...")


#: A pooled connection that sat unused this long is pinged before it is handed out again.
PING_AFTER_IDLE = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """Like ``pool_pre_ping``, which costs a round trip on every checkout (five per setup), but
    only for connections that sat in the pool for :data:`PING_AFTER_IDLE` seconds: those are the
    ones a database restart or an idle timeout may have closed. A connection in steady use is
    not pinged; if the database went away meanwhile, the statement fails (the request gets 503)
    and SQLAlchemy discards the pool's connections, as it would after the ping."""

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < PING_AFTER_IDLE:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as e:  # the pool replaces the connection and tries again
            raise DisconnectionError("a pooled database connection is closed") from e


MIGRATIONS = Path(__file__).with_name("migrations")
#: The revision whose schema mlcapsule 0.1.0 created with ``create_all`` (no version table).
LEGACY_REVISION = "0001"
_PG_MIGRATION_LOCK = 0x6D6C6361  # pg_advisory_xact_lock key: one migrating process at a time


def alembic_config(connection: Any = None) -> Any:
    """Alembic's configuration for the server's migrations (no alembic.ini)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def schema_revisions(engine: Engine) -> tuple[str | None, str]:
    """(the database's schema revision or None, the revision this mlcapsule expects)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision(), head


def migrate(engine: Engine) -> str:
    """Bring the database to this mlcapsule's schema (Alembic revisions in ``migrations/``)
    and return its revision. An empty database gets every table; a database of mlcapsule 0.1.0
    (tables, no version table) is recognised and carried forward; a database whose revision
    this mlcapsule does not know (made by a newer one) is refused, unchanged. Runs in one
    transaction, serialized against other processes doing the same (``BEGIN IMMEDIATE`` on
    SQLite, an advisory lock on PostgreSQL). An unreachable database raises TransportError."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    assert head is not None
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
            current = MigrationContext.configure(conn).get_current_revision()
            if current == head:
                return head
            if current is not None:
                try:
                    script.get_revision(current)
                except CommandError:
                    raise UsageError(
                        f"the database's schema is at revision {current!r}, which this mlcapsule does not know "
                        f"(it expects {head!r}): a newer mlcapsule has used this database",
                        hint="upgrade mlcapsule on this server; the database was left unchanged") from None
            cfg = alembic_config(conn)
            if current is None and inspect(conn).has_table("accounts"):
                command.stamp(cfg, LEGACY_REVISION)  # made by mlcapsule 0.1.0's create_all
            command.upgrade(cfg, "head")
        return head
    except OperationalError as e:
        reason = str(getattr(e, "orig", e)).strip().splitlines()[0][:200]
        raise TransportError(f"cannot use the database {engine.url.render_as_string(hide_password=True)}: {reason}",
                             hint="check --database-url, and that the database server is running") from e


def create_schema(engine: Engine) -> None:
    """Create or upgrade the schema: :func:`migrate`."""
    migrate(engine)


def session_factory(engine: Engine) -> sessionmaker[Any]:
    return sessionmaker(engine, expire_on_commit=False)
