"""The server's schema is managed by Alembic revisions (src/mlcapsule/server/migrations): a new
database gets them all, a database of mlcapsule 0.1.0 (create_all, no version table) is carried
forward with its data, and a database from a newer mlcapsule is refused unchanged. On SQLite and
on a real PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select, text

from _server_support import db_url  # noqa: F401  (fixture)
from pg import pg_server, pg_url  # noqa: F401  (fixtures)
from mlcapsule.enclave.errors import UsageError
from mlcapsule.server.db import (LEGACY_REVISION, Account, Base, make_engine, migrate, schema_revisions,
                                 session_factory)


def test_a_new_database_gets_every_table_and_matches_the_models(db_url: str) -> None:  # noqa: F811
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(db_url)
    try:
        head = migrate(engine)
        assert schema_revisions(engine) == (head, head)
        with engine.connect() as conn:
            # The revisions build exactly the schema the models describe: a model changed
            # without a revision fails here.
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diffs == []
        assert migrate(engine) == head  # idempotent
    finally:
        engine.dispose()


def test_a_database_made_by_mlcapsule_0_1_0_is_carried_forward_with_its_data(db_url: str) -> None:  # noqa: F811
    engine = make_engine(db_url)
    try:
        # What 0.1.0 made with create_all: the schema of revision 0001 and no version table.
        from alembic import command

        from mlcapsule.server.db import alembic_config

        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), LEGACY_REVISION)
            conn.execute(text("DROP TABLE alembic_version"))
        with session_factory(engine)() as s, s.begin():
            s.add(Account(name="alice", token_hash="ab" * 32, created=dt.datetime.now(dt.timezone.utc)))
        assert schema_revisions(engine)[0] is None
        head = migrate(engine)
        current, _ = schema_revisions(engine)
        assert current == head and LEGACY_REVISION < head  # and every later revision ran
        with session_factory(engine)() as s:
            assert [a.name for a in s.scalars(select(Account))] == ["alice"]
    finally:
        engine.dispose()


def test_a_database_from_a_newer_mlcapsule_is_refused_unchanged(db_url: str) -> None:  # noqa: F811
    engine = make_engine(db_url)
    try:
        migrate(engine)
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
        with pytest.raises(UsageError, match="does not know") as e:
            migrate(engine)
        assert "upgrade mlcapsule" in e.value.hint
        assert schema_revisions(engine)[0] == "9999_from_the_future"
    finally:
        engine.dispose()


def test_admin_migrate_reports_what_it_did(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from mlcapsule.cli.main import cli

    monkeypatch.setenv("MLCAPSULE_HOME", str(tmp_path / "home"))
    url = f"sqlite:///{tmp_path / 'm.db'}"
    first = CliRunner().invoke(cli, ["admin", "migrate", "--database-url", url])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(cli, ["admin", "migrate", "--database-url", url])
    _, head = schema_revisions(make_engine(url))
    assert "set up" in first.output and head in first.output and "nothing to do" in again.output
