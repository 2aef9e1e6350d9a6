"""Data access for central: models registry, frames, holds, dead letters, API tokens and counters."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np
from sqlalchemy import Engine, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from sql.db import is_postgres
from sql.models import ApiToken, Counter, DeadLetter, Device, Frame, Model, Original
from sql.types import pack_f32, pack_tokens, unpack_f32, unpack_tokens
from tokenline.manifest import Manifest

if TYPE_CHECKING:  # pragma: no cover
    from tokenline.wire import TokenMessage

log = logging.getLogger(__name__)

ROLES = ("viewer", "device", "admin")
FRAMES_DELETED = "frames_deleted"  # counter bumped in the transaction that deletes frame rows


def now_us() -> int:
    return time.time_ns() // 1000


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

    def public(self) -> Dict[str, Any]:
        return {"id": self.id, "hash": self.hash16, "name": self.name, "embedding_dim": self.embedding_dim,
                "k": self.k, "has_text": self.has_text, "searchable": self.model_dir is not None,
                "family": self.manifest.family, "merge": self.manifest.merge.method}


def _info(row: Model) -> ModelInfo:
    return ModelInfo(row.id, row.hash16, row.name, row.embedding_dim, row.k, row.has_text, row.model_dir,
                     Manifest.from_json(row.manifest_json, where=f"models[{row.id}]"))


def hnsw_index_name(model_id: int) -> str:
    return f"ix_frames_hnsw_m{int(model_id)}"


def register_model(engine: Engine, manifest: Manifest, model_dir: Optional[str | Path] = None) -> ModelInfo:
    """Register (or update the directory of) a manifest; on PostgreSQL create its partial HNSW index.

    Each model gets ``CREATE INDEX ... USING hnsw ((global_embedding::halfvec(D)) halfvec_cosine_ops)
    WHERE model_id = <id>``: one index per model, so embeddings of different models are never compared.
    """
    h = manifest.hash_bytes().hex()
    d = manifest.embedding_dim
    mdir = str(Path(model_dir).resolve()) if model_dir is not None else None
    with Session(engine) as s, s.begin():
        row = s.scalar(select(Model).where(Model.hash16 == h))
        if row is None:
            row = Model(hash16=h, name=manifest.name, embedding_dim=d, k=manifest.summary.k,
                        has_text=manifest.text is not None, manifest_json=manifest.to_json(), model_dir=mdir,
                        registered_us=now_us())
            s.add(row)
            s.flush()
        elif mdir is not None:
            row.model_dir = mdir
        info = _info(row)
    if is_postgres(engine):
        if d > 4000:
            log.warning("model %s: dim %d > 4000, pgvector cannot index halfvec; search is a sequential scan",
                        info.name, d)
        else:
            with engine.begin() as conn:
                conn.execute(text(
                    f"CREATE INDEX IF NOT EXISTS {hnsw_index_name(info.id)} ON frames USING hnsw "
                    f"((global_embedding::halfvec({d})) halfvec_cosine_ops) WHERE model_id = {info.id}"))
    return info


def list_models(engine: Engine) -> List[ModelInfo]:
    with Session(engine) as s:
        return [_info(r) for r in s.scalars(select(Model).order_by(Model.id))]


def model_by_id(engine: Engine, model_id: int) -> Optional[ModelInfo]:
    with Session(engine) as s:
        row = s.get(Model, model_id)
        return _info(row) if row else None


# -- frames ------------------------------------------------------------------------------------------
def frame_row(msg: "TokenMessage", model_id: int, received_us: int) -> Dict[str, Any]:
    """The ``frames`` row of a decoded, validated message."""
    return {
        "frame_id": msg.frame_id.hex(), "model_id": model_id, "device": msg.device, "site": msg.site,
        "line": msg.line, "camera": msg.camera, "capture_us": int(msg.capture_ts_us), "received_us": received_us,
        "seq": int(msg.seq), "flags": int(msg.flags), "token_dtype": msg.token_dtype,
        "k": msg.summary.k, "global_embedding": np.asarray(msg.summary.global_embedding, np.float32),
        "tokens": pack_tokens(msg.summary.tokens), "sizes": pack_f32(msg.summary.sizes),
        "centroids": pack_f32(msg.summary.centroids),
        "legal_hold": False,
    }


def _insert_ignore(session: Session, table: Any, rows: Sequence[Dict[str, Any]], key: str) -> None:
    dialect = session.get_bind().dialect.name
    mod = postgresql if dialect == "postgresql" else sqlite
    stmt = mod.insert(table).on_conflict_do_nothing(index_elements=[key])
    session.execute(stmt, list(rows))


def insert_frames(session: Session, rows: Sequence[Dict[str, Any]]) -> int:
    """Insert rows not already present (by ``frame_id``); return how many were new. Caller commits."""
    if not rows:
        return 0
    unique: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        unique.setdefault(r["frame_id"], r)
    existing = set(session.scalars(select(Frame.frame_id).where(Frame.frame_id.in_(list(unique)))))
    new = [r for fid, r in unique.items() if fid not in existing]
    if new:
        # ON CONFLICT DO NOTHING as well: another worker may commit the same frame concurrently.
        _insert_ignore(session, Frame.__table__, new, "frame_id")
    return len(new)


def touch_devices(session: Session, seen: Dict[str, tuple]) -> None:
    """Upsert devices from ``{device: (site, last_seen_us)}``."""
    for dev, (site, ts) in seen.items():
        row = session.get(Device, dev)
        if row is None:
            session.add(Device(device=dev, site=site, first_seen_us=ts, last_seen_us=ts, status="unknown"))
        else:
            row.site = site
            row.last_seen_us = max(row.last_seen_us, ts)


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


def list_devices(engine: Engine) -> List[Dict[str, Any]]:
    with Session(engine) as s:
        out = []
        for d in s.scalars(select(Device).order_by(Device.site, Device.device)):
            out.append({"device": d.device, "site": d.site, "status": d.status, "first_seen_us": d.first_seen_us,
                        "last_seen_us": d.last_seen_us,
                        "last_stats": json.loads(d.last_stats) if d.last_stats else None})
        return out


@dataclass
class FrameData:
    """A frame read back with its arrays decoded."""

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
    legal_hold: bool
    global_embedding: np.ndarray
    tokens: np.ndarray
    sizes: np.ndarray
    centroids: np.ndarray

    def meta(self) -> Dict[str, Any]:
        return {"frame_id": self.frame_id, "model_id": self.model_id, "device": self.device, "site": self.site,
                "line": self.line, "camera": self.camera, "capture_us": self.capture_us,
                "received_us": self.received_us, "seq": self.seq, "flags": self.flags,
                "token_dtype": self.token_dtype, "legal_hold": self.legal_hold, "k": int(self.tokens.shape[0]),
                "centroids": self.centroids.round(4).tolist(), "sizes": self.sizes.round(2).tolist()}


def decode_frame(f: Frame, dim: int) -> FrameData:
    k = int(f.k)
    return FrameData(f.frame_id, f.model_id, f.device, f.site, f.line, f.camera, f.capture_us, f.received_us,
                     f.seq, f.flags, f.token_dtype, bool(f.legal_hold), np.asarray(f.global_embedding, np.float32),
                     unpack_tokens(f.tokens, k, dim), unpack_f32(f.sizes, (k,)), unpack_f32(f.centroids, (k, 2)))


def get_frame(engine: Engine, frame_id: str) -> Optional[FrameData]:
    with Session(engine) as s:
        row = s.execute(select(Frame, Model.embedding_dim).join(Model, Model.id == Frame.model_id)
                        .where(Frame.frame_id == frame_id)).first()
        return decode_frame(row[0], row[1]) if row else None


def get_frames(engine: Engine, ids: Sequence[int], dim: int) -> Dict[int, FrameData]:
    """Frames by surrogate ``id`` (search candidates), tokens decoded; the global embedding is not read
    (the kNN stage already scored it), so ``global_embedding`` is empty here."""
    if not ids:
        return {}
    cols = (Frame.id, Frame.frame_id, Frame.model_id, Frame.device, Frame.site, Frame.line, Frame.camera,
            Frame.capture_us, Frame.received_us, Frame.seq, Frame.flags, Frame.token_dtype, Frame.legal_hold,
            Frame.k, Frame.tokens, Frame.sizes, Frame.centroids)
    out: Dict[int, FrameData] = {}
    empty = np.zeros(0, np.float32)
    with engine.connect() as conn:
        for r in conn.execute(select(*cols).where(Frame.id.in_(list(ids)))):
            k = int(r.k)
            out[r.id] = FrameData(r.frame_id, r.model_id, r.device, r.site, r.line, r.camera, r.capture_us,
                                  r.received_us, r.seq, r.flags, r.token_dtype, bool(r.legal_hold), empty,
                                  unpack_tokens(r.tokens, k, dim), unpack_f32(r.sizes, (k,)),
                                  unpack_f32(r.centroids, (k, 2)))
    return out


def set_legal_hold(engine: Engine, frame_id: str, hold: bool) -> bool:
    """Hold (or release) a frame's tokens and original; False when neither exists."""
    with Session(engine) as s, s.begin():
        a = s.execute(update(Frame).where(Frame.frame_id == frame_id).values(legal_hold=hold)).rowcount
        b = s.execute(update(Original).where(Original.frame_id == frame_id).values(legal_hold=hold)).rowcount
        return bool(a or b)


