"""SQLAlchemy 2.x table models of central: devices, models, frames, originals, dead letters, tokens, counters,
reference sets (their frames and memory banks), frames' anomaly scores and the frames waiting for one.

Times are Unix microseconds (UTC) in BIGINT columns, the unit the wire format carries, so both dialects
compare and index them the same way.
"""

from __future__ import annotations

from typing import Optional

from sqlalchemy import (BigInteger, Boolean, Float, ForeignKey, Index, Integer, LargeBinary, MetaData,
                        SmallInteger, String, Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sql.types import Embedding, Labels

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT on PostgreSQL, INTEGER (the rowid alias, so it autoincrements) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Device(Base):
    """An edge device as last seen through its frames, status and stats topics."""

    __tablename__ = "devices"
    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    site: Mapped[str] = mapped_column(String(64))
    first_seen_us: Mapped[int] = mapped_column(BigInteger)
    last_seen_us: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="unknown")  # online | offline | unknown
    last_stats: Mapped[Optional[str]] = mapped_column(Text, nullable=True)  # JSON as published


class Model(Base):
    """A registered encoder manifest; ``hash16`` is the 16-byte wire id in hex."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hash16: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(128))
    embedding_dim: Mapped[int] = mapped_column(Integer)
    k: Mapped[int] = mapped_column(Integer)
    has_text: Mapped[bool] = mapped_column(Boolean, default=False)
    manifest_json: Mapped[str] = mapped_column(Text)
    model_dir: Mapped[Optional[str]] = mapped_column(Text, nullable=True)  # where central finds the ONNX
    registered_us: Mapped[int] = mapped_column(BigInteger)


class Frame(Base):
    """One captured frame's tokens: metadata, global embedding, summary tokens, sizes and centroids, and for models
    with a footprint summary the footprint and the frame's geometry (size, ROI)."""

    __tablename__ = "frames"
    __table_args__ = (
        Index("ix_frames_model_ts", "model_id", "capture_us"),
        Index("ix_frames_place_ts", "site", "line", "camera", "capture_us"),
        Index("ix_frames_ts", "capture_us"),
        Index("ix_frames_labels", "labels", postgresql_using="gin").ddl_if(dialect="postgresql"),
        {"sqlite_autoincrement": True},
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    frame_id: Mapped[str] = mapped_column(String(32), unique=True)  # UUIDv7, 32 lowercase hex
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    device: Mapped[str] = mapped_column(String(64))
    site: Mapped[str] = mapped_column(String(64))
    line: Mapped[str] = mapped_column(String(64))
    camera: Mapped[str] = mapped_column(String(64))
    capture_us: Mapped[int] = mapped_column(BigInteger)
    received_us: Mapped[int] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(BigInteger)
    flags: Mapped[int] = mapped_column(SmallInteger, default=0)
    token_dtype: Mapped[str] = mapped_column(String(8))
    k: Mapped[int] = mapped_column(SmallInteger)
    global_embedding = mapped_column(Embedding(), nullable=False)
    tokens: Mapped[bytes] = mapped_column(LargeBinary)  # sql.types.pack_tokens
    sizes: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [K]
    centroids: Mapped[bytes] = mapped_column(LargeBinary)  # float32 [K, 2]
    legal_hold: Mapped[bool] = mapped_column(Boolean, default=False)
    source: Mapped[Optional[str]] = mapped_column(String(255), nullable=True)  # metadata: the file it came from
    labels = mapped_column(Labels, nullable=True)  # metadata: {name: text} (camera's and file's labels)
    footprint: Mapped[Optional[bytes]] = mapped_column(LargeBinary, nullable=True)  # sql.types.pack_footprint
    geometry: Mapped[Optional[str]] = mapped_column(Text, nullable=True)  # JSON: the wire's metadata.frame


class Original(Base):
    """An uploaded original image; the row outlives its blob as a tombstone so reads answer 410 Gone.

    ``state``: ``kept`` (blob present), ``deleting`` (sweeper committed to delete it; blob may still exist),
    ``deleted`` (blob gone). No foreign key to frames: an upload may arrive before the tokens do.
    """

    __tablename__ = "originals"
    __table_args__ = (
        Index("ix_originals_state_stored", "state", "stored_us"),
        Index("ix_originals_sha256", "sha256"),
    )
    frame_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    location: Mapped[str] = mapped_column(Text)  # key in the blob store
    bytes: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(64), default="image/jpeg")
    stored_us: Mapped[int] = mapped_column(BigInteger)
    expires_us: Mapped[int] = mapped_column(BigInteger)
    legal_hold: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16), default="kept")
    deleted_us: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)
    deleted_reason: Mapped[Optional[str]] = mapped_column(String(32), nullable=True)


class DeadLetter(Base):
    """A message the ingest could not accept: why, and its first bytes for inspection."""

    __tablename__ = "dead_letters"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    received_us: Mapped[int] = mapped_column(BigInteger, index=True)
    topic: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(String(64), index=True)
    detail: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)  # truncated to the configured bound
    payload_len: Mapped[int] = mapped_column(BigInteger)
    payload_sha256: Mapped[str] = mapped_column(String(64))


