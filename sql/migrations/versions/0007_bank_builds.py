"""Bank builds apart from set changes: ``bank_version`` (the set version the stored bank was built for; the bank
is current when it equals ``version``) and ``build_error`` (why the current version's build failed, else NULL).
Existing sets' banks were built with their change: ``bank_version = version``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 03:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('reference_sets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('bank_version', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('build_error', sa.Text(), nullable=True))
    op.execute("UPDATE reference_sets SET bank_version = version")


def downgrade() -> None:
    with op.batch_alter_table('reference_sets', schema=None) as batch_op:
        batch_op.drop_column('build_error')
        batch_op.drop_column('bank_version')
