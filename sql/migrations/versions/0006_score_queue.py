"""Score queue: frames of cameras with a reference set that ingest stored and the scorer has not scored yet.

Ingest inserts a row in the frame's transaction, the scorer deletes it in the transaction that stores the frame's
score (``central.anomaly.scoring``); scoring runs beside ingest instead of in it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 19:50:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'score_queue',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('frame_id', sa.String(length=32), nullable=False),
        sa.Column('queued_us', sa.BigInteger(), nullable=False),
        sa.Column('edge_set_id', sa.Integer(), nullable=True),
        sa.Column('edge_set_version', sa.Integer(), nullable=True),
        sa.Column('edge_score', sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_score_queue')),
    )


def downgrade() -> None:
    op.drop_table('score_queue')