class ApiToken(Base):
    """A bearer token; only its sha256 is stored (tokens are 256-bit random, so no slow hash is needed)."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))  # viewer | device | admin
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_us: Mapped[int] = mapped_column(BigInteger)
    revoked_us: Mapped[Optional[int]] = mapped_column(BigInteger, nullable=True)


class Counter(Base):
    """Monotonic counters of the ingest workers, updated in the same transaction as the rows they count."""

    __tablename__ = "counters"
    __table_args__ = (UniqueConstraint("worker", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class ReferenceSet(Base):
    """Frames an engineer marked as good for one camera and model, and the memory bank built from them.

    ``version`` rises with every change (frames, threshold, mode); ``bank`` is the bank file's bytes
    (``tokenline.anomaly.Bank.to_bytes``) built for set version ``bank_version`` (0: none yet), rebuilt after each
    change outside its transaction (``central.anomaly.refsets.build_set``); ``build_error`` says why the current
    version's build failed.
    """

    __tablename__ = "reference_sets"
    __table_args__ = (UniqueConstraint("model_id", "site", "line", "camera", name="uq_reference_sets_camera"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    site: Mapped[str] = mapped_column(String(64))
    line: Mapped[str] = mapped_column(String(64))
    camera: Mapped[str] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(16))  # tokens | global | both
    threshold_mode: Mapped[str] = mapped_column(String(16))  # quantile | manual
    quantile: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    version: Mapped[int] = mapped_column(Integer)
    frame_count: Mapped[int] = mapped_column(Integer)
    bank_tokens: Mapped[int] = mapped_column(Integer)
    bank: Mapped[bytes] = mapped_column(LargeBinary)
    created_us: Mapped[int] = mapped_column(BigInteger)
    updated_us: Mapped[int] = mapped_column(BigInteger)
    bank_version: Mapped[int] = mapped_column(Integer, server_default="0")
    build_error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)


class ReferenceFrame(Base):
    """A frame of a reference set (by frame id: the set outlives frames that retention deletes)."""

    __tablename__ = "reference_frames"
    set_id: Mapped[int] = mapped_column(ForeignKey("reference_sets.id", ondelete="CASCADE"), primary_key=True)
    frame_id: Mapped[str] = mapped_column(String(32), primary_key=True)


class FrameScore(Base):
    """A frame's anomaly score against its camera's reference set, its most anomalous token and that token's
    region (box in [0, 1] of the model input, and the footprint mask when the frame had one).

    Keyed by frame id without a foreign key to ``frames`` (retention deletes frames; ``central.anomaly`` drops
    the scores they leave behind); place and time are copied from the frame for filtered, sorted reads.
    """

    __tablename__ = "frame_scores"
    __table_args__ = (
        Index("ix_frame_scores_place_score", "site", "line", "camera", "score"),
        Index("ix_frame_scores_place_ts", "site", "line", "camera", "capture_us"),
        Index("ix_frame_scores_flagged_ts", "flagged", "capture_us"),
        Index("ix_frame_scores_set", "set_id", "set_version"),
    )
    frame_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    set_id: Mapped[int] = mapped_column(ForeignKey("reference_sets.id", ondelete="CASCADE"))
    set_version: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[int] = mapped_column(Integer)
    site: Mapped[str] = mapped_column(String(64))
    line: Mapped[str] = mapped_column(String(64))
    camera: Mapped[str] = mapped_column(String(64))
    capture_us: Mapped[int] = mapped_column(BigInteger)
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    flagged: Mapped[bool] = mapped_column(Boolean)
    token: Mapped[int] = mapped_column(SmallInteger)  # -1: no token qualified
    x0: Mapped[float] = mapped_column(Float)
    y0: Mapped[float] = mapped_column(Float)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    mask: Mapped[Optional[bytes]] = mapped_column(LargeBinary, nullable=True)  # tokenline.anomaly.pack_mask
    grid_h: Mapped[Optional[int]] = mapped_column(SmallInteger, nullable=True)
    grid_w: Mapped[Optional[int]] = mapped_column(SmallInteger, nullable=True)
    edge_score: Mapped[Optional[float]] = mapped_column(Float, nullable=True)  # the edge's own score, when sent
    scored_us: Mapped[int] = mapped_column(BigInteger)


class ScoreQueue(Base):
    """A frame ingest stored for a camera with a reference set, waiting for its anomaly score: the transactional
    queue between ingest and the scorer (``central.anomaly.scoring``). Ingest inserts the row in the frame's
    transaction; the scorer deletes it in the transaction that stores the score, so a crash of either leaves the
    frame queued, never lost. ``edge_*``: the edge's own score of the frame, when its message carried one.
    """

    __tablename__ = "score_queue"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    frame_id: Mapped[str] = mapped_column(String(32))
    queued_us: Mapped[int] = mapped_column(BigInteger)
    edge_set_id: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    edge_set_version: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    edge_score: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
