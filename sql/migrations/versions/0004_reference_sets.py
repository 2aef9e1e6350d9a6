"""Reference sets (their frames and memory banks) and frames' anomaly scores (issue 15).

Both dialects. ``frame_scores`` has no foreign key to ``frames`` (a partitioned ``frames`` on PostgreSQL cannot be
referenced by ``frame_id`` alone); the retention sweep drops scores whose frames it deleted.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 18:30:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('reference_sets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('site', sa.String(length=64), nullable=False),
    sa.Column('line', sa.String(length=64), nullable=False),
    sa.Column('camera', sa.String(length=64), nullable=False),
    sa.Column('mode', sa.String(length=16), nullable=False),
    sa.Column('threshold_mode', sa.String(length=16), nullable=False),
    sa.Column('quantile', sa.Float(), nullable=False),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('frame_count', sa.Integer(), nullable=False),
    sa.Column('bank_tokens', sa.Integer(), nullable=False),
    sa.Column('bank', sa.LargeBinary(), nullable=False),
    sa.Column('created_us', sa.BigInteger(), nullable=False),
    sa.Column('updated_us', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_reference_sets_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reference_sets')),
    sa.UniqueConstraint('model_id', 'site', 'line', 'camera', name='uq_reference_sets_camera')
    )
    op.create_table('reference_frames',
    sa.Column('set_id', sa.Integer(), nullable=False),
    sa.Column('frame_id', sa.String(length=32), nullable=False),
    sa.ForeignKeyConstraint(['set_id'], ['reference_sets.id'], name=op.f('fk_reference_frames_set_id_reference_sets'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('set_id', 'frame_id', name=op.f('pk_reference_frames'))
    )
    op.create_table('frame_scores',
    sa.Column('frame_id', sa.String(length=32), nullable=False),
    sa.Column('set_id', sa.Integer(), nullable=False),
    sa.Column('set_version', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('site', sa.String(length=64), nullable=False),
    sa.Column('line', sa.String(length=64), nullable=False),
    sa.Column('camera', sa.String(length=64), nullable=False),
    sa.Column('capture_us', sa.BigInteger(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('flagged', sa.Boolean(), nullable=False),
    sa.Column('token', sa.SmallInteger(), nullable=False),
    sa.Column('x0', sa.Float(), nullable=False),
    sa.Column('y0', sa.Float(), nullable=False),
    sa.Column('x1', sa.Float(), nullable=False),
    sa.Column('y1', sa.Float(), nullable=False),
    sa.Column('mask', sa.LargeBinary(), nullable=True),
    sa.Column('grid_h', sa.SmallInteger(), nullable=True),
    sa.Column('grid_w', sa.SmallInteger(), nullable=True),
    sa.Column('edge_score', sa.Float(), nullable=True),
    sa.Column('scored_us', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['set_id'], ['reference_sets.id'], name=op.f('fk_frame_scores_set_id_reference_sets'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('frame_id', name=op.f('pk_frame_scores'))
    )
    with op.batch_alter_table('frame_scores', schema=None) as batch_op:
        batch_op.create_index('ix_frame_scores_flagged_ts', ['flagged', 'capture_us'], unique=False)
        batch_op.create_index('ix_frame_scores_place_score', ['site', 'line', 'camera', 'score'], unique=False)
        batch_op.create_index('ix_frame_scores_place_ts', ['site', 'line', 'camera', 'capture_us'], unique=False)
        batch_op.create_index('ix_frame_scores_set', ['set_id', 'set_version'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('frame_scores', schema=None) as batch_op:
        batch_op.drop_index('ix_frame_scores_set')
        batch_op.drop_index('ix_frame_scores_place_ts')
        batch_op.drop_index('ix_frame_scores_place_score')
        batch_op.drop_index('ix_frame_scores_flagged_ts')
    op.drop_table('frame_scores')
    op.drop_table('reference_frames')
    op.drop_table('reference_sets')
