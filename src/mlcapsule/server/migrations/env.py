"""Alembic environment for the provider server's database.

Run by :func:`mlcapsule.server.db.migrate` with an open connection (``config.attributes
["connection"]``); there is no alembic.ini and no offline (SQL script) mode. Developers add a
revision with ``alembic -c <(echo) revision`` equivalents through :func:`mlcapsule.server.db.
alembic_config` (see docs/design.md, "Provider server").
"""

from __future__ import annotations

from alembic import context

from mlcapsule.server.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("mlcapsule's migrations run through mlcapsule.server.db.migrate(engine)")
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
with context.begin_transaction():
    context.run_migrations()
