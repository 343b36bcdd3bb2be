"""defenses: grant defenses, capsule defense policies, unlock vouchers, alarms and gaps

Revision ID: 0004
Revises: 0003
Create Date: 2027-01-15

Issue 12. ``grants.defenses`` holds the defense specs a grant adds (carried in each license it
issues); ``capsules.defense_policy`` the capsule's signed policy, read at registration (NULL for
a capsule registered before this revision), against which a grant is checked. ``vouchers.kind``:
unlock vouchers are numbered in the same sequence as top-ups ('topup' or 'unlock'). Per device:
``unlock_seq`` (the last unlock voucher issued), ``defense_gaps`` and ``gap_queries`` (from
``defense-gap`` receipts) and ``defense_summary`` (the latest defense counters a receipt
carried). The ``alarms`` table holds each alarm of the ``alarm`` receipts.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('capsules', schema=None) as batch_op:
        batch_op.add_column(sa.Column('defense_policy', sa.JSON(), nullable=True))
    with op.batch_alter_table('grants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('defenses', sa.JSON(), nullable=True))
    with op.batch_alter_table('vouchers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), server_default='topup', nullable=False))
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('unlock_seq', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('defense_gaps', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('gap_queries', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('defense_summary', sa.JSON(), nullable=True))
    op.create_table('alarms',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('device_pk', sa.Integer(), nullable=False),
    sa.Column('receipt_seq', sa.BigInteger(), nullable=False),
    sa.Column('receipt_hash', sa.String(length=64), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('detector', sa.String(length=64), nullable=False),
    sa.Column('query', sa.BigInteger(), nullable=False),
    sa.Column('statistic', sa.Float(), nullable=True),
    sa.Column('threshold', sa.Float(), nullable=True),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('signed_time', sa.String(length=64), nullable=False),
    sa.Column('received', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['device_pk'], ['devices.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('device_pk', 'receipt_hash', 'position')
    )


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35 has it): a batch would copy and drop the referenced
    # tables, which SQLite's foreign keys refuse once devices and vouchers exist.
    op.drop_table('alarms')
    for column in ('defense_summary', 'gap_queries', 'defense_gaps', 'unlock_seq'):
        op.drop_column('devices', column)
    op.drop_column('vouchers', 'kind')
    op.drop_column('grants', 'defenses')
    op.drop_column('capsules', 'defense_policy')
