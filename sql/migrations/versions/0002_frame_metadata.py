"""Frame metadata (wire v2 METADATA section): the source file's name and the labels, filterable in search.

``frames.source`` (text, at most 255) and ``frames.labels`` (JSON text on SQLite, filtered with json_extract; JSONB
with a GIN index on PostgreSQL, so that a label filter ``labels @> '{"lot": "17"}'`` is an index scan). Rows stored before stay
NULL in both.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == 'postgresql'
    with op.batch_alter_table('frames', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('labels', JSONB() if postgres else sa.JSON(), nullable=True))
    if postgres:
        op.create_index('ix_frames_labels', 'frames', ['labels'], postgresql_using='gin')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.drop_index('ix_frames_labels', table_name='frames')
    with op.batch_alter_table('frames', schema=None) as batch_op:
        batch_op.drop_column('labels')
        batch_op.drop_column('source')