# -- dead letters and counters -----------------------------------------------------------------------
def dead_letter_row(topic: str, payload: bytes, reason: str, detail: str, max_bytes: int) -> Dict[str, Any]:
    return {"received_us": now_us(), "topic": topic[:1024], "reason": reason[:64], "detail": detail[:2000],
            "payload": bytes(payload[:max_bytes]), "payload_len": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest()}


def insert_dead_letters(session: Session, rows: Sequence[Dict[str, Any]]) -> None:
    if rows:
        session.execute(insert(DeadLetter), list(rows))


def add_counters(session: Session, worker: str, deltas: Dict[str, int]) -> None:
    for name, v in deltas.items():
        if not v:
            continue
        n = session.execute(update(Counter).where(Counter.worker == worker, Counter.name == name)
                            .values(value=Counter.value + v)).rowcount
        if not n:
            session.add(Counter(worker=worker, name=name, value=v))
    session.flush()


def counter_total(session: Session, name: str) -> int:
    return int(session.scalar(select(func.coalesce(func.sum(Counter.value), 0)).where(Counter.name == name)) or 0)


def counter_totals(engine: Engine) -> Dict[str, int]:
    with Session(engine) as s:
        return {n: int(v) for n, v in s.execute(select(Counter.name, func.sum(Counter.value)).group_by(Counter.name))}


