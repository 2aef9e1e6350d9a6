"""Originals: accept an edge's upload (the PUT contract) and resolve a read to bytes, 404 or 410 Gone."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Optional

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from central.blobs import BlobStore
from central.config import RetentionConfig
from central.store import now_us
from sql.models import Frame, Original

FRAME_ID_RE = re.compile(r"^[0-9a-f]{32}$")
DAY_US = 86_400 * 1_000_000


class OriginalError(Exception):
    """An upload or read that the contract answers with ``status`` (400, 404, 409, 410, 413, 422)."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


def originals_age_us(cfg: RetentionConfig, site: Optional[str], line: Optional[str]) -> int:
    """The originals retention (µs) that applies to a site/line (its override, else the default)."""
    for o in cfg.lines:
        if o.site == site and o.line == line and o.originals_days is not None:
            return int(o.originals_days * DAY_US)
    return int(cfg.originals_days * DAY_US)


def is_jpeg(body: bytes) -> bool:
    return len(body) >= 4 and body[:3] == b"\xff\xd8\xff" and body.rstrip(b"\x00")[-2:] == b"\xff\xd9"


@dataclass(frozen=True)
class StoreResult:
    status: int  # 201 stored, 200 already stored with the same sha256
    sha256: str
    expires_us: int


def store_original(engine: Engine, blobs: BlobStore, retention: RetentionConfig, frame_id: str, body: bytes,
                   sha256_header: Optional[str], max_bytes: int) -> StoreResult:
    """Validate and store one upload per the contract; raises ``OriginalError`` with the HTTP status."""
    if not FRAME_ID_RE.match(frame_id):
        raise OriginalError(400, "bad_frame_id", "frame_id must be 32 lowercase hex characters (a UUIDv7)")
    if len(body) > max_bytes:
        raise OriginalError(413, "too_large", f"body is {len(body)} bytes, limit {max_bytes}")
    if not is_jpeg(body):
        raise OriginalError(400, "not_jpeg", "body is not a JPEG (no SOI/EOI markers)")
    sha = hashlib.sha256(body).hexdigest()
    if sha256_header is None or sha256_header.strip().lower() != sha:
        raise OriginalError(422, "sha256_mismatch",
                            f"X-Tokenline-Sha256 {sha256_header!r} does not match the body's sha256 {sha}")
    now = now_us()
    with blobs.lock():
        with Session(engine) as s, s.begin():
            existing = s.get(Original, frame_id)
            if existing is not None:
                if existing.state != "kept":
                    raise OriginalError(410, "gone", "this frame's original was deleted by the retention policy")
                if existing.sha256 != sha:
                    raise OriginalError(409, "conflict", "an original with a different sha256 is stored for this id")
                if not blobs.exists(existing.location):  # repaired by the retry
                    blobs.put(body)
                return StoreResult(200, sha, existing.expires_us)
            place = s.execute(select(Frame.site, Frame.line, Frame.capture_us, Frame.legal_hold)
                              .where(Frame.frame_id == frame_id)).first()
            site, line = (place[0], place[1]) if place else (None, None)
            hold = bool(place[3]) if place else False
            expires = now + originals_age_us(retention, site, line)
            if place is not None and not hold and place[2] + originals_age_us(retention, site, line) <= now:
                raise OriginalError(410, "gone", "the frame is older than the originals retention; not kept")
            key, _ = blobs.put(body)  # blob first: a crash before commit leaves an orphan the sweeper removes
            s.add(Original(frame_id=frame_id, sha256=sha, location=key, bytes=len(body), content_type="image/jpeg",
                           stored_us=now, expires_us=expires, legal_hold=hold, state="kept"))
    return StoreResult(201, sha, expires)


def read_original(engine: Engine, blobs: BlobStore, frame_id: str) -> bytes:
    """The original's bytes; ``OriginalError`` 404 (never uploaded) or 410 (deleted by policy)."""
    if not FRAME_ID_RE.match(frame_id):
        raise OriginalError(400, "bad_frame_id", "frame_id must be 32 lowercase hex characters")
    with Session(engine) as s:
        row = s.get(Original, frame_id)
        if row is None:
            raise OriginalError(404, "not_found", "no original was uploaded for this frame")
        if row.state != "kept":
            raise OriginalError(410, "gone", f"original deleted by the retention policy ({row.deleted_reason})")
        key = row.location
    try:
        return blobs.read(key)
    except FileNotFoundError:
        raise OriginalError(410, "gone", "original blob is missing (deleted)") from None
