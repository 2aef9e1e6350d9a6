"""Summary footprints: each frame's footprint (which summary token stands for each cell of the model input) and
the frame's geometry (size, ROI) from the wire's metadata; both NULL for frames of models without a footprint
and for version-1 messages.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 18:30:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('frames', schema=None) as batch_op:
        batch_op.add_column(sa.Column('footprint', sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column('geometry', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('frames', schema=None) as batch_op:
        batch_op.drop_column('geometry')
        batch_op.drop_column('footprint')