def table_stats(engine: Engine) -> Dict[str, Any]:
    """Gauges for /metrics: rows per table, dead letters by reason, originals by state."""
    with Session(engine) as s:
        frames = {int(m): int(c) for m, c in s.execute(select(Frame.model_id, func.count()).group_by(Frame.model_id))}
        dl = {r: int(c) for r, c in s.execute(select(DeadLetter.reason, func.count()).group_by(DeadLetter.reason))}
        orig = {st: (int(c), int(b or 0)) for st, c, b in s.execute(
            select(Original.state, func.count(), func.sum(Original.bytes)).group_by(Original.state))}
        devices = int(s.scalar(select(func.count()).select_from(Device)) or 0)
    return {"frames": frames, "dead_letters": dl, "originals": orig, "devices": devices}


def list_dead_letters(engine: Engine, limit: int = 100) -> List[Dict[str, Any]]:
    with Session(engine) as s:
        return [{"id": d.id, "received_us": d.received_us, "topic": d.topic, "reason": d.reason,
                 "detail": d.detail, "payload_len": d.payload_len, "payload_sha256": d.payload_sha256,
                 "payload_head_hex": bytes(d.payload[:64]).hex()}
                for d in s.scalars(select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit))]


# -- API tokens --------------------------------------------------------------------------------------
def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(engine: Engine, name: str, role: str) -> str:
    """Create a bearer token; returns the plaintext once (only its sha256 is stored)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    token = "tl_" + secrets.token_urlsafe(32)
    with Session(engine) as s, s.begin():
        s.add(ApiToken(name=name, role=role, token_sha256=_token_hash(token), created_us=now_us()))
    return token


def lookup_token(engine: Engine, token: str) -> Optional[tuple]:
    """``(name, role)`` of a valid, unrevoked token, else None."""
    with Session(engine) as s:
        row = s.scalar(select(ApiToken).where(ApiToken.token_sha256 == _token_hash(token),
                                              ApiToken.revoked_us.is_(None)))
        return (row.name, row.role) if row else None


def revoke_token(engine: Engine, name: str) -> int:
    with Session(engine) as s, s.begin():
        return s.execute(update(ApiToken).where(ApiToken.name == name, ApiToken.revoked_us.is_(None))
                         .values(revoked_us=now_us())).rowcount
