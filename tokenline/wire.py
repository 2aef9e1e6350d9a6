"""Binary wire format of one token message (edge -> MQTT -> central), version 1, little-endian, CRC32-sealed.

Byte-by-byte layout, size tables and rejection reasons are documented in ``docs/protocol.md``; this module
is the only implementation. ``encode`` quantizes (int8 / packed int4 / fp16 tokens), ``decode`` validates
everything and raises ``WireError`` with a machine-readable ``reason`` for anything it does not accept.
Python 3.8+, numpy only.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from tokenline.frame_id import FrameIdError, check_frame_id, frame_id_str
from tokenline.summary import Summary
from tokenline.topics import NAME_RE, NAME_RULE

MAGIC = b"TKLN"
VERSION = 1
DEFAULT_MAX_BYTES = 65536

# token_dtype codes on the wire
DTYPE_CODES: Dict[str, int] = {"int8": 1, "int4": 2, "fp16": 3}
CODE_DTYPES: Dict[int, str] = {v: k for k, v in DTYPE_CODES.items()}
# global embedding codes on the wire (int8 for the int8/int4 token modes, fp16 for fp16)
GLOBAL_INT8, GLOBAL_FP16 = 1, 3
GLOBAL_FOR_TOKENS: Dict[str, int] = {"int8": GLOBAL_INT8, "int4": GLOBAL_INT8, "fp16": GLOBAL_FP16}

FLAG_REPLAYED = 0x01  # bit 0: sent from the outbox after a reconnect/restart (historical, as in Sparkplug)
KNOWN_FLAGS = FLAG_REPLAYED

MAX_K = 1024
MAX_D = 8192
NAME_FIELDS = ("device", "site", "line", "camera")

# The fixed header, field by field (struct codes, little-endian, no padding); offsets derive from it.
HEADER: Tuple[Tuple[str, str], ...] = (
    ("magic", "4s"), ("version", "B"), ("token_dtype", "B"), ("global_dtype", "B"), ("flags", "B"),
    ("total_len", "I"), ("frame_id", "16s"), ("capture_ts_us", "q"), ("seq", "I"), ("manifest_hash", "16s"),
    ("k", "H"), ("d", "H"),
)
_FIXED = struct.Struct("<" + "".join(code for _, code in HEADER))
FIXED_SIZE = _FIXED.size  # 60
CRC_SIZE = 4
_CENTROID_SCALE = 65535.0


def _field(name: str) -> Tuple[int, str]:
    """(byte offset, little-endian struct format) of one header field."""
    names = [n for n, _ in HEADER]
    i = names.index(name)
    return struct.calcsize("<" + "".join(code for _, code in HEADER[:i])), "<" + HEADER[i][1]


class WireError(ValueError):
    """A message that cannot be encoded or decoded. ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# Every reason ``decode``/``encode`` can give (documented in docs/protocol.md).
REASONS = (
    "not_bytes", "too_large", "truncated", "bad_magic", "bad_version", "length_mismatch", "bad_crc",
    "bad_dtype", "bad_dims", "bad_flags", "bad_frame_id", "bad_string", "bad_timestamp", "non_finite",
    "out_of_range", "bad_value",
)


@dataclass(frozen=True, eq=False)
class TokenMessage:
    """One frame's summary as carried on the wire (the summary is float32, dequantized after ``decode``)."""

    frame_id: bytes
    device: str
    site: str
    line: str
    camera: str
    capture_ts_us: int
    seq: int
    manifest_hash: bytes
    summary: Summary
    token_dtype: str = "int8"
    flags: int = 0

    @property
    def frame_id_hex(self) -> str:
        return frame_id_str(self.frame_id)

    @property
    def replayed(self) -> bool:
        return bool(self.flags & FLAG_REPLAYED)


def _check_frame_id(fid: bytes) -> None:
    try:
        check_frame_id(fid)
    except FrameIdError as exc:
        raise WireError(exc.reason, str(exc)) from None


