"""PostgreSQL frame segments: which one is hot, sealing it, building its ANN indexes once, and dropping it.

``frames`` is partitioned by ``segment`` (migration 0003). New frames go to the one *hot* segment (no ANN
index: COPY runs at full speed, search scans it exactly). Sealing makes the next segment hot under an
exclusive advisory lock that every ingest transaction holds shared, so no transaction can still write the
sealed segment afterwards; its statistics (rows, capture and frame-id ranges) are then fixed, and its
per-model HNSW index is built once, in the background (``CREATE INDEX CONCURRENTLY``, parallel workers,
``maintenance_work_mem`` sized to the segment). Until that index is valid the segment is ``sealing`` and
still searched exactly. Segment 0 (``kept``) holds frames that outlive their segment (legal holds, lines with
a longer retention): small, searched exactly. Retention drops whole sealed segments (``central.retention``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from sqlalchemy import Connection, Engine, text

from central.config import SegmentsConfig

log = logging.getLogger(__name__)

KEPT = 0  # the segment of frames kept past their own segment's life
HOT_LOCK = 0x746B6C6E  # shared by every ingest transaction (tokenline_hot_segment()), exclusive while sealing
MAINTAINER_LOCK = HOT_LOCK + 1  # session lock: one maintainer per database
EXACT_STATES = ("kept", "hot", "sealing")  # searched by a scan
CLOSED_STATES = ("sealing", "sealed")  # written no more: statistics fixed, dropped whole by retention


@dataclass(frozen=True)
class Segment:
    id: int
    state: str  # kept | hot | sealing | sealed
    created_us: int
    rows: Optional[int]
    min_capture_us: Optional[int]
    max_capture_us: Optional[int]
    min_frame_id: Optional[str]
    max_frame_id: Optional[str]
    index_kind: Optional[str]

    @property
    def exact(self) -> bool:
        """Searched by a scan (no ANN index yet, or none planned)."""
        return self.state in EXACT_STATES or self.index_kind is None

    def may_hold(self, since_us: Optional[int], until_us: Optional[int]) -> bool:
        """False when the segment's fixed capture range misses ``[since_us, until_us)`` (open segments: True)."""
        if self.state in EXACT_STATES or self.rows is None:
            return True
        if self.rows == 0 or self.min_capture_us is None or self.max_capture_us is None:
            return False
        return not ((since_us is not None and self.max_capture_us < since_us)
                    or (until_us is not None and self.min_capture_us >= until_us))


def now_us() -> int:
    return time.time_ns() // 1000


def partition(seg: int) -> str:
    return f"frames_s{int(seg)}"


def index_name(seg: int, model_id: int) -> str:
    return f"ix_frames_s{int(seg)}_ann_m{int(model_id)}"


def list_segments(conn: Connection) -> List[Segment]:
    rows = conn.execute(text("SELECT id, state, created_us, rows, min_capture_us, max_capture_us, min_frame_id, "
                             "max_frame_id, index_kind FROM frame_segments ORDER BY id")).all()
    return [Segment(*r) for r in rows]


def hot_segment(conn: Connection) -> int:
    """The hot segment, with the shared hot lock held until the caller's transaction ends."""
    return int(conn.execute(text("SELECT tokenline_hot_segment()")).scalar_one())


# -- ANN index kinds: the index DDL and the ORDER BY that uses it -------------------------------------------------
def ann_order(kind: str, dim: int, q: str = ":q") -> str:
    """The ORDER BY expression an index of ``kind`` answers (``q`` is a halfvec text parameter)."""
    d = int(dim)
    if kind == "bit":
        return f"binary_quantize(global_embedding)::bit({d}) <~> binary_quantize(CAST({q} AS halfvec({d})))::bit({d})"
    return f"global_embedding::halfvec({d}) <=> CAST({q} AS halfvec({d}))"


def index_ddl(kind: str, seg: int, model_id: int, dim: int, m: int, ef_construction: int) -> str:
    d = int(dim)
    expr, ops = (f"(binary_quantize(global_embedding)::bit({d}))", "bit_hamming_ops") if kind == "bit" else \
        (f"(global_embedding::halfvec({d}))", "halfvec_cosine_ops")
    return (f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {index_name(seg, model_id)} ON {partition(seg)} USING hnsw "
            f"({expr} {ops}) WITH (m = {int(m)}, ef_construction = {int(ef_construction)}) "
            f"WHERE model_id = {int(model_id)}")


