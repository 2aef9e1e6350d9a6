"""What both wire versions share: the message type, errors and reasons, quantization, names, metadata, reading.

Python 3.8+, numpy only.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from tokenline.anomaly import AnomalyScore
from tokenline.frame_id import FrameIdError, check_frame_id, frame_id_str
from tokenline.summary import Summary
from tokenline.topics import NAME_RE, NAME_RULE

MAGIC = b"TKLN"
DEFAULT_MAX_BYTES = 65536
CRC_SIZE = 4

# token encodings ("token_dtype"); their codes on the wire (v1 header byte 5, v2 section codec)
DTYPE_CODES: Dict[str, int] = {"int8": 1, "int4": 2, "fp16": 3}
CODE_DTYPES: Dict[int, str] = {v: k for k, v in DTYPE_CODES.items()}

FLAG_REPLAYED = 0x01  # bit 0: sent again from the outbox (after a reconnect, restart or missing confirmation)
KNOWN_FLAGS = FLAG_REPLAYED

MAX_K = 1024
MAX_D = 8192
NAME_FIELDS = ("device", "site", "line", "camera")

# Frame metadata (v2 METADATA section): where the frame came from and free-form labels.
MAX_METADATA_BYTES = 2048
MAX_LABELS = 32
MAX_LABEL_VALUE = 128
MAX_SOURCE = 255
MAX_FRAME_SIDE = 65535  # metadata.frame: width and height of the camera frame, pixels
METADATA_KEYS = ("source", "labels", "frame")


class WireError(ValueError):
    """A message that cannot be encoded or decoded. ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# Every reason ``decode``/``encode`` can give (documented in docs/protocol.md).
REASONS = (
    "not_bytes", "too_large", "truncated", "bad_magic", "bad_version", "length_mismatch", "bad_crc",
    "bad_dtype", "bad_dims", "bad_flags", "bad_frame_id", "bad_string", "bad_timestamp", "non_finite",
    "out_of_range", "bad_value", "bad_section", "bad_metadata",
)


@dataclass(frozen=True, eq=False)
class TokenMessage:
    """One frame's summary as carried on the wire (the summary is float32, dequantized after ``decode``).

    ``metadata`` (v2 only) is ``{"source": file name, "labels": {name: text}}`` with either key optional;
    ``anomaly`` (v2 only) is the edge's own anomaly score of the frame against a bank exported from central;
    ``version`` is the wire version the message was decoded from (what ``encode`` writes by default);
    ``raw_rows`` (set by ``decode`` for int8 and int4 tokens) is the token rows as they arrived, in the layout
    of ``encode_rows`` for ``token_dtype`` (K float32 scales, then K*d int8 values or K*ceil(d/2) bytes of int4
    pairs), so that a reader storing them keeps exactly the values that arrived, with no second rounding and in
    as few bytes; they are read through ``token_rows()``, which drops them once the summary is replaced
    (``dataclasses.replace``).
    """

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
    metadata: Optional[Dict[str, Any]] = None
    anomaly: Optional[AnomalyScore] = None
    version: int = 2
    raw_rows: Optional[bytes] = field(default=None, repr=False)
    rows_of: Optional[Summary] = field(default=None, repr=False)  # the summary ``raw_rows`` encode

    def token_rows(self) -> Optional[bytes]:
        """``raw_rows`` while they still encode this message's summary, else None."""
        return self.raw_rows if self.raw_rows is not None and self.rows_of is self.summary else None

    @property
    def frame_id_hex(self) -> str:
        return frame_id_str(self.frame_id)

    @property
    def replayed(self) -> bool:
        return bool(self.flags & FLAG_REPLAYED)


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


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 values of quantized rows: ``q`` [..., D] times their ``scale`` [...] (what ``decode`` yields)."""
    return q.astype(np.float32) * np.asarray(scale, np.float32)[..., None]


def as_decoded(x: np.ndarray, mode: str) -> np.ndarray:
    """Rows [..., d] exactly as a reader will decode them after ``encode`` in token encoding ``mode``: an edge
    that scores its own tokens scores what central receives."""
    x = np.asarray(x, dtype=np.float32)
    if mode == "fp16":
        return x.astype("<f2").astype(np.float32)
    if mode not in ("int8", "int4"):
        raise WireError("bad_dtype", f"token_dtype must be one of {sorted(DTYPE_CODES)}, got {mode!r}")
    return dequantize(*quantize(x, 8 if mode == "int8" else 4))


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], [..., D] -> packed uint8 [..., ceil(D/2)].

    Two values per byte, element 2i in the low nibble, 2i+1 in the high nibble, two's complement;
    an odd D pads the last high nibble with 0.
    """
    return pack_nibbles(np.asarray(q, dtype=np.int16) & 0x0F)


