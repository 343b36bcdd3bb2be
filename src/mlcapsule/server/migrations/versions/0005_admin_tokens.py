"""admin tokens: the admin API's hashed, role-scoped tokens

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

Issue 15, part 3. ``admin_tokens`` holds the SHA-256 of each admin API token (never the token),
its name, its role (``read`` or ``operator``) and when it was revoked.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('admin_tokens',
                    sa.Column('id', sa.Integer(), nullable=False),
                    sa.Column('name', sa.String(length=128), nullable=False),
                    sa.Column('role', sa.String(length=16), nullable=False),
                    sa.Column('token_hash', sa.String(length=64), nullable=False),
                    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
                    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
                    sa.PrimaryKeyConstraint('id'),
                    sa.UniqueConstraint('name'),
                    sa.UniqueConstraint('token_hash'))


def downgrade() -> None:
    op.drop_table('admin_tokens')
