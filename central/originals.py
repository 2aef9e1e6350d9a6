"""Originals: accept an edge's upload (the PUT contract) and resolve a read to bytes, or NotFound / Gone."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

from sqlalchemy.orm import Session

from central import store
from central.blobs import BlobStore
from central.config import RetentionConfig
from central.errors import Conflict, Gone, Invalid, NotFound, TooLarge, Unprocessable
from tokenline.preprocess import DEFAULT_MAX_PIXELS, ImageError, check_image

DAY_US = 86_400 * 1_000_000


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
    created: bool  # True stored now, False already stored with the same sha256
    sha256: str
    expires_us: int


def check_upload_size(size: int, max_bytes: int) -> None:
    """``TooLarge`` when an upload of ``size`` bytes is over ``max_bytes``."""
    if size > max_bytes:
        raise TooLarge(f"body is {size} bytes, limit {max_bytes}")


def store_original(session: Session, blobs: BlobStore, retention: RetentionConfig, frame_id: str, body: bytes,
                   sha256_header: Optional[str], max_bytes: int,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> StoreResult:
    """Validate and store one upload per the contract (``Invalid``, ``TooLarge``, ``Unprocessable``,
    ``Conflict``, ``Gone``). A JPEG whose header declares more than ``max_pixels`` is refused (``Invalid``,
    reason ``too_many_pixels``) before it is stored: thumbnails decode what is stored.

    Commits ``session`` itself, under the blob store's lock: the sweeper's reference check must see the new
    row before it may unlink a blob with the same content. The session must hold no pending changes.
    """
    store.check_frame_id(frame_id)
    check_upload_size(len(body), max_bytes)
    if not is_jpeg(body):
        raise Invalid("body is not a JPEG (no SOI/EOI markers)", reason="not_jpeg")
    try:
        check_image(body, max_pixels)
    except ImageError as exc:
        raise Invalid(f"original: {exc}", reason="too_many_pixels" if exc.reason == "too_many_pixels"
                      else "not_jpeg") from None
    sha = hashlib.sha256(body).hexdigest()
    if sha256_header is None or sha256_header.strip().lower() != sha:
        raise Unprocessable(f"X-Tokenline-Sha256 {sha256_header!r} does not match the body's sha256 {sha}",
                       reason="sha256_mismatch")
    now = store.now_us()
    with blobs.lock():
        try:
            existing = store.get_original(session, frame_id)
            if existing is not None:
                if existing.state != "kept":
                    raise Gone("this frame's original was deleted by the retention policy")
                if existing.sha256 != sha:
                    raise Conflict("an original with a different sha256 is stored for this id")
                if not blobs.exists(existing.location):  # repaired by the retry
                    blobs.put(body)
                return StoreResult(False, sha, existing.expires_us)
            place = store.frame_place(session, frame_id)
            site, line = (place[0], place[1]) if place else (None, None)
            hold = place[3] if place else False
            age = originals_age_us(retention, site, line)
            expires = now + age
            if place is not None and not hold and place[2] + age <= now:
                raise Gone("the frame is older than the originals retention; not kept")
            key, _ = blobs.put(body)  # blob first: a crash before commit leaves an orphan the sweeper removes
            store.add_original(session, frame_id, sha, key, len(body), now, expires, hold)
            session.commit()
        finally:
            session.rollback()  # nothing left open under the lock (a no-op after the commit)
    return StoreResult(True, sha, expires)


def read_original(session: Session, blobs: BlobStore, frame_id: str) -> bytes:
    """The original's bytes; ``NotFound`` (never uploaded) or ``Gone`` (deleted by policy)."""
    row = store.get_original(session, store.check_frame_id(frame_id))
    if row is None:
        raise NotFound("no original was uploaded for this frame")
    if row.state != "kept":
        raise Gone(f"original deleted by the retention policy ({row.deleted_reason})")
    try:
        return blobs.read(row.location)
    except FileNotFoundError:
        raise Gone("original blob is missing (deleted)") from None