def pack_nibbles(v: np.ndarray) -> np.ndarray:
    """Values in [0, 15], [..., N] -> uint8 [..., ceil(N/2)], element 2i low, 2i+1 high, odd N padded with 0."""
    v = np.asarray(v).astype(np.uint8)
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (1,), dtype=np.uint8)], axis=-1)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of ``pack_nibbles``: uint8 [..., ceil(N/2)] -> uint8 [..., N] in [0, 15]."""
    packed = np.asarray(packed, np.uint8)
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :n]


def unpack_int4(packed: np.ndarray, d: int) -> np.ndarray:
    """Packed nibbles [..., ceil(D/2)] -> int8 [..., D] in [-8, 7]: arithmetic shifts of the bytes as int8 sign-
    extend each nibble (low: shift left 4 then right 4; high: right 4)."""
    s = np.ascontiguousarray(packed, np.uint8).view(np.int8)
    out = np.empty(s.shape + (2,), np.int8)
    np.right_shift(np.left_shift(s, 4), 4, out=out[..., 0])
    np.right_shift(s, 4, out=out[..., 1])
    return out.reshape(s.shape[:-1] + (2 * s.shape[-1],))[..., :d]


# -- checks shared by both versions -------------------------------------------------------------------------
def check_frame_id_bytes(fid: object) -> bytes:
    if not isinstance(fid, (bytes, bytearray)) or len(fid) != 16:
        raise WireError("bad_frame_id", "frame_id must be 16 bytes")
    try:
        check_frame_id(bytes(fid))
    except FrameIdError as exc:
        raise WireError(exc.reason, str(exc)) from None
    return bytes(fid)


def check_header_fields(msg: TokenMessage) -> List[bytes]:
    """Validate the scalar fields every version carries; returns the four names as ASCII bytes."""
    check_frame_id_bytes(msg.frame_id)
    if not isinstance(msg.manifest_hash, (bytes, bytearray)) or len(msg.manifest_hash) != 16:
        raise WireError("bad_value", "manifest_hash must be 16 bytes")
    if not isinstance(msg.capture_ts_us, (int, np.integer)) or not 0 <= int(msg.capture_ts_us) < 2**63:
        raise WireError("bad_timestamp", f"capture_ts_us must be a non-negative int64, got {msg.capture_ts_us!r}")
    if not isinstance(msg.seq, (int, np.integer)) or not 0 <= int(msg.seq) < 2**32:
        raise WireError("out_of_range", f"seq must be a uint32, got {msg.seq!r}")
    if not isinstance(msg.flags, (int, np.integer)) or int(msg.flags) & ~KNOWN_FLAGS or msg.flags < 0:
        raise WireError("bad_flags", f"unknown flag bits in {msg.flags!r}")
    return [check_name(f, getattr(msg, f)) for f in NAME_FIELDS]


def check_name(field: str, value: object) -> bytes:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise WireError("bad_string", f"{field} must match {NAME_RULE}, got {value!r:.80}")
    return value.encode("ascii")


def pack_names(names: List[bytes]) -> bytes:
    return b"".join(bytes([len(n)]) + n for n in names)


def finite(name: str, arr: np.ndarray) -> None:
    if not np.isfinite(arr).all():
        raise WireError("non_finite", f"{name} contains NaN or Inf")


# rows quantized with scales up to this dequantize to finite float32 values (127 * scale < float32 max): then one
# check of the scales stands for one of every value
SAFE_SCALE = float(np.finfo(np.float32).max) / 128.0


def _scales_safe(name: str, scales: np.ndarray) -> bool:
    """Check quantization scales: finite (``non_finite``) and >= 0 (``out_of_range``); True when every one is
    below ``SAFE_SCALE`` (the dequantized values need no check of their own)."""
    if ((scales >= 0) & (scales <= SAFE_SCALE)).all():  # NaN fails both comparisons
        return True
    finite(name, scales)
    if (scales < 0).any():
        raise WireError("out_of_range", f"{name} must be >= 0")
    return False


def check_vectors(summary: Summary, same_dim: bool) -> Tuple[np.ndarray, np.ndarray]:
    """(global [D], tokens [K, d]) as float32, checked: shapes, finite. ``same_dim``: d must equal D (v1)."""
    g = np.asarray(summary.global_embedding, dtype=np.float32)
    t = np.asarray(summary.tokens, dtype=np.float32)
    if g.ndim != 1 or not 1 <= g.shape[0] <= MAX_D:
        raise WireError("bad_dims", f"global_embedding must be [D] with 1 <= D <= {MAX_D}, got {g.shape}")
    d = g.shape[0] if same_dim else (t.shape[1] if t.ndim == 2 else -1)
    if t.ndim != 2 or t.shape[1] != d or not 1 <= t.shape[0] <= MAX_K or not 1 <= d <= MAX_D:
        want = f"[K, {d}]" if same_dim else "[K, d]"
        raise WireError("bad_dims", f"tokens must be {want} with 1 <= K <= {MAX_K}, got {t.shape}")
    finite("global_embedding", g)
    finite("tokens", t)
    return g, t


def check_boxes(sizes: object, centroids: object, k: int) -> Tuple[np.ndarray, np.ndarray]:
    s = np.asarray(sizes, dtype=np.float32)
    c = np.asarray(centroids, dtype=np.float32)
    if s.shape != (k,) or c.shape != (k, 2):
        raise WireError("bad_dims", f"sizes must be [{k}] and centroids [{k}, 2], got {s.shape} and {c.shape}")
    finite("sizes", s)
    finite("centroids", c)
    if np.any(s < 0):
        raise WireError("out_of_range", "sizes must be >= 0")
    if np.any(c < 0) or np.any(c > 1):
        raise WireError("out_of_range", "centroids must lie in [0, 1]")
    return s, c


def encode_vector(x: np.ndarray, bits: int) -> bytes:
    """f32 scale + int8 values (one vector, bits 8)."""
    q, s = quantize(x, bits)
    return np.asarray(s, dtype="<f4").tobytes() + q.tobytes()


def encode_rows(x: np.ndarray, mode: str) -> bytes:
    """Rows [K, d] in ``mode``: int8/int4 -> K f32 scales then the values; fp16 -> the halves."""
    if mode == "fp16":
        if np.any(np.abs(x) > 65504):
            raise WireError("out_of_range", "values exceed the float16 range")
        return x.astype("<f2").tobytes()
    q, s = quantize(x, 8 if mode == "int8" else 4)
    return s.astype("<f4").tobytes() + (q if mode == "int8" else pack_int4(q)).tobytes()


def rows_size(mode: str, k: int, d: int) -> int:
    """Bytes of ``encode_rows`` for [K, d]."""
    if mode == "int8":
        return 4 * k + k * d
    if mode == "int4":
        return 4 * k + k * ((d + 1) // 2)
    return 2 * k * d


# -- metadata (v2) ------------------------------------------------------------------------------------------
def check_metadata(meta: object) -> Dict[str, Any]:
    """Validate frame metadata: ``{"source"?: str, "labels"?: {name: str}, "frame"?: {"width": int, "height": int,
    "roi"?: [x, y, w, h]}}`` (``frame``: the camera frame's size and the region of it the model saw, inside the
    frame; ``tokenline.preprocess.FrameGeometry``); WireError('bad_metadata')."""
    if not isinstance(meta, dict):
        raise WireError("bad_metadata", f"metadata must be an object, got {type(meta).__name__}")
    unknown = sorted(set(meta) - set(METADATA_KEYS))
    if unknown:
        raise WireError("bad_metadata", f"metadata has unknown keys {unknown} (allowed: {list(METADATA_KEYS)})")
    out: Dict[str, Any] = {}
    src = meta.get("source")
    if src is not None:
        if not isinstance(src, str) or not 1 <= len(src) <= MAX_SOURCE or not src.isprintable():
            raise WireError("bad_metadata", f"metadata.source must be 1..{MAX_SOURCE} printable characters")
        out["source"] = src
    labels = meta.get("labels")
    if labels is not None:
        if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
            raise WireError("bad_metadata", f"metadata.labels must be an object of at most {MAX_LABELS} entries")
        for key, value in labels.items():
            if not isinstance(key, str) or not NAME_RE.match(key):
                raise WireError("bad_metadata", f"label name {key!r:.80} must match {NAME_RULE}")
            if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE or not value.isprintable():
                raise WireError("bad_metadata", f"label {key}: value must be at most {MAX_LABEL_VALUE} printable "
                                                "characters")
        out["labels"] = dict(sorted(labels.items()))
    frame = meta.get("frame")
    if frame is not None:
        out["frame"] = _check_frame(frame)
    return out


def _int_in(v: object, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _check_frame(frame: object) -> Dict[str, Any]:
    """metadata.frame: ``{"width", "height", "roi"?}`` with the ROI inside the frame."""
    rule = (f"metadata.frame must be {{\"width\": 1..{MAX_FRAME_SIDE}, \"height\": 1..{MAX_FRAME_SIDE}, "
            "\"roi\"?: [x, y, w, h] inside the frame}")
    if not isinstance(frame, dict) or set(frame) - {"width", "height", "roi"}:
        raise WireError("bad_metadata", rule)
    w, h, roi = frame.get("width"), frame.get("height"), frame.get("roi")
    if not (_int_in(w, 1, MAX_FRAME_SIDE) and _int_in(h, 1, MAX_FRAME_SIDE)):
        raise WireError("bad_metadata", rule)
    out: Dict[str, Any] = {"width": w, "height": h}
    if roi is not None:
        if not (isinstance(roi, list) and len(roi) == 4 and all(_int_in(v, 0, MAX_FRAME_SIDE) for v in roi)
                and roi[2] >= 1 and roi[3] >= 1 and roi[0] + roi[2] <= w and roi[1] + roi[3] <= h):
            raise WireError("bad_metadata", rule)
        out["roi"] = list(roi)
    return out


def encode_metadata(meta: Dict[str, Any]) -> bytes:
    raw = json.dumps(check_metadata(meta), separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")
    if len(raw) > MAX_METADATA_BYTES:
        raise WireError("bad_metadata", f"metadata is {len(raw)} bytes encoded, limit {MAX_METADATA_BYTES}")
    return raw


def decode_metadata(raw: bytes) -> Dict[str, Any]:
    if len(raw) > MAX_METADATA_BYTES:
        raise WireError("bad_metadata", f"metadata is {len(raw)} bytes, limit {MAX_METADATA_BYTES}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError("bad_metadata", f"metadata is not UTF-8 JSON: {exc}") from None
    return check_metadata(data)


# -- reading ------------------------------------------------------------------------------------------------
class Reader:
    """Bounds-checked reads over ``buf[pos:end]``."""

    def __init__(self, buf: bytes, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise WireError("length_mismatch", f"message ends inside {what} ({self.end - self.pos} of {n} bytes)")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(itemsize * count, what), dtype=dtype, count=count)

    def names(self) -> List[str]:
        out = []
        for key in NAME_FIELDS:
            ln = self.take(1, f"{key} length")[0]
            raw = self.take(ln, key)
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError:
                raise WireError("bad_string", f"{key} is not ASCII") from None
            if not NAME_RE.match(text):
                raise WireError("bad_string", f"{key} {text!r} does not match {NAME_RULE}")
            out.append(text)
        return out

    def vector(self, d: int, mode: str, what: str) -> np.ndarray:
        """One vector written by ``encode_vector`` (int8) or as fp16/fp32 halves/floats."""
        if mode == "fp16":
            v = self.array("<f2", d, what).astype(np.float32)
        elif mode == "fp32":
            v = self.array("<f4", d, what).astype(np.float32)
        else:
            s = self.array("<f4", 1, f"{what} scale")
            safe = _scales_safe(f"{what} scale", s)
            q = self.array("<i1", d, what)
            if (q == -128).any():
                raise WireError("out_of_range", "quantized values must be symmetric (no -128 / -8)")
            v = dequantize(q, s[0])
            if safe:
                return v
        finite(what, v)
        return v

    def rows(self, k: int, d: int, mode: str, what: str) -> Tuple[np.ndarray, Optional[bytes]]:
        """Rows written by ``encode_rows``: (float32 [K, d], their bytes as they arrived for int8 and int4
        (``TokenMessage.raw_rows``), None for fp16)."""
        if mode == "fp16":
            t = self.array("<f2", k * d, what).astype(np.float32).reshape(k, d)
            finite(what, t)
            return t, None
        at = self.pos
        ts = self.array("<f4", k, f"{what} scales")
        safe = _scales_safe(f"{what} scales", ts)
        if mode == "int8":
            q = self.array("<i1", k * d, what).reshape(k, d)
            bad = (q == -128).any()
        else:
            q = unpack_int4(self.array("<u1", k * ((d + 1) // 2), what).reshape(k, (d + 1) // 2), d)
            bad = (q == -8).any()
        if bad:
            raise WireError("out_of_range", "quantized values must be symmetric (no -128 / -8)")
        t = dequantize(q, ts)
        if not safe:
            finite(what, t)
        return t, self.buf[at: self.pos]


def open_message(buf: object, max_bytes: int, fixed_size: int) -> bytes:
    """The checks before a version's layout applies: type, size limit, magic, minimum length, CRC."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise WireError("not_bytes", f"payload must be bytes, got {type(buf).__name__}")
    data = bytes(buf)
    n = len(data)
    if n > max_bytes:
        raise WireError("too_large", f"payload is {n} bytes, limit {max_bytes}")
    if n < 4 or data[:4] != MAGIC:
        raise WireError("bad_magic" if n >= 4 else "truncated", f"payload does not start with {MAGIC!r}")
    if n < fixed_size + CRC_SIZE:
        raise WireError("truncated", f"payload is {n} bytes, shorter than the {fixed_size + CRC_SIZE}-byte minimum")
    total = struct.unpack_from("<I", data, 8)[0]
    if total != n:
        raise WireError("length_mismatch", f"header says {total} bytes, payload has {n}")
    crc_got = struct.unpack_from("<I", data, n - CRC_SIZE)[0]
    crc_want = zlib.crc32(data[: n - CRC_SIZE]) & 0xFFFFFFFF
    if crc_got != crc_want:
        raise WireError("bad_crc", f"CRC32 {crc_got:08x} does not match the content ({crc_want:08x})")
    return data


def check_flags(flags: int) -> None:
    if flags & ~KNOWN_FLAGS:
        raise WireError("bad_flags", f"unknown flag bits 0x{flags & ~KNOWN_FLAGS:02x}")


def check_timestamp(ts_us: int) -> None:
    if ts_us < 0:
        raise WireError("bad_timestamp", f"capture_ts_us {ts_us} is negative")


def seal(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)
