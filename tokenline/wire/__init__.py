"""Binary wire format of one token message (edge -> MQTT -> central): little-endian, CRC32-sealed, versioned.

``encode`` quantizes a ``TokenMessage`` (int8 / packed int4 / fp16 tokens) into version 2 (typed sections:
global embedding, tokens, sizes and centroids or a footprint, optional metadata) or, for centrals not yet
upgraded, version 1 (a fixed layout); ``decode`` reads either, validates everything and raises ``WireError``
with a machine-readable ``reason`` for anything it does not accept. Layouts, size tables and rejection
reasons are documented in ``docs/protocol.md``; this package is the only implementation (``common`` what
both versions share, ``v1`` and ``v2`` their layouts). Python 3.8+, numpy only.
"""

from __future__ import annotations

import struct
from typing import Optional

from tokenline.wire import v1, v2
from tokenline.wire.common import (
    CRC_SIZE, DEFAULT_MAX_BYTES, DTYPE_CODES, FLAG_REPLAYED, KNOWN_FLAGS, MAGIC, MAX_METADATA_BYTES, REASONS,
    TokenMessage, WireError, as_decoded, check_metadata, pack_int4, quantize, seal, unpack_int4,
)

VERSIONS = (1, 2)
VERSION = 2  # what ``encode`` writes unless told otherwise
message_size = v2.message_size
message_size_v1 = v1.message_size

__all__ = [
    "CRC_SIZE", "DEFAULT_MAX_BYTES", "DTYPE_CODES", "FLAG_REPLAYED", "KNOWN_FLAGS", "MAGIC", "MAX_METADATA_BYTES",
    "REASONS", "VERSION", "VERSIONS", "TokenMessage", "WireError", "as_decoded", "check_metadata", "decode", "encode",
    "message_size", "message_size_v1", "pack_int4", "peek_frame_id", "quantize", "unpack_int4", "with_flags",
    "with_header",
]


def encode(msg: TokenMessage, token_dtype: Optional[str] = None, *, version: int = VERSION) -> bytes:
    """Serialize ``msg``; ``token_dtype`` (default: ``msg.token_dtype``) is "int8", "int4" or "fp16".

    Raises WireError (same reasons as ``decode``) when the message itself is invalid.
    """
    mode = token_dtype or msg.token_dtype
    if mode not in DTYPE_CODES:
        raise WireError("bad_dtype", f"token_dtype must be one of {sorted(DTYPE_CODES)}, got {mode!r}")
    if version == 1:
        return v1.encode(msg, mode)
    if version == 2:
        return v2.encode(msg, mode)
    raise WireError("bad_version", f"wire version must be one of {VERSIONS}, got {version!r}")


def decode(buf: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> TokenMessage:
    """Parse and validate one message of any supported version; raises WireError(reason) otherwise."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise WireError("not_bytes", f"payload must be bytes, got {type(buf).__name__}")
    if len(buf) > max_bytes:
        raise WireError("too_large", f"payload is {len(buf)} bytes, limit {max_bytes}")
    if len(buf) < 5:
        raise WireError("bad_magic" if len(buf) >= 4 else "truncated", f"payload does not start with {MAGIC!r}")
    version = bytes(buf[4:5])[0]
    if bytes(buf[:4]) == MAGIC and version not in VERSIONS:
        raise WireError("bad_version", f"wire version {version}, this build reads {VERSIONS}")
    return (v1 if version == 1 else v2).decode(buf, max_bytes)


# Both versions keep flags at byte 7 and seq at byte 36, so the outbox can restamp either without decoding.
def _offset(header, name: str) -> int:
    names = [n for n, _ in header]
    return struct.calcsize("<" + "".join(code for _, code in header[: names.index(name)]))


_FLAGS_AT, _SEQ_AT = _offset(v1.HEADER, "flags"), _offset(v1.HEADER, "seq")
assert (_FLAGS_AT, _SEQ_AT) == (_offset(v2.HEADER, "flags"), _offset(v2.HEADER, "seq"))
_FRAME_ID_AT = _offset(v1.HEADER, "frame_id")  # the same in both versions, too
assert _FRAME_ID_AT == _offset(v2.HEADER, "frame_id")


def peek_frame_id(buf: bytes) -> Optional[bytes]:
    """The frame id field of a payload that at least starts like a token message (magic and a complete id, any
    version), without validating anything else; None otherwise. Central uses it to tell a device which of its
    messages it rejected (tokenline.acks)."""
    if not isinstance(buf, (bytes, bytearray, memoryview)) or len(buf) < _FRAME_ID_AT + 16 or bytes(buf[:4]) != MAGIC:
        return None
    return bytes(buf[_FRAME_ID_AT:_FRAME_ID_AT + 16])


def with_header(buf: bytes, *, flags: Optional[int] = None, seq: Optional[int] = None) -> bytes:
    """Return an encoded message with its flags and/or seq replaced and the CRC recomputed (no re-quantization)."""
    if len(buf) < v2.FIXED_SIZE + CRC_SIZE or buf[:4] != MAGIC or buf[4] not in VERSIONS:
        raise WireError("bad_magic", "not an encoded token message")
    b = bytearray(buf[:-CRC_SIZE])
    if flags is not None:
        if flags & ~KNOWN_FLAGS or flags < 0:
            raise WireError("bad_flags", f"unknown flag bits in {flags!r}")
        struct.pack_into("<B", b, _FLAGS_AT, flags)
    if seq is not None:
        if not 0 <= seq < 2**32:
            raise WireError("out_of_range", f"seq must be a uint32, got {seq!r}")
        struct.pack_into("<I", b, _SEQ_AT, seq)
    return seal(bytes(b))


def with_flags(buf: bytes, flags: int) -> bytes:
    """Return an encoded message with its flags byte replaced and the CRC recomputed."""
    return with_header(buf, flags=flags)
