"""devices: rollbacks and forks

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

The provider sees every rollback: ``rollbacks`` counts the ``rollback`` receipts the enclave
signed when it found its state restored from an older copy, ``forks`` the uploads whose receipt
chain forked from the one the server holds.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rollbacks', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('forks', sa.BigInteger(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_column('forks')
        batch_op.drop_column('rollbacks')
