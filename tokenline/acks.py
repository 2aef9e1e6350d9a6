"""Commit acknowledgements (protocol v2): central tells a device, per frame id, what became of its frames.

Central publishes them on the device's own ``ack`` topic (``tokenline.topics.ack_topic``) after each commit; the
edge deletes a frame from its outbox only on such an acknowledgement (``committed`` or ``duplicate``), moves it
to its ``rejected`` table on ``rejected``, and sends again whatever stays unacknowledged (docs/protocol.md,
section 3). Binary, little-endian, CRC32-sealed like the token message; this module is the only implementation.
Python 3.8+, standard library only.

    offset  size  field
    0       4     magic "TKLA"
    4       1     version (1)
    5       1     flags (0)
    6       2     n: number of entries, 1..MAX_ENTRIES
    8       ...   n entries: frame id (16 bytes), status (u8), reason length r (u8), reason (r bytes ASCII)
    end-4   4     CRC32 of every byte before it

``status`` is 1 committed, 2 duplicate (committed earlier: also safe to delete) or 3 rejected; a rejected entry
carries the reason central's dead letter got (``[a-z0-9_]{1,64}``, e.g. ``identity_mismatch``), the others none.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Sequence

MAGIC = b"TKLA"
VERSION = 1
COMMITTED, DUPLICATE, REJECTED = 1, 2, 3
STATUS_NAMES = {COMMITTED: "committed", DUPLICATE: "duplicate", REJECTED: "rejected"}
MAX_ENTRIES = 1024  # per payload: at most 12 + 1024 x 82 bytes, even with the longest reasons
REASON_RE = re.compile(r"[a-z0-9_]{1,64}")

_HEAD = struct.Struct("<4sBBH")
_ENTRY = struct.Struct("<16sBB")
_CRC = struct.Struct("<I")


class AckError(ValueError):
    """An acknowledgement payload that is not version 1 of this format; the message says what is wrong."""


@dataclass(frozen=True)
class Ack:
    """What central did with one frame: ``status`` COMMITTED, DUPLICATE or REJECTED (with ``reason``)."""

    frame_id: bytes
    status: int
    reason: str = ""

    @property
    def confirmed(self) -> bool:
        """Stored at central (now or earlier): the edge may forget the frame."""
        return self.status in (COMMITTED, DUPLICATE)

    @property
    def status_name(self) -> str:
        return STATUS_NAMES.get(self.status, str(self.status))


def _check(a: Ack) -> bytes:
    if not isinstance(a.frame_id, (bytes, bytearray)) or len(a.frame_id) != 16:
        raise AckError("frame_id must be 16 bytes")
    if a.status not in STATUS_NAMES:
        raise AckError(f"status must be one of {sorted(STATUS_NAMES)}, got {a.status!r}")
    if a.status == REJECTED:
        if not isinstance(a.reason, str) or not REASON_RE.fullmatch(a.reason):
            raise AckError(f"a rejected entry needs a reason matching [a-z0-9_]{{1,64}}, got {a.reason!r:.80}")
        return a.reason.encode("ascii")
    if a.reason:
        raise AckError(f"only rejected entries carry a reason ({a.status_name} has {a.reason!r:.80})")
    return b""


def encode(acks: Sequence[Ack]) -> bytes:
    """One payload for 1..MAX_ENTRIES acknowledgements (``batches`` splits longer lists)."""
    if not 1 <= len(acks) <= MAX_ENTRIES:
        raise AckError(f"an acknowledgement carries 1..{MAX_ENTRIES} entries, got {len(acks)}")
    out = bytearray(_HEAD.pack(MAGIC, VERSION, 0, len(acks)))
    for a in acks:
        reason = _check(a)
        out += _ENTRY.pack(bytes(a.frame_id), a.status, len(reason)) + reason
    return bytes(out) + _CRC.pack(zlib.crc32(bytes(out)) & 0xFFFFFFFF)


def batches(acks: Iterable[Ack], size: int = MAX_ENTRIES) -> Iterator[bytes]:
    """Encoded payloads of at most ``size`` entries each, in order."""
    chunk: List[Ack] = []
    for a in acks:
        chunk.append(a)
        if len(chunk) >= size:
            yield encode(chunk)
            chunk = []
    if chunk:
        yield encode(chunk)


def decode(payload: bytes) -> List[Ack]:
    """Validate and split a payload; AckError names the first problem (never anything else on bad input)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise AckError(f"payload must be bytes, got {type(payload).__name__}")
    buf = bytes(payload)
    if len(buf) < _HEAD.size + _ENTRY.size + _CRC.size:
        raise AckError(f"payload of {len(buf)} bytes is shorter than the smallest acknowledgement")
    magic, version, flags, n = _HEAD.unpack_from(buf, 0)
    if magic != MAGIC:
        raise AckError(f"bad magic {magic!r}")
    if version != VERSION:
        raise AckError(f"unsupported acknowledgement version {version}")
    if flags:
        raise AckError(f"unknown flag bits {flags:#x}")
    if _CRC.unpack_from(buf, len(buf) - _CRC.size)[0] != zlib.crc32(buf[:-_CRC.size]) & 0xFFFFFFFF:
        raise AckError("CRC32 mismatch")
    if not 1 <= n <= MAX_ENTRIES:
        raise AckError(f"entry count {n} outside 1..{MAX_ENTRIES}")
    end, pos, out = len(buf) - _CRC.size, _HEAD.size, []
    for i in range(n):
        if pos + _ENTRY.size > end:
            raise AckError(f"entry {i} is truncated")
        fid, status, rlen = _ENTRY.unpack_from(buf, pos)
        pos += _ENTRY.size
        if pos + rlen > end:
            raise AckError(f"entry {i}: reason is truncated")
        try:
            reason = buf[pos:pos + rlen].decode("ascii")
        except UnicodeDecodeError:
            raise AckError(f"entry {i}: reason is not ASCII") from None
        pos += rlen
        a = Ack(fid, status, reason)
        try:
            _check(a)
        except AckError as exc:
            raise AckError(f"entry {i}: {exc}") from None
        out.append(a)
    if pos != end:
        raise AckError(f"{end - pos} bytes after the last entry")
    return out
