"""index nonces by account

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

/v1/challenge counts the open challenges of an account on every call (at most
``max_open_challenges``): without this index that is a scan of the nonces table.
"""

from __future__ import annotations

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('nonces', schema=None) as batch_op:
        batch_op.create_index('ix_nonces_account_id', ['account_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('nonces', schema=None) as batch_op:
        batch_op.drop_index('ix_nonces_account_id')
