"""PostgreSQL: ``frames`` becomes a table partitioned by segment (LIST on ``segment``), with ``frame_segments``.

New frames go to the one *hot* segment, which has no ANN index and is searched exactly; a sealed segment gets
its per-model HNSW index built once (``central.segments``) and is dropped whole by retention. Segment 0 keeps
frames that must outlive their segment (legal holds, lines with a longer retention). ``frame_id`` is unique
per segment (the key of a partitioned table must include the partition key); ingest checks the other
segments under the hot-segment lock, so it stays unique across all of them (``central.store.insert_frames``).

``segment`` defaults to ``tokenline_hot_segment()``, which also takes the shared advisory lock that sealing
waits for, so any insert (COPY or INSERT) lands in a segment that is still hot when it commits.
SQLite keeps its single table: this revision changes nothing there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 17:00:00
"""
from __future__ import annotations

import time

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

HOT_LOCK = 0x746B6C6E  # advisory lock: ingest holds it shared per transaction, sealing takes it exclusively


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    now = time.time_ns() // 1000
    op.execute("""
        CREATE TABLE frame_segments (
            id BIGINT PRIMARY KEY,
            state VARCHAR(16) NOT NULL,          -- kept | hot | sealing | sealed
            created_us BIGINT NOT NULL,
            sealed_us BIGINT,
            indexed_us BIGINT,
            index_kind VARCHAR(16),              -- halfvec | bit once its ANN indexes are built
            rows BIGINT,
            min_capture_us BIGINT,
            max_capture_us BIGINT,
            min_frame_id VARCHAR(32),
            max_frame_id VARCHAR(32))""")
    op.execute(f"INSERT INTO frame_segments (id, state, created_us) VALUES (0, 'kept', {now}), (1, 'hot', {now})")
    op.execute(f"""
        CREATE FUNCTION tokenline_hot_segment() RETURNS BIGINT LANGUAGE sql VOLATILE AS $$
            SELECT pg_advisory_xact_lock_shared({HOT_LOCK});
            SELECT id FROM frame_segments WHERE state = 'hot';
        $$""")
    op.execute("ALTER TABLE frames RENAME TO frames_unpartitioned")
    op.execute("""
        CREATE TABLE frames (LIKE frames_unpartitioned INCLUDING DEFAULTS,
                             segment BIGINT NOT NULL DEFAULT tokenline_hot_segment())
        PARTITION BY LIST (segment)""")
    for seg in (0, 1):
        op.execute(f"CREATE TABLE frames_s{seg} (LIKE frames INCLUDING DEFAULTS)")
        op.execute(f"ALTER TABLE frames ATTACH PARTITION frames_s{seg} FOR VALUES IN ({seg})")
    op.execute("INSERT INTO frames SELECT f.*, CASE WHEN f.legal_hold THEN 0 ELSE 1 END FROM frames_unpartitioned f")
    op.execute("ALTER SEQUENCE frames_id_seq OWNED BY NONE")
    op.execute("DROP TABLE frames_unpartitioned")  # its per-model HNSW indexes go with it
    op.execute("ALTER SEQUENCE frames_id_seq OWNED BY frames.id")
    op.execute("ALTER SEQUENCE frames_id_seq CACHE 100")  # several ingest workers take ids at once
    op.execute("ALTER TABLE frames ADD CONSTRAINT pk_frames PRIMARY KEY (id, segment)")
    op.execute("ALTER TABLE frames ADD CONSTRAINT uq_frames_frame_id UNIQUE (frame_id, segment)")
    op.execute("ALTER TABLE frames ADD CONSTRAINT fk_frames_model_id_models FOREIGN KEY (model_id) REFERENCES models (id)")
    op.execute("CREATE INDEX ix_frames_place_ts ON frames (site, line, camera, capture_us)")
    op.execute("CREATE INDEX ix_frames_ts ON frames (capture_us)")
    op.execute("CREATE INDEX ix_frames_labels ON frames USING gin (labels)")  # 0002's label filter index


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute("CREATE TABLE frames_plain (LIKE frames INCLUDING DEFAULTS)")
    op.execute("INSERT INTO frames_plain SELECT * FROM frames")
    op.execute("ALTER TABLE frames_plain DROP COLUMN segment")
    op.execute("ALTER SEQUENCE frames_id_seq OWNED BY NONE")
    op.execute("DROP TABLE frames")
    op.execute("ALTER TABLE frames_plain RENAME TO frames")
    op.execute("ALTER SEQUENCE frames_id_seq OWNED BY frames.id")
    op.execute("ALTER TABLE frames ADD CONSTRAINT pk_frames PRIMARY KEY (id)")
    op.execute("ALTER TABLE frames ADD CONSTRAINT uq_frames_frame_id UNIQUE (frame_id)")
    op.execute("ALTER TABLE frames ADD CONSTRAINT fk_frames_model_id_models FOREIGN KEY (model_id) REFERENCES models (id)")
    op.execute("CREATE INDEX ix_frames_model_ts ON frames (model_id, capture_us)")
    op.execute("CREATE INDEX ix_frames_place_ts ON frames (site, line, camera, capture_us)")
    op.execute("CREATE INDEX ix_frames_ts ON frames (capture_us)")
    op.execute("CREATE INDEX ix_frames_labels ON frames USING gin (labels)")
    op.execute("DROP FUNCTION tokenline_hot_segment()")
    op.execute("DROP TABLE frame_segments")
    # 0001's per-model HNSW indexes (what register_model created then)
    bind = op.get_bind()
    for mid, dim in bind.exec_driver_sql("SELECT id, embedding_dim FROM models").all():
        if dim <= 4000:
            op.execute(f"CREATE INDEX ix_frames_hnsw_m{int(mid)} ON frames USING hnsw "
                       f"((global_embedding::halfvec({int(dim)})) halfvec_cosine_ops) WHERE model_id = {int(mid)}")
