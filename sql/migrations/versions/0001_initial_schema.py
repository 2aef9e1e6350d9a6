"""Initial schema: devices, models, frames, originals, dead letters, api tokens, counters.

On PostgreSQL the pgvector extension is created and the global embedding is a ``halfvec`` without a fixed
dimension; each registered model gets its own partial HNSW index at registration (``sql.store``).

Revision ID: 0001
Revises: 
Create Date: 2026-11-24 14:46:26.852130
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa
from pgvector.sqlalchemy import HALFVEC


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('CREATE EXTENSION IF NOT EXISTS vector')
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_us', sa.BigInteger(), nullable=False),
    sa.Column('revoked_us', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('token_sha256', name=op.f('uq_api_tokens_token_sha256'))
    )
    op.create_table('counters',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('worker', sa.String(length=128), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_counters')),
    sa.UniqueConstraint('worker', 'name', name=op.f('uq_counters_worker'))
    )
    op.create_table('dead_letters',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('received_us', sa.BigInteger(), nullable=False),
    sa.Column('topic', sa.Text(), nullable=False),
    sa.Column('reason', sa.String(length=64), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('payload', sa.LargeBinary(), nullable=False),
    sa.Column('payload_len', sa.BigInteger(), nullable=False),
    sa.Column('payload_sha256', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dead_letters'))
    )
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dead_letters_reason'), ['reason'], unique=False)
        batch_op.create_index(batch_op.f('ix_dead_letters_received_us'), ['received_us'], unique=False)

    op.create_table('devices',
    sa.Column('device', sa.String(length=64), nullable=False),
    sa.Column('site', sa.String(length=64), nullable=False),
    sa.Column('first_seen_us', sa.BigInteger(), nullable=False),
    sa.Column('last_seen_us', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('last_stats', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('device', name=op.f('pk_devices'))
    )
    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('hash16', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('embedding_dim', sa.Integer(), nullable=False),
    sa.Column('k', sa.Integer(), nullable=False),
    sa.Column('has_text', sa.Boolean(), nullable=False),
    sa.Column('manifest_json', sa.Text(), nullable=False),
    sa.Column('model_dir', sa.Text(), nullable=True),
    sa.Column('registered_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models')),
    sa.UniqueConstraint('hash16', name=op.f('uq_models_hash16'))
    )
    op.create_table('originals',
    sa.Column('frame_id', sa.String(length=32), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('location', sa.Text(), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('content_type', sa.String(length=64), nullable=False),
    sa.Column('stored_us', sa.BigInteger(), nullable=False),
    sa.Column('expires_us', sa.BigInteger(), nullable=False),
    sa.Column('legal_hold', sa.Boolean(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('deleted_us', sa.BigInteger(), nullable=True),
    sa.Column('deleted_reason', sa.String(length=32), nullable=True),
    sa.PrimaryKeyConstraint('frame_id', name=op.f('pk_originals'))
    )
    with op.batch_alter_table('originals', schema=None) as batch_op:
        batch_op.create_index('ix_originals_sha256', ['sha256'], unique=False)
        batch_op.create_index('ix_originals_state_stored', ['state', 'stored_us'], unique=False)

    op.create_table('frames',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('frame_id', sa.String(length=32), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('device', sa.String(length=64), nullable=False),
    sa.Column('site', sa.String(length=64), nullable=False),
    sa.Column('line', sa.String(length=64), nullable=False),
    sa.Column('camera', sa.String(length=64), nullable=False),
    sa.Column('capture_us', sa.BigInteger(), nullable=False),
    sa.Column('received_us', sa.BigInteger(), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('flags', sa.SmallInteger(), nullable=False),
    sa.Column('token_dtype', sa.String(length=8), nullable=False),
    sa.Column('k', sa.SmallInteger(), nullable=False),
    sa.Column('global_embedding', sa.LargeBinary().with_variant(HALFVEC(), 'postgresql'), nullable=False),
    sa.Column('tokens', sa.LargeBinary(), nullable=False),
    sa.Column('sizes', sa.LargeBinary(), nullable=False),
    sa.Column('centroids', sa.LargeBinary(), nullable=False),
    sa.Column('legal_hold', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_frames_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_frames')),
    sa.UniqueConstraint('frame_id', name=op.f('uq_frames_frame_id')),
    sqlite_autoincrement=True
    )
    with op.batch_alter_table('frames', schema=None) as batch_op:
        batch_op.create_index('ix_frames_model_ts', ['model_id', 'capture_us'], unique=False)
        batch_op.create_index('ix_frames_place_ts', ['site', 'line', 'camera', 'capture_us'], unique=False)
        batch_op.create_index('ix_frames_ts', ['capture_us'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('frames', schema=None) as batch_op:
        batch_op.drop_index('ix_frames_ts')
        batch_op.drop_index('ix_frames_place_ts')
        batch_op.drop_index('ix_frames_model_ts')

    op.drop_table('frames')
    with op.batch_alter_table('originals', schema=None) as batch_op:
        batch_op.drop_index('ix_originals_state_stored')
        batch_op.drop_index('ix_originals_sha256')

    op.drop_table('originals')
    op.drop_table('models')
    op.drop_table('devices')
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dead_letters_received_us'))
        batch_op.drop_index(batch_op.f('ix_dead_letters_reason'))

    op.drop_table('dead_letters')
    op.drop_table('counters')
    op.drop_table('api_tokens')
