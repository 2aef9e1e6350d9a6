"""Frame ids: 16-byte UUIDv7 (RFC 9562) made at capture, written as 32 lowercase hex characters elsewhere.

The id is the frame's identity from the camera to central's rows and originals: capture makes it, the wire
format carries it, central stores it. Python 3.8+, standard library only.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from typing import Optional

FRAME_ID_HEX = re.compile(r"[0-9a-f]{32}")  # the text form (URLs, SQL, commands)


class FrameIdError(ValueError):
    """Not a UUIDv7 frame id. ``reason`` is the wire format's rejection reason for it."""

    reason = "bad_frame_id"


def new_frame_id(ts_us: Optional[int] = None, seed: Optional[bytes] = None) -> bytes:
    """A 16-byte UUIDv7 for a frame captured at ``ts_us`` (Unix microseconds; now when None).

    48-bit Unix milliseconds, version 7, the sub-millisecond part in the 12 ``rand_a`` bits (RFC 9562
    method 3), so ids sort by capture time at microsecond resolution; 62 random bits follow. With ``seed``
    those bits are taken from its SHA-256 instead: a frame read again (a video file resumed after a crash)
    gets the id it had, and central keeps it once.
    """
    if ts_us is None:
        ts_us = time.time_ns() // 1000
    if ts_us < 0:
        raise ValueError("ts_us must be >= 0")
    ms, sub_us = divmod(int(ts_us), 1000)
    rand_a = (sub_us * 4096) // 1000
    bits = os.urandom(8) if seed is None else hashlib.sha256(seed).digest()[:8]
    rand_b = int.from_bytes(bits, "big") & ((1 << 62) - 1)
    value = ((ms & ((1 << 48) - 1)) << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return value.to_bytes(16, "big")


def frame_id_str(frame_id: bytes) -> str:
    """32 lowercase hex chars (the form used in URLs and SQL)."""
    if not isinstance(frame_id, (bytes, bytearray)) or len(frame_id) != 16:
        raise ValueError("frame_id must be 16 bytes")
    return bytes(frame_id).hex()


def parse_frame_id(text: str) -> bytes:
    """Inverse of ``frame_id_str``; FrameIdError unless it is a UUIDv7 in 32 lowercase hex chars."""
    if not isinstance(text, str) or not FRAME_ID_HEX.fullmatch(text):
        raise FrameIdError(f"frame id must be 32 lowercase hex characters, got {text!r:.80}")
    fid = bytes.fromhex(text)
    check_frame_id(fid)
    return fid


def frame_id_ts_ms(frame_id: bytes) -> int:
    """Unix milliseconds encoded in a UUIDv7."""
    return int.from_bytes(frame_id[:6], "big")


def check_frame_id(fid: bytes) -> None:
    """FrameIdError unless the 16 bytes carry UUIDv7's version and variant bits."""
    if (fid[6] >> 4) != 0x7 or (fid[8] >> 6) != 0b10:
        raise FrameIdError(f"frame id {fid.hex()} is not a UUIDv7 (version/variant bits)")
