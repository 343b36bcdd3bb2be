"""idempotent provisioning: the request and the answer kept with each device

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05

Issue 15, part 2. ``nonces.request_sha256`` binds a used challenge to the one request that used
it; ``devices.nonce`` (unique index), ``request_sha256``, ``answer_payload`` and
``answer_credential`` keep the sealed answer, so a client that retries the identical request
after a lost answer gets it again instead of spending a second device slot. Plain ADD COLUMN and
CREATE INDEX (no table copy), so SQLite databases with vouchers and alarms upgrade in place.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('nonces', sa.Column('request_sha256', sa.String(length=64), nullable=True))
    op.add_column('devices', sa.Column('nonce', sa.LargeBinary(length=32), nullable=True))
    op.add_column('devices', sa.Column('request_sha256', sa.String(length=64), nullable=True))
    op.add_column('devices', sa.Column('answer_payload', sa.LargeBinary(), nullable=True))
    op.add_column('devices', sa.Column('answer_credential', sa.JSON(), nullable=True))
    op.create_index('ux_devices_nonce', 'devices', ['nonce'], unique=True)


def downgrade() -> None:
    op.drop_index('ux_devices_nonce', table_name='devices')
    for column in ('answer_credential', 'answer_payload', 'request_sha256', 'nonce'):
        op.drop_column('devices', column)
    op.drop_column('nonces', 'request_sha256')
