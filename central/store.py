"""Data access for central: models registry, frames, originals' rows, holds, dead letters, API tokens, counters.

Every function takes a ``Session`` and never commits: the caller owns the session and its transaction
(``with Session(engine) as s, s.begin(): ...``), so several calls can share one transaction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from sqlalchemy import (BigInteger, and_, any_, bindparam, delete, func, insert, literal_column, or_, select, text,
                        type_coerce, union_all, update)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from central import segments
from central.errors import Conflict, Invalid, NotFound
from sql.db import is_postgres
from sql.models import ApiToken, Counter, DeadLetter, Device, Frame, Model, Original
from sql.types import (pack_f32, pack_footprint, pack_tokens, unpack_f32, unpack_f32_rows, unpack_footprint,
                       unpack_token_rows, unpack_tokens)
from tokenline.manifest import Manifest, SummarySpec
from tokenline.preprocess import FrameGeometry
from tokenline.summary import Summary

if TYPE_CHECKING:  # pragma: no cover
    from tokenline.wire import TokenMessage

log = logging.getLogger(__name__)

ROLES = ("viewer", "device", "admin")
FRAMES_DELETED = "frames_deleted"  # counter bumped in the transaction that deletes frame rows
FRAME_ID_RE = re.compile(r"^[0-9a-f]{32}$")  # a frame id as central's API and tables spell it


def now_us() -> int:
    return time.time_ns() // 1000


def check_frame_id(frame_id: str) -> str:
    """``frame_id`` when it is 32 lowercase hex characters (a UUIDv7), else ``Invalid``."""
    if not FRAME_ID_RE.match(frame_id):
        raise Invalid("frame_id must be 32 lowercase hex characters (a UUIDv7)", reason="bad_frame_id")
    return frame_id


# -- models registry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    id: int
    hash16: str
    name: str
    embedding_dim: int
    k: int
    has_text: bool
    model_dir: Optional[str]
    manifest: Manifest
    registered_us: int = 0

    @property
    def token_dim(self) -> int:
        """d, the summary tokens' dimension (``embedding_dim`` unless the summary head projects them)."""
        return self.manifest.summary.dim

    @property
    def has_footprint(self) -> bool:
        return self.manifest.has_footprint

    def public(self) -> Dict[str, Any]:
        s = self.manifest.summary
        return {"id": self.id, "hash": self.hash16, "short_hash": self.hash16[:8], "name": self.name,
                "embedding_dim": self.embedding_dim, "k": self.k, "has_text": self.has_text,
                "searchable": self.model_dir is not None, "family": self.manifest.family,
                "merge": self.manifest.merge.method, "registered_us": self.registered_us,
                "input": {"width": self.manifest.input.width, "height": self.manifest.input.height,
                          "resize": self.manifest.input.resize},
                "summary": {"method": s.method, "token_dim": s.dim, "layer": s.layer,
                            "footprint_grid": None if s.footprint_grid is None else list(s.footprint_grid),
                            "region_search": self.has_footprint}}


def _info(row: Model) -> ModelInfo:
    return ModelInfo(row.id, row.hash16, row.name, row.embedding_dim, row.k, row.has_text, row.model_dir,
                     Manifest.from_json(row.manifest_json, where=f"models[{row.id}]"), int(row.registered_us or 0))


def register_model(session: Session, manifest: Manifest, model_dir: Optional[str | Path] = None) -> ModelInfo:
    """Register (or update the directory of) a manifest.

    On PostgreSQL no index is made here: each sealed segment gets its own per-model ANN index
    (``central.segments``), so embeddings of different models (and widths) are never compared.
    """
    h = manifest.hash_bytes().hex()
    d = manifest.embedding_dim
    mdir = str(Path(model_dir).resolve()) if model_dir is not None else None
    row = session.scalar(select(Model).where(Model.hash16 == h))
    if row is None:
        row = Model(hash16=h, name=manifest.name, embedding_dim=d, k=manifest.summary.k,
                    has_text=manifest.text is not None, manifest_json=manifest.to_json(), model_dir=mdir,
                    registered_us=now_us())
        session.add(row)
        session.flush()
    elif mdir is not None:
        row.model_dir = mdir
    return _info(row)