# -- quantization (pure) ------------------------------------------------------------------------------------
def quantize(x: np.ndarray, bits: int) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row quantization to ``bits`` (8 or 4): (q int8 [..., D] in [-qmax, qmax], scale float32
    [...]) with qmax = 2**(bits-1) - 1 (127 or 7); x ~= q * scale. -qmax-1 is never produced (decode refuses it)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    qmax = (1 << (bits - 1)) - 1
    x = np.asarray(x, dtype=np.float32)
    amax = np.max(np.abs(x), axis=-1)
    scale = (amax / float(qmax)).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / safe[..., None]), -qmax, qmax).astype(np.int8)
    return q, scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], [..., D] -> packed uint8 [..., ceil(D/2)].

    Two values per byte, element 2i in the low nibble, 2i+1 in the high nibble, two's complement;
    an odd D pads the last high nibble with 0.
    """
    q = np.asarray(q, dtype=np.int8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), dtype=np.int8)], axis=-1)
    nib = (q.astype(np.int16) & 0x0F).astype(np.uint8)
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, d: int) -> np.ndarray:
    """Packed nibbles [..., ceil(D/2)] -> int8 [..., D] in [-8, 7]."""
    lo = (packed & 0x0F).astype(np.int8)
    hi = (packed >> 4).astype(np.int8)
    both = np.stack([lo, hi], axis=-1).reshape(packed.shape[:-1] + (packed.shape[-1] * 2,))[..., :d]
    return np.where(both > 7, both - 16, both).astype(np.int8)


# -- sizes --------------------------------------------------------------------------------------------------
def _section_sizes(token_dtype: str, k: int, d: int) -> Tuple[int, int]:
    """(global section bytes, token section bytes)."""
    if token_dtype == "int8":
        return 4 + d, 4 * k + k * d
    if token_dtype == "int4":
        return 4 + d, 4 * k + k * ((d + 1) // 2)
    return 2 * d, 2 * k * d


def message_size(token_dtype: str, k: int, d: int, names: Tuple[str, str, str, str] = ("", "", "", "")) -> int:
    """Exact encoded size in bytes for the given mode, dimensions and name strings."""
    g, t = _section_sizes(token_dtype, k, d)
    strings = sum(1 + len(s.encode("ascii")) for s in names)
    return FIXED_SIZE + strings + g + t + 4 * k + 4 * k + CRC_SIZE


# -- encode -------------------------------------------------------------------------------------------------
def _check_name(field: str, value: object) -> bytes:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise WireError("bad_string", f"{field} must match {NAME_RULE}, got {value!r:.80}")
    return value.encode("ascii")


def encode(msg: TokenMessage, token_dtype: Optional[str] = None) -> bytes:
    """Serialize ``msg``; ``token_dtype`` (default: ``msg.token_dtype``) is "int8", "int4" or "fp16".

    Raises WireError (same reasons as ``decode``) when the message itself is invalid.
    """
    mode = token_dtype or msg.token_dtype
    if mode not in DTYPE_CODES:
        raise WireError("bad_dtype", f"token_dtype must be one of {sorted(DTYPE_CODES)}, got {mode!r}")
    if not isinstance(msg.frame_id, (bytes, bytearray)) or len(msg.frame_id) != 16:
        raise WireError("bad_frame_id", "frame_id must be 16 bytes")
    _check_frame_id(bytes(msg.frame_id))
    if not isinstance(msg.manifest_hash, (bytes, bytearray)) or len(msg.manifest_hash) != 16:
        raise WireError("bad_value", "manifest_hash must be 16 bytes")
    if not isinstance(msg.capture_ts_us, (int, np.integer)) or not 0 <= int(msg.capture_ts_us) < 2**63:
        raise WireError("bad_timestamp", f"capture_ts_us must be a non-negative int64, got {msg.capture_ts_us!r}")
    if not isinstance(msg.seq, (int, np.integer)) or not 0 <= int(msg.seq) < 2**32:
        raise WireError("out_of_range", f"seq must be a uint32, got {msg.seq!r}")
    if not isinstance(msg.flags, (int, np.integer)) or int(msg.flags) & ~KNOWN_FLAGS or msg.flags < 0:
        raise WireError("bad_flags", f"unknown flag bits in {msg.flags!r}")
    names = [_check_name(f, getattr(msg, f)) for f in NAME_FIELDS]

    g, t, s, c = (np.asarray(a, dtype=np.float32) for a in msg.summary.arrays())
    if g.ndim != 1 or not 1 <= g.shape[0] <= MAX_D:
        raise WireError("bad_dims", f"global_embedding must be [D] with 1 <= D <= {MAX_D}, got {g.shape}")
    d = g.shape[0]
    if t.ndim != 2 or t.shape[1] != d or not 1 <= t.shape[0] <= MAX_K:
        raise WireError("bad_dims", f"tokens must be [K, {d}] with 1 <= K <= {MAX_K}, got {t.shape}")
    k = t.shape[0]
    if s.shape != (k,) or c.shape != (k, 2):
        raise WireError("bad_dims", f"sizes must be [{k}] and centroids [{k}, 2], got {s.shape} and {c.shape}")
    for name, arr in (("global_embedding", g), ("tokens", t), ("sizes", s), ("centroids", c)):
        if not np.all(np.isfinite(arr)):
            raise WireError("non_finite", f"{name} contains NaN or Inf")
    if np.any(s < 0):
        raise WireError("out_of_range", "sizes must be >= 0")
    if np.any(c < 0) or np.any(c > 1):
        raise WireError("out_of_range", "centroids must lie in [0, 1]")

    parts = []
    if mode == "fp16":
        if np.any(np.abs(g) > 65504) or np.any(np.abs(t) > 65504):
            raise WireError("out_of_range", "values exceed the float16 range")
        parts += [g.astype("<f2").tobytes(), t.astype("<f2").tobytes()]
        gcode = GLOBAL_FP16
    else:
        gq, gs = quantize(g, 8)
        parts += [np.asarray(gs, dtype="<f4").tobytes(), gq.tobytes()]
        tq, ts = quantize(t, 8 if mode == "int8" else 4)
        parts += [ts.astype("<f4").tobytes(), (tq if mode == "int8" else pack_int4(tq)).tobytes()]
        gcode = GLOBAL_INT8
    parts.append(s.astype("<f4").tobytes())
    parts.append(np.rint(c * _CENTROID_SCALE).astype("<u2").tobytes())

    strings = b"".join(bytes([len(n)]) + n for n in names)
    body = b"".join(parts)
    total = FIXED_SIZE + len(strings) + len(body) + CRC_SIZE
    head = _FIXED.pack(MAGIC, VERSION, DTYPE_CODES[mode], gcode, int(msg.flags), total, bytes(msg.frame_id),
                       int(msg.capture_ts_us), int(msg.seq), bytes(msg.manifest_hash), k, d)
    out = head + strings + body
    return out + struct.pack("<I", zlib.crc32(out) & 0xFFFFFFFF)


# -- decode -------------------------------------------------------------------------------------------------
class _Reader:
    def __init__(self, buf: bytes, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.end:
            raise WireError("length_mismatch", f"message ends inside {what} ({self.end - self.pos} of {n} bytes)")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(itemsize * count, what), dtype=dtype, count=count)


def _finite(name: str, arr: np.ndarray) -> None:
    if not np.all(np.isfinite(arr)):
        raise WireError("non_finite", f"{name} contains NaN or Inf")


def decode(buf: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> TokenMessage:
    """Parse and validate one message; raises WireError(reason) for anything not exactly version 1."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise WireError("not_bytes", f"payload must be bytes, got {type(buf).__name__}")
    buf = bytes(buf)
    n = len(buf)
    if n > max_bytes:
        raise WireError("too_large", f"payload is {n} bytes, limit {max_bytes}")
    if n < 4 or buf[:4] != MAGIC:
        raise WireError("bad_magic" if n >= 4 else "truncated", f"payload does not start with {MAGIC!r}")
    if n < FIXED_SIZE + CRC_SIZE:
        raise WireError("truncated", f"payload is {n} bytes, shorter than the {FIXED_SIZE + CRC_SIZE}-byte minimum")
    (_, version, tcode, gcode, flags, total, fid, ts_us, seq, mhash, k, d) = _FIXED.unpack_from(buf, 0)
    if version != VERSION:
        raise WireError("bad_version", f"wire version {version}, this build reads {VERSION}")
    if total != n:
        raise WireError("length_mismatch", f"header says {total} bytes, payload has {n}")
    crc_got = struct.unpack_from("<I", buf, n - CRC_SIZE)[0]
    crc_want = zlib.crc32(buf[: n - CRC_SIZE]) & 0xFFFFFFFF
    if crc_got != crc_want:
        raise WireError("bad_crc", f"CRC32 {crc_got:08x} does not match the content ({crc_want:08x})")
    if tcode not in CODE_DTYPES:
        raise WireError("bad_dtype", f"unknown token dtype code {tcode}")
    mode = CODE_DTYPES[tcode]
    if gcode != GLOBAL_FOR_TOKENS[mode]:
        raise WireError("bad_dtype", f"global dtype code {gcode} is not valid with {mode} tokens")
    if flags & ~KNOWN_FLAGS:
        raise WireError("bad_flags", f"unknown flag bits 0x{flags & ~KNOWN_FLAGS:02x}")
    _check_frame_id(fid)
    if ts_us < 0:
        raise WireError("bad_timestamp", f"capture_ts_us {ts_us} is negative")
    if not (1 <= k <= MAX_K and 1 <= d <= MAX_D):
        raise WireError("bad_dims", f"K={k}, D={d} outside 1..{MAX_K} / 1..{MAX_D}")

    r = _Reader(buf, FIXED_SIZE, n - CRC_SIZE)
    names = []
    for field in NAME_FIELDS:
        ln = r.take(1, f"{field} length")[0]
        raw = r.take(ln, field)
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise WireError("bad_string", f"{field} is not ASCII") from None
        if not NAME_RE.match(text):
            raise WireError("bad_string", f"{field} {text!r} does not match {NAME_RULE}")
        names.append(text)

    expect = message_size(mode, k, d, tuple(names))  # type: ignore[arg-type]
    if expect != n:
        raise WireError("length_mismatch", f"K={k}, D={d}, {mode} need {expect} bytes, payload has {n}")

    if mode == "fp16":
        g = r.array("<f2", d, "global_embedding").astype(np.float32)
        t = r.array("<f2", k * d, "tokens").astype(np.float32).reshape(k, d)
        _finite("global_embedding", g)
        _finite("tokens", t)
    else:
        gs = r.array("<f4", 1, "global scale")
        _finite("global scale", gs)
        if gs[0] < 0:
            raise WireError("out_of_range", "global scale is negative")
        gq = r.array("<i1", d, "global_embedding")
        ts = r.array("<f4", k, "token scales")
        _finite("token scales", ts)
        if np.any(ts < 0):
            raise WireError("out_of_range", "token scales must be >= 0")
        if mode == "int8":
            tq = r.array("<i1", k * d, "tokens").reshape(k, d)
        else:
            tq = unpack_int4(r.array("<u1", k * ((d + 1) // 2), "tokens").reshape(k, (d + 1) // 2), d)
        if np.any(gq == -128) or np.any(tq == -128) or (mode == "int4" and np.any(tq == -8)):
            raise WireError("out_of_range", "quantized values must be symmetric (no -128 / -8)")
        g = gq.astype(np.float32) * gs[0]
        t = tq.astype(np.float32) * ts[:, None]
        _finite("global_embedding", g)
        _finite("tokens", t)
    sizes = r.array("<f4", k, "sizes").astype(np.float32)
    _finite("sizes", sizes)
    if np.any(sizes < 0):
        raise WireError("out_of_range", "sizes must be >= 0")
    centroids = (r.array("<u2", 2 * k, "centroids").astype(np.float32) / _CENTROID_SCALE).reshape(k, 2)
    return TokenMessage(
        frame_id=fid, device=names[0], site=names[1], line=names[2], camera=names[3], capture_ts_us=ts_us,
        seq=seq, manifest_hash=mhash, summary=Summary(g, t, sizes, centroids), token_dtype=mode, flags=flags,
    )


_FLAGS, _SEQ = _field("flags"), _field("seq")
_FRAME_ID = _field("frame_id")


def peek_frame_id(buf: bytes) -> Optional[bytes]:
    """The frame id field of a payload that at least starts like a token message (magic and a complete id),
    without validating anything else; None otherwise. Central uses it to tell a device which of its messages
    it rejected."""
    off = _FRAME_ID[0]
    if not isinstance(buf, (bytes, bytearray, memoryview)) or len(buf) < off + 16 or bytes(buf[:4]) != MAGIC:
        return None
    return bytes(buf[off:off + 16])


def with_header(buf: bytes, *, flags: Optional[int] = None, seq: Optional[int] = None) -> bytes:
    """Return an encoded message with its flags and/or seq replaced and the CRC recomputed (no re-quantization)."""
    if len(buf) < FIXED_SIZE + CRC_SIZE or buf[:4] != MAGIC:
        raise WireError("bad_magic", "not an encoded token message")
    b = bytearray(buf[:-CRC_SIZE])
    if flags is not None:
        if flags & ~KNOWN_FLAGS or flags < 0:
            raise WireError("bad_flags", f"unknown flag bits in {flags!r}")
        struct.pack_into(_FLAGS[1], b, _FLAGS[0], flags)
    if seq is not None:
        if not 0 <= seq < 2**32:
            raise WireError("out_of_range", f"seq must be a uint32, got {seq!r}")
        struct.pack_into(_SEQ[1], b, _SEQ[0], seq)
    return bytes(b) + struct.pack("<I", zlib.crc32(bytes(b)) & 0xFFFFFFFF)


def with_flags(buf: bytes, flags: int) -> bytes:
    """Return an encoded message with its flags byte replaced and the CRC recomputed."""
    return with_header(buf, flags=flags)