def build_memory_mb(kind: str, rows: int, dim: int, m: int, cap_mb: int) -> int:
    """``maintenance_work_mem`` for an HNSW build over ``rows`` vectors: the graph must fit, or the build slows
    down many times (pgvector warns). Vector bytes plus about 2m neighbour slots of 8 bytes and some overhead,
    with 30 % headroom; at least 64 MB, at most ``cap_mb``."""
    vec = (dim + 7) // 8 if kind == "bit" else 2 * dim
    need = rows * (vec + 16 * m + 96) * 1.3 / 2**20
    return int(max(64, min(cap_mb, need)))


# -- lifecycle -------------------------------------------------------------------------------------------------
def _ensure_partition(engine: Engine, seg: int) -> None:
    """Create and attach ``frames_s<seg>`` (CREATE + ATTACH: only a SHARE UPDATE EXCLUSIVE lock on ``frames``,
    so ingest and search go on while it happens)."""
    name = partition(seg)
    with engine.begin() as c:
        c.execute(text("SET LOCAL lock_timeout = '10s'"))
        attached = c.execute(text("SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                  "WHERE c.relname = :n"), {"n": name}).first()
        if attached:
            return
        c.execute(text(f"CREATE TABLE IF NOT EXISTS {name} (LIKE frames INCLUDING DEFAULTS)"))
        c.execute(text(f"ALTER TABLE frames ATTACH PARTITION {name} FOR VALUES IN ({int(seg)})"))


def seal(engine: Engine, now: Optional[int] = None) -> Optional[int]:
    """Make a new segment hot and seal the current one; returns the sealed segment's id (None when another
    process sealed it first).

    Waits (exclusive hot lock) for the ingest transactions that hold the old segment, so none writes to it
    afterwards; then records its rows and capture / frame-id ranges, which stay fixed from here on."""
    now = now_us() if now is None else now
    with engine.connect() as c:
        old, nxt = c.execute(text("SELECT (SELECT id FROM frame_segments WHERE state = 'hot'), "
                                  "max(id) + 1 FROM frame_segments")).one()
    _ensure_partition(engine, nxt)
    with engine.begin() as c:
        c.execute(text("SET LOCAL lock_timeout = '60s'"))
        c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": HOT_LOCK})
        hot = int(c.execute(text("SELECT id FROM frame_segments WHERE state = 'hot' FOR UPDATE")).scalar_one())
        if hot != old:
            return None
        c.execute(text("UPDATE frame_segments SET state = 'sealing', sealed_us = :t WHERE id = :i"), {"t": now, "i": old})
        c.execute(text("INSERT INTO frame_segments (id, state, created_us) VALUES (:i, 'hot', :t)"), {"i": nxt, "t": now})
    with engine.begin() as c:
        st = c.execute(text(f"SELECT count(*), min(capture_us), max(capture_us), min(frame_id), max(frame_id) "
                            f"FROM {partition(old)}")).one()
        c.execute(text("UPDATE frame_segments SET rows = :n, min_capture_us = :a, max_capture_us = :b, "
                       "min_frame_id = :fa, max_frame_id = :fb WHERE id = :i"),
                  {"n": int(st[0]), "a": st[1], "b": st[2], "fa": st[3], "fb": st[4], "i": old})
    log.info("segment %d sealed (%d frames); segment %d is hot", old, int(st[0]), nxt)
    return int(old)


def build_indexes(engine: Engine, cfg: SegmentsConfig, kind: Optional[str] = None) -> List[int]:
    """Build the ANN index of every ``sealing`` segment (one per model present), oldest first; returns the
    segments that became ``sealed``. Idempotent: an index left invalid by a crash is dropped and rebuilt."""
    kind = kind or cfg.index
    done = []
    with engine.connect() as c:
        pending = [s for s in list_segments(c) if s.state == "sealing" and s.rows is not None]
        dims: Dict[int, int] = dict(c.execute(text("SELECT id, embedding_dim FROM models")).all())
    for seg in pending:
        name = partition(seg.id)
        with engine.connect() as c:
            per_model = c.execute(text(f"SELECT model_id, count(*) FROM {name} GROUP BY model_id")).all()
        raw = engine.raw_connection()
        # out of the pool for good: this connection is switched to autocommit (CONCURRENTLY needs it) and carries
        # session settings, and the pool would hand it back as it is, so that later "transactions" on it ran
        # statement by statement (SET LOCAL lost, the hot lock released at once)
        dbc = raw.driver_connection
        raw.detach()
        try:
            dbc.autocommit = True
            cur = dbc.cursor()
            for model_id, n in per_model:
                dim = dims[int(model_id)]
                if dim > 4000 and kind == "halfvec":
                    log.warning("segment %d model %d: dim %d > 4000, no halfvec index; searched exactly",
                                seg.id, model_id, dim)
                    continue
                iname = index_name(seg.id, model_id)
                valid = cur.execute("SELECT x.indisvalid FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid "
                                    "WHERE c.relname = %s", (iname,)).fetchone()
                if valid is not None and not valid[0]:
                    cur.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {iname}")
                mb = build_memory_mb(kind, int(n), dim, cfg.hnsw_m, cfg.maintenance_work_mem_max_mb)
                cur.execute(f"SET maintenance_work_mem = '{mb}MB'")
                cur.execute(f"SET max_parallel_maintenance_workers = {int(cfg.build_workers)}")
                t0 = now_us()
                cur.execute(index_ddl(kind, seg.id, int(model_id), dim, cfg.hnsw_m, cfg.hnsw_ef_construction))
                log.info("segment %d model %d: %s index over %d frames in %.1f s (maintenance_work_mem %d MB)",
                         seg.id, model_id, kind, n, (now_us() - t0) / 1e6, mb)
            cur.execute("UPDATE frame_segments SET state = 'sealed', indexed_us = %s, index_kind = %s WHERE id = %s",
                        (now_us(), kind, seg.id))
        finally:
            raw.close()
        done.append(seg.id)
    return done


def hot_rows(engine: Engine) -> int:
    """Frames in the hot segment, from the statistics collector (cheap; updated as transactions end)."""
    with engine.connect() as c:
        hot = c.execute(text("SELECT id FROM frame_segments WHERE state = 'hot'")).scalar_one()
        n = c.execute(text("SELECT n_tup_ins - n_tup_del FROM pg_stat_user_tables WHERE relname = :n"),
                      {"n": partition(hot)}).scalar()
    return int(n or 0)


def seal_due(engine: Engine, cfg: SegmentsConfig, now: Optional[int] = None) -> bool:
    now = now_us() if now is None else now
    with engine.connect() as c:
        created = int(c.execute(text("SELECT created_us FROM frame_segments WHERE state = 'hot'")).scalar_one())
    rows = hot_rows(engine)
    return rows >= cfg.seal_rows or (rows > 0 and now - created >= cfg.seal_max_age_s * 1e6)


class SegmentMaintainer:
    """Background threads of ``serve`` and ``ingest`` on PostgreSQL: one seals the hot segment when it is full or
    old, another builds the sealed segments' indexes (a build takes minutes; sealing must not wait for it). One
    process per database is active (a session advisory lock); the others wait to take over."""

    def __init__(self, engine: Engine, cfg: SegmentsConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self.stop_event = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def run_once(self) -> None:
        if seal_due(self.engine, self.cfg):
            seal(self.engine)
        build_indexes(self.engine, self.cfg)

    def _loop(self, fn, stop: threading.Event) -> None:
        while not stop.wait(self.cfg.check_interval_s):
            try:
                fn()
            except Exception:  # noqa: BLE001 - retried at the next interval; ingest and search go on without it
                log.exception("segment maintenance failed; retrying")

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                with self.engine.connect() as lock_conn:
                    if not lock_conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": MAINTAINER_LOCK}).scalar():
                        lock_conn.rollback()
                        self.stop_event.wait(self.cfg.check_interval_s * 5)
                        continue
                    lock_conn.commit()
                    builder = threading.Thread(target=self._loop, name="segment-builds", daemon=True,
                                               args=(lambda: build_indexes(self.engine, self.cfg), self.stop_event))
                    builder.start()
                    try:
                        self._loop(lambda: seal(self.engine) if seal_due(self.engine, self.cfg) else None,
                                   self.stop_event)
                    finally:
                        builder.join()
                        lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MAINTAINER_LOCK})
                        lock_conn.commit()
            except Exception:  # noqa: BLE001 - e.g. the database restarted: take the lock again
                log.exception("segment maintainer lost its connection; retrying")
                self.stop_event.wait(self.cfg.check_interval_s * 5)

    def start(self) -> "SegmentMaintainer":
        self.thread = threading.Thread(target=self._run, name="segments", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(10)