def list_models(session: Session) -> List[ModelInfo]:
    return [_info(r) for r in session.scalars(select(Model).order_by(Model.id))]


def model_usage(session: Session) -> Dict[int, Tuple[int, Optional[int]]]:
    """``{model_id: (frames, last capture_us)}`` of the models that have frames (``ix_frames_model_ts``)."""
    rows = session.execute(select(Frame.model_id, func.count(), func.max(Frame.capture_us)).group_by(Frame.model_id))
    return {int(m): (int(n), None if t is None else int(t)) for m, n, t in rows}


def remove_model(session: Session, model_id: int, delete_frames: bool = False) -> int:
    """Unregister a model; returns how many of its frames were deleted. ``NotFound`` for an unknown id; ``Conflict``
    while frames use it and ``delete_frames`` is False (its embeddings would become unsearchable). Deleting frames
    bumps ``frames_deleted`` (search indexes drop them) and drops the model's HNSW index on PostgreSQL. Their
    originals stay until the retention policy deletes them."""
    row = session.get(Model, model_id)
    if row is None:
        raise NotFound(f"no model with id {model_id} (tokenline-central models list)")
    n = int(session.scalar(select(func.count()).select_from(Frame).where(Frame.model_id == model_id)) or 0)
    if n and not delete_frames:
        raise Conflict(f"model {model_id} ({row.name}) has {n} frame(s); remove them too with --delete-frames "
                       "(their originals expire by the retention policy) or keep the model")
    if n:
        session.execute(delete(Frame).where(Frame.model_id == model_id))
        add_counters(session, "models", {FRAMES_DELETED: n})
    if is_postgres(session.get_bind()):  # each sealed segment's HNSW index of this model
        for seg in segments.list_segments(session.connection()):
            session.execute(text(f"DROP INDEX IF EXISTS {segments.index_name(seg.id, model_id)}"))
    session.delete(row)
    session.flush()
    return n


# -- frames ------------------------------------------------------------------------------------------
def stored_tokens(msg: "TokenMessage") -> bytes:
    """The ``tokens`` blob of a message: its int8 or int4 rows as they arrived (no second rounding, int4 in half
    the bytes; ``sql.types.token_bits`` tells the layouts apart by length), other tokens (fp16) packed as int8.
    int4 rows of d = 1 are as long as int8 rows of d = 1, so those are widened to int8 (exactly)."""
    rows = msg.token_rows()
    if rows is None or (msg.token_dtype == "int4" and msg.summary.token_dim < 2):
        return pack_tokens(msg.summary.tokens)
    return rows


def frame_row(msg: "TokenMessage", model_id: int, received_us: int) -> Dict[str, Any]:
    """The ``frames`` row of a decoded, validated message (the footprint and the frame's geometry when it has them)."""
    fp, frame = msg.summary.footprint, (msg.metadata or {}).get("frame")
    return {
        "frame_id": msg.frame_id.hex(), "model_id": model_id, "device": msg.device, "site": msg.site,
        "line": msg.line, "camera": msg.camera, "capture_us": int(msg.capture_ts_us), "received_us": received_us,
        "seq": int(msg.seq), "flags": int(msg.flags), "token_dtype": msg.token_dtype,
        "k": msg.summary.k, "global_embedding": np.asarray(msg.summary.global_embedding, np.float32),
        "tokens": stored_tokens(msg),
        "sizes": pack_f32(msg.summary.sizes),
        "centroids": pack_f32(msg.summary.centroids),
        "legal_hold": False,
        "footprint": None if fp is None else pack_footprint(fp),
        "geometry": None if frame is None else json.dumps(frame, separators=(",", ":"), sort_keys=True),
        "source": (msg.metadata or {}).get("source"), "labels": (msg.metadata or {}).get("labels") or None,
    }


# Columns written by ingest, in the order of the COPY (PostgreSQL) and the INSERT (SQLite).
_INSERT_COLS = ("frame_id", "model_id", "device", "site", "line", "camera", "capture_us", "received_us", "seq", "flags",
                "token_dtype", "k", "global_embedding", "tokens", "sizes", "centroids", "legal_hold", "source", "labels",
                "footprint", "geometry")
# Binary COPY field types; the halfvec field is sent as its binary wire form through the bytea dumper.
_COPY_TYPES = ("text", "int4", "text", "text", "text", "text", "int8", "int8", "int8", "int2", "text", "int2", "bytea",
               "bytea", "bytea", "bytea", "bool", "text", "jsonb", "bytea", "text", "int8")


def _halfvec_binary(v: np.ndarray) -> bytes:
    """pgvector's binary ``halfvec``: uint16 dim, uint16 0, then big-endian float16 values."""
    a = np.asarray(v, dtype=">f2").reshape(-1)
    return struct.pack(">HH", a.shape[0], 0) + a.tobytes()


def insert_new_frames(session: Session, rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Insert rows not already present (by ``frame_id``); return the frame ids that were new. Caller commits.

    Rows are written in frame id order (UUIDv7: capture order), whatever order they arrived in: two workers
    committing overlapping batches (redeliveries) then take the unique index's row locks in one order, so
    neither waits on the other in a cycle (PostgreSQL aborts one of such a pair with "deadlock detected").

    SQLite: ``INSERT OR IGNORE`` against the unique ``frame_id`` (writers are serialised by SQLite's lock). PostgreSQL: binary COPY into the hot segment (no ANN index to
    update); ``frame_id`` is unique per segment, so the batch is first checked against the segments that can
    hold its ids, under the shared hot lock (``central.segments``): a segment sealed meanwhile waits for this
    transaction, and a concurrent duplicate in the hot segment fails the unique index (the ingest then commits
    message by message and counts it as a duplicate).
    """
    if not rows:
        return []
    unique: Dict[str, Dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["frame_id"]):  # written in frame id order: see above
        unique.setdefault(r["frame_id"], r)
    ids = list(unique)
    conn = session.connection()
    if not is_postgres(session.get_bind()):
        # Write first: a read would pin a snapshot that a concurrent writer's commit makes stale, and SQLite
        # then refuses the write at once (SQLITE_BUSY, no busy wait). Row by row to learn which were new.
        raw = conn.connection.driver_connection
        cur = raw.cursor()
        sql = (f"INSERT OR IGNORE INTO frames ({', '.join(_INSERT_COLS)}) VALUES "
               f"({', '.join('?' * len(_INSERT_COLS))})")
        added = []
        for fid, r in unique.items():
            before = raw.total_changes
            cur.execute(sql, tuple(_sqlite_value(c, r[c]) for c in _INSERT_COLS))
            if raw.total_changes != before:
                added.append(fid)
        cur.close()
        return added
    hot = segments.hot_segment(conn)
    check = [str(s.id) for s in segments.list_segments(conn)
             if s.exact or s.rows is None or (s.rows and s.min_frame_id <= ids[-1] and s.max_frame_id >= ids[0])]
    existing = set(conn.execute(text(f"SELECT frame_id FROM frames WHERE segment IN ({', '.join(check)}) "
                                     "AND frame_id = ANY(:ids)"), {"ids": ids}).scalars())
    new = [r for fid, r in unique.items() if fid not in existing]
    if new:
        import psycopg

        sql = f"COPY frames ({', '.join(_INSERT_COLS)}, segment) FROM STDIN (FORMAT BINARY)"
        raw = conn.connection.driver_connection
        try:
            with raw.cursor() as cur, cur.copy(sql) as cp:
                cp.set_types(list(_COPY_TYPES))
                for r in new:
                    cp.write_row(tuple(_halfvec_binary(r[c]) if c == "global_embedding" else r[c]
                                       for c in _INSERT_COLS) + (hot,))
        except psycopg.Error as exc:  # as SQLAlchemy's own errors: IntegrityError, OperationalError, ...
            raise DBAPIError.instance(sql, None, exc, psycopg.Error) from exc
    return [r["frame_id"] for r in new]


def _sqlite_value(col: str, v: Any) -> Any:
    """A row value as the sqlite3 driver takes it (what the ORM's column types would bind)."""
    if col == "global_embedding":
        return pack_f32(v)
    if col == "labels":
        return None if v is None else json.dumps(v)
    return v


def insert_frames(session: Session, rows: Sequence[Dict[str, Any]]) -> int:
    """Insert rows not already present (by ``frame_id``); return how many were new. Caller commits."""
    return len(insert_new_frames(session, rows))


def dialect_insert(session: Session, table: Any):
    """The session's dialect's INSERT for ``table`` (PostgreSQL's or SQLite's: both have ON CONFLICT)."""
    return (postgresql.insert if is_postgres(session.get_bind()) else sqlite_insert)(table)


def touch_devices(session: Session, seen: Dict[str, tuple]) -> None:
    """Upsert devices from ``{device: (site, last_seen_us)}`` (one statement)."""
    if not seen:
        return
    stmt = dialect_insert(session, Device).values(  # in device order: concurrent batches lock rows alike
        [{"device": dev, "site": site, "first_seen_us": ts, "last_seen_us": ts, "status": "unknown"}
         for dev, (site, ts) in sorted(seen.items())])
    latest = (func.greatest if is_postgres(session.get_bind()) else func.max)(Device.last_seen_us,
                                                                              stmt.excluded.last_seen_us)
    session.execute(stmt.on_conflict_do_update(index_elements=["device"],
                                               set_={"site": stmt.excluded.site, "last_seen_us": latest}))


def set_device_status(session: Session, device: str, site: str, status: Optional[str] = None,
                      stats: Optional[str] = None) -> None:
    ts = now_us()
    row = session.get(Device, device)
    if row is None:
        row = Device(device=device, site=site, first_seen_us=ts, last_seen_us=ts, status="unknown")
        session.add(row)
    row.last_seen_us = ts
    if status is not None:
        row.status = status
    if stats is not None:
        row.last_stats = stats


def list_devices(session: Session) -> List[Dict[str, Any]]:
    return [{"device": d.device, "site": d.site, "status": d.status, "first_seen_us": d.first_seen_us,
             "last_seen_us": d.last_seen_us, "last_stats": json.loads(d.last_stats) if d.last_stats else None}
            for d in session.scalars(select(Device).order_by(Device.site, Device.device))]


_FRAME_META = ("frame_id", "model_id", "device", "site", "line", "camera", "capture_us", "received_us", "seq",
               "flags", "token_dtype", "source", "labels")


@dataclass
class FrameData:
    """A stored frame: its metadata and its summary, decoded (``geometry``: the camera frame's size and ROI, when
    the edge sent it)."""

    frame_id: str
    model_id: int
    device: str
    site: str
    line: str
    camera: str
    capture_us: int
    received_us: int
    seq: int
    flags: int
    token_dtype: str
    source: Optional[str]  # the file the frame came from (wire metadata), None for camera frames
    labels: Optional[Dict[str, str]]  # its labels (wire metadata)
    legal_hold: bool
    summary: Summary
    geometry: Optional[FrameGeometry] = None

    def meta(self) -> Dict[str, Any]:
        s = self.summary
        fp = s.footprint
        return {**{n: getattr(self, n) for n in _FRAME_META}, "legal_hold": self.legal_hold, "k": s.k,
                "centroids": s.centroids.round(4).tolist(), "sizes": s.sizes.round(2).tolist(),
                "footprint": None if fp is None else {"grid": list(fp.shape), "tokens": fp.tolist()},
                "geometry": None if self.geometry is None else self.geometry.to_json()}


_SUMMARY_COLS = ("legal_hold", "k", "tokens", "sizes", "centroids", "footprint", "geometry")


def _frame_data(r: Any, global_embedding: np.ndarray, spec: SummarySpec) -> FrameData:
    """A ``FrameData`` from a ``frames`` row (ORM object or result row) whose blobs are still packed; ``spec`` is
    the model's summary (its manifest's: the tokens' dimension, the footprint grid)."""
    k, grid = int(r.k), spec.footprint_grid
    fp = None if r.footprint is None or grid is None else unpack_footprint(r.footprint, grid)
    summary = Summary(global_embedding, unpack_tokens(r.tokens, k, spec.dim), unpack_f32(r.sizes, (k,)),
                      unpack_f32(r.centroids, (k, 2)), fp)
    geometry = None if r.geometry is None else FrameGeometry.from_json(json.loads(r.geometry))
    return FrameData(**{n: getattr(r, n) for n in _FRAME_META}, legal_hold=bool(r.legal_hold), summary=summary,
                     geometry=geometry)


def decode_frame(f: Frame, spec: SummarySpec) -> FrameData:
    """A ``frames`` ORM row of a model whose manifest's summary is ``spec``, decoded."""
    return _frame_data(f, np.asarray(f.global_embedding, np.float32), spec)


def get_frame(session: Session, frame_id: str) -> Optional[FrameData]:
    row = session.execute(select(Frame, Model.manifest_json).join(Model, Model.id == Frame.model_id)
                          .where(Frame.frame_id == frame_id)).first()
    if row is None:
        return None
    return decode_frame(row[0], Manifest.from_json(row[1]).summary)


def rows_by_id(session: Session, cols: Sequence[Any], ids: Sequence[int],
               segment_of: Optional[Mapping[int, int]] = None) -> List[Any]:
    """``cols`` of the frames with surrogate ``id`` in ``ids``. On PostgreSQL, with ``segment_of`` (id -> segment,
    as the kNN found them), one branch per segment, each pruned to its own partition: ``id IN (...)`` on the
    partitioned table probes every partition's key for every id (200 candidates over 4 segments: 180 ms against 14
    ms per segment). A row no longer in its segment (moved to the kept one meanwhile) is read by id alone."""
    ids = list(ids)
    if not ids:
        return []
    if not segment_of or not is_postgres(session.get_bind()):
        return list(session.execute(select(*cols).where(Frame.id.in_(ids))).all())
    by_seg: Dict[int, List[int]] = {}
    for i in ids:
        if i in segment_of:
            by_seg.setdefault(int(segment_of[i]), []).append(int(i))
    loose = [int(i) for i in ids if i not in segment_of]
    seg_col, id_array = literal_column("segment"), postgresql.ARRAY(BigInteger)
    branches = [select(*cols).where(seg_col == sg, Frame.id == any_(bindparam(f"ids{sg}", v, id_array)))
                for sg, v in by_seg.items()]
    rows = list(session.execute(union_all(*branches)).all()) if branches else []
    found = {int(r[0]) for r in rows}
    loose += [i for v in by_seg.values() for i in v if i not in found]
    if loose:
        rows += session.execute(select(*cols).where(Frame.id.in_(loose))).all()
    return rows


def get_frames(session: Session, ids: Sequence[int], model: ModelInfo,
               segment_of: Optional[Mapping[int, int]] = None) -> Dict[int, FrameData]:
    """Frames of ``model`` by surrogate ``id`` (search candidates), tokens decoded; the global embedding is not
    read (the kNN stage already scored it), so the summary's ``global_embedding`` is empty here. ``segment_of``:
    see ``rows_by_id``."""
    cols = [getattr(Frame, n) for n in ("id", *_FRAME_META, *_SUMMARY_COLS)]
    empty = np.zeros(0, np.float32)
    return {r.id: _frame_data(r, empty, model.manifest.summary) for r in rows_by_id(session, cols, ids, segment_of)}


def candidate_tokens(session: Session, ids: Sequence[int], model: ModelInfo,
                     segment_of: Optional[Mapping[int, int]] = None) -> Dict[int, Tuple[str, np.ndarray, np.ndarray]]:
    """What the MaxSim re-rank reads of each candidate of ``model``, by surrogate ``id``: (frame id, tokens
    [K, d], which tokens take part [K] (those standing for a footprint cell; all without a footprint)); the blobs
    are unpacked together. The full frames are read afterwards for the hits only (``get_frames``).
    ``segment_of``: see ``rows_by_id``."""
    rows = rows_by_id(session, (Frame.id, Frame.frame_id, Frame.tokens, Frame.sizes, Frame.footprint.is_(None)),
                      ids, segment_of)
    k = model.k
    tokens = unpack_token_rows([r[2] for r in rows], k, model.token_dim)
    sizes = unpack_f32_rows([r[3] for r in rows], (k,))
    return {int(r[0]): (r[1], t, np.ones(k, bool) if r[4] else sz > 0) for r, t, sz in zip(rows, tokens, sizes)}


_LIST_COLS = ("id", *_FRAME_META, "legal_hold", "k")


def label_clauses(labels: Sequence[Tuple[str, Optional[str]]], postgres: bool) -> List[Any]:
    """SQL conditions: a frame carries every label ``(name, value)`` (``value`` None: any value). Names follow
    the label name rule (checked by ``search.parse_labels``), so they need no quoting in a JSON path."""
    out: List[Any] = []
    for name, value in labels:
        if postgres:  # the GIN index on labels answers both
            col = type_coerce(Frame.labels, postgresql.JSONB)
            out.append(col.has_key(name) if value is None else col.contains({name: value}))
        elif value is None:
            out.append(func.json_type(Frame.labels, f'$."{name}"').is_not(None))
        else:
            out += [func.json_type(Frame.labels, f'$."{name}"') == "text",
                    func.json_extract(Frame.labels, f'$."{name}"') == value]
    return out


def browse_frames(session: Session, *, model_id: Optional[int] = None, site: Optional[str] = None,
                  line: Optional[str] = None, camera: Optional[str] = None, since_us: Optional[int] = None,
                  until_us: Optional[int] = None, labels: Sequence[Tuple[str, Optional[str]]] = (),
                  before: Optional[Tuple[int, int]] = None, limit: int = 50) -> List[Dict[str, Any]]:
    """The latest frames (newest capture first, ties by row id) with the search filters, after the keyset
    ``before`` = (capture_us, row id) of the last frame already listed; metadata only, with the original's state."""
    cols = [getattr(Frame, n) for n in _LIST_COLS]
    q = select(*cols, Original.state).outerjoin(Original, Original.frame_id == Frame.frame_id)
    if labels:
        q = q.where(*label_clauses(labels, is_postgres(session.get_bind())))
    for col, v in ((Frame.model_id, model_id), (Frame.site, site), (Frame.line, line), (Frame.camera, camera)):
        if v is not None:
            q = q.where(col == v)
    if since_us is not None:
        q = q.where(Frame.capture_us >= since_us)
    if until_us is not None:
        q = q.where(Frame.capture_us < until_us)
    if before is not None:
        q = q.where(or_(Frame.capture_us < before[0], and_(Frame.capture_us == before[0], Frame.id < before[1])))
    q = q.order_by(Frame.capture_us.desc(), Frame.id.desc()).limit(int(limit))
    out = []
    for r in session.execute(q):
        d = {n: getattr(r, n) for n in _LIST_COLS}
        d["legal_hold"] = bool(d["legal_hold"])
        d["original"] = r.state
        out.append(d)
    return out


def list_cameras(session: Session) -> List[Dict[str, Any]]:
    """Every (site, line, camera) with frames: count, first and last capture, a device that sent them
    (``ix_frames_place_ts``); what the page's filter menus offer."""
    q = (select(Frame.site, Frame.line, Frame.camera, func.count(), func.min(Frame.capture_us),
                func.max(Frame.capture_us), func.max(Frame.device))
         .group_by(Frame.site, Frame.line, Frame.camera).order_by(Frame.site, Frame.line, Frame.camera))
    return [{"site": s, "line": ln, "camera": c, "frames": int(n), "first_capture_us": int(t0),
             "last_capture_us": int(t1), "device": d} for s, ln, c, n, t0, t1, d in session.execute(q)]


def set_legal_hold(session: Session, frame_id: str, hold: bool) -> bool:
    """Hold (or release) a frame's tokens and original; False when neither exists."""
    a = session.execute(update(Frame).where(Frame.frame_id == frame_id).values(legal_hold=hold)).rowcount
    b = session.execute(update(Original).where(Original.frame_id == frame_id).values(legal_hold=hold)).rowcount
    return bool(a or b)


def frame_place(session: Session, frame_id: str) -> Optional[Tuple[str, str, int, bool]]:
    """``(site, line, capture_us, legal_hold)`` of a stored frame, None when its tokens are not stored."""
    row = session.execute(select(Frame.site, Frame.line, Frame.capture_us, Frame.legal_hold)
                          .where(Frame.frame_id == frame_id)).first()
    return None if row is None else (row[0], row[1], int(row[2]), bool(row[3]))


# -- originals' rows (the blobs themselves are central.blobs; the upload contract is central.originals) ----
@dataclass(frozen=True)
class OriginalInfo:
    frame_id: str
    sha256: str
    location: str
    bytes: int
    state: str  # kept | deleting | deleted
    stored_us: int
    expires_us: int
    legal_hold: bool
    deleted_reason: Optional[str]

    def public(self) -> Dict[str, Any]:
        return {"state": self.state, "bytes": self.bytes, "stored_us": self.stored_us, "expires_us": self.expires_us,
                "legal_hold": self.legal_hold, "deleted_reason": self.deleted_reason}


def get_original(session: Session, frame_id: str) -> Optional[OriginalInfo]:
    o = session.get(Original, frame_id)
    if o is None:
        return None
    return OriginalInfo(o.frame_id, o.sha256, o.location, o.bytes, o.state, o.stored_us, o.expires_us,
                        bool(o.legal_hold), o.deleted_reason)


def add_original(session: Session, frame_id: str, sha256: str, location: str, size: int, stored_us: int,
                 expires_us: int, legal_hold: bool) -> None:
    """A kept original's row (a JPEG whose blob is already stored under ``location``)."""
    session.add(Original(frame_id=frame_id, sha256=sha256, location=location, bytes=size, content_type="image/jpeg",
                         stored_us=stored_us, expires_us=expires_us, legal_hold=legal_hold, state="kept"))


# -- dead letters and counters -----------------------------------------------------------------------
# Reasons a later fix can cure (register the model, allow the dtype or protocol, fix a bug): such dead letters keep
# their whole payload so that they can be replayed (central.dead_letters). Any other is kept truncated.
REPLAYABLE = ("unknown_model", "dtype_not_allowed", "protocol_v1_refused", "internal_error")


def dead_letter_row(topic: str, payload: bytes, reason: str, detail: str, max_bytes: int) -> Dict[str, Any]:
    """A ``dead_letters`` row: the whole payload for a replayable reason, else its first ``max_bytes``."""
    keep = payload if reason in REPLAYABLE else payload[:max_bytes]
    return {"received_us": now_us(), "topic": topic[:1024], "reason": reason[:64], "detail": detail[:2000],
            "payload": bytes(keep), "payload_len": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest()}


def insert_dead_letters(session: Session, rows: Sequence[Dict[str, Any]]) -> None:
    if rows:
        session.execute(insert(DeadLetter), list(rows))


def add_counters(session: Session, worker: str, deltas: Dict[str, int]) -> None:
    """Add ``deltas`` to the worker's counters: one upsert statement for all of them (the hot path of ingest)."""
    values = [{"worker": worker, "name": name, "value": int(v)} for name, v in deltas.items() if v]
    if not values:
        return
    stmt = dialect_insert(session, Counter).values(values)
    session.execute(stmt.on_conflict_do_update(index_elements=["worker", "name"],
                                               set_={"value": Counter.value + stmt.excluded.value}))


def counter_total(session: Session, name: str) -> int:
    return int(session.scalar(select(func.coalesce(func.sum(Counter.value), 0)).where(Counter.name == name)) or 0)


def counter_totals(session: Session) -> Dict[str, int]:
    return {n: int(v) for n, v in session.execute(select(Counter.name, func.sum(Counter.value)).group_by(Counter.name))}


def table_stats(session: Session) -> Dict[str, Any]:
    """Gauges for /metrics: rows per table, dead letters by reason, originals by state."""
    s = session
    frames = {int(m): int(c) for m, c in s.execute(select(Frame.model_id, func.count()).group_by(Frame.model_id))}
    dl = {r: int(c) for r, c in s.execute(select(DeadLetter.reason, func.count()).group_by(DeadLetter.reason))}
    orig = {st: (int(c), int(b or 0)) for st, c, b in s.execute(
        select(Original.state, func.count(), func.sum(Original.bytes)).group_by(Original.state))}
    devices = int(s.scalar(select(func.count()).select_from(Device)) or 0)
    return {"frames": frames, "dead_letters": dl, "originals": orig, "devices": devices}


def list_dead_letters(session: Session, limit: int = 100, reason: Optional[str] = None) -> List[Dict[str, Any]]:
    """The latest dead letters (newest first); ``replayable``: the whole payload is kept."""
    q = select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit)
    if reason is not None:
        q = q.where(DeadLetter.reason == reason)
    return [{"id": d.id, "received_us": d.received_us, "topic": d.topic, "reason": d.reason,
             "detail": d.detail, "payload_len": d.payload_len, "payload_sha256": d.payload_sha256,
             "payload_head_hex": bytes(d.payload[:64]).hex(),
             "replayable": 0 < d.payload_len == len(d.payload)}
            for d in session.scalars(q)]


# -- API tokens --------------------------------------------------------------------------------------
def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(session: Session, name: str, role: str) -> str:
    """Create a bearer token; returns the plaintext once (only its sha256 is stored)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    token = "tl_" + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, role=role, token_sha256=_token_hash(token), created_us=now_us()))
    return token


def lookup_token(session: Session, token: str) -> Optional[tuple]:
    """``(name, role)`` of a valid, unrevoked token, else None."""
    row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == _token_hash(token),
                                                ApiToken.revoked_us.is_(None)))
    return (row.name, row.role) if row else None


def _token_info(t: ApiToken) -> Dict[str, Any]:
    return {"id": t.id, "name": t.name, "role": t.role, "created_us": t.created_us, "revoked_us": t.revoked_us,
            "fingerprint": t.token_sha256[:12]}


def list_tokens(session: Session) -> List[Dict[str, Any]]:
    """Every token ever created (the secret is never stored; ``fingerprint`` is the start of its sha256)."""
    return [_token_info(t) for t in session.scalars(select(ApiToken).order_by(ApiToken.id))]


def revoke_tokens(session: Session, name: Optional[str] = None, token_id: Optional[int] = None) -> int:
    """Revoke the unrevoked tokens called ``name``, or the one with ``token_id``; returns how many were revoked
    now. Requests with them are refused (401) once the API's token cache has expired them (seconds)."""
    if (name is None) == (token_id is None):
        raise ValueError("give name or token_id")
    cond = ApiToken.name == name if name is not None else ApiToken.id == token_id
    return session.execute(update(ApiToken).where(cond, ApiToken.revoked_us.is_(None))
                           .values(revoked_us=now_us())).rowcount


def get_token(session: Session, token_id: int) -> Optional[Dict[str, Any]]:
    t = session.get(ApiToken, token_id)
    return None if t is None else _token_info(t)
