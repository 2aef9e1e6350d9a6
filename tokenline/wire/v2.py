"""Wire format version 2: a 56-byte header, names, then typed, length-prefixed sections.

A section is ``type u8, codec u8, length u32, body``. GLOBAL and TOKENS are required, and BOXES (sizes and
centroids) or FOOTPRINT (which patch each token stands for; sizes and centroids derive from it); METADATA and
ANOMALY (the edge's own anomaly score, ``tokenline.anomaly``) are optional. Each type appears at most once. A
decoder skips sections of unknown type below 0x80 (so a newer edge can add optional sections without breaking
older centrals) and refuses unknown types from 0x80 up (sections a reader must understand). Tokens may have their
own dimension d (a projection the manifest describes); the manifest says which. Byte-by-byte layout in
``docs/protocol.md`` section 3.
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Tuple

import numpy as np

from tokenline.anomaly import AnomalyScore
from tokenline.summary import Summary, boxes_from_footprint
from tokenline.wire.common import (
    CODE_DTYPES, CRC_SIZE, DTYPE_CODES, MAGIC, MAX_D, MAX_K, Reader, TokenMessage, WireError, check_boxes,
    check_flags, check_frame_id_bytes, check_header_fields, check_timestamp, check_vectors, decode_metadata,
    encode_metadata, encode_rows, encode_vector, open_message, pack_names, pack_nibbles, rows_size, seal,
    unpack_nibbles,
)

VERSION = 2
HEADER: Tuple[Tuple[str, str], ...] = (
    ("magic", "4s"), ("version", "B"), ("sections", "B"), ("reserved", "B"), ("flags", "B"),
    ("total_len", "I"), ("frame_id", "16s"), ("capture_ts_us", "q"), ("seq", "I"), ("manifest_hash", "16s"),
)
_FIXED = struct.Struct("<" + "".join(code for _, code in HEADER))
FIXED_SIZE = _FIXED.size  # 56
_SECTION = struct.Struct("<BBI")
SECTION_HEAD = _SECTION.size  # 6

# section types
GLOBAL, TOKENS, BOXES, FOOTPRINT, METADATA, ANOMALY = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
SECTION_NAMES: Dict[int, str] = {GLOBAL: "global", TOKENS: "tokens", BOXES: "boxes", FOOTPRINT: "footprint",
                                 METADATA: "metadata", ANOMALY: "anomaly"}
CRITICAL = 0x80  # unknown types from here up are refused, below are skipped
# codecs: GLOBAL int8 / fp16 (fp16 when the tokens are fp16, else int8); TOKENS the token encodings
# (DTYPE_CODES); FOOTPRINT 4 or 8 bits per patch; BOXES and METADATA 0
GLOBAL_CODECS: Dict[int, str] = {1: "int8", 3: "fp16"}
_CENTROID_SCALE = 65535.0
# ANOMALY body: score f32, threshold f32, token i16 (-1: none), flags u8 (bit 0 flagged), reserved u8,
# reference set id u32, reference set version u32
_ANOMALY = struct.Struct("<ffhBBII")
ANOMALY_SIZE = _ANOMALY.size  # 20


def _section(kind: int, codec: int, body: bytes) -> bytes:
    return _SECTION.pack(kind, codec, len(body)) + body


def footprint_bits(k: int) -> int:
    """4 bits per patch when K <= 16, else 8 (K <= 255)."""
    return 4 if k <= 16 else 8


def _footprint_body(fp: np.ndarray, k: int) -> Tuple[int, bytes]:
    fp = np.asarray(fp)
    if fp.ndim != 2 or not (1 <= fp.shape[0] <= 1024 and 1 <= fp.shape[1] <= 1024):
        raise WireError("bad_dims", f"footprint must be [grid_h, grid_w] (each 1..1024), got {fp.shape}")
    if k > 255:
        raise WireError("bad_dims", f"a footprint can index at most 255 tokens, K={k}")
    if fp.size and (fp.min() < 0 or fp.max() >= k):
        raise WireError("out_of_range", f"footprint entries must be token indices 0..{k - 1}")
    bits = footprint_bits(k)
    flat = fp.astype(np.uint8).reshape(-1)
    packed = pack_nibbles(flat) if bits == 4 else flat
    return bits, struct.pack("<HH", fp.shape[0], fp.shape[1]) + packed.tobytes()


def _anomaly_body(a: AnomalyScore) -> bytes:
    if not (abs(a.score) < 3e38 and (abs(a.threshold) < 3e38 or a.threshold == float("inf"))):
        raise WireError("non_finite", "anomaly score must be finite and the threshold finite or +inf")
    if not -1 <= int(a.token) <= 32767 or not (0 <= int(a.set_id) < 2**32 and 0 <= int(a.set_version) < 2**32):
        raise WireError("out_of_range", "anomaly token must be -1..32767, set id and version uint32")
    return _ANOMALY.pack(float(a.score), float(a.threshold), int(a.token), 1 if a.flagged else 0, 0,
                         int(a.set_id), int(a.set_version))


def _decode_anomaly(body: bytes, k: int) -> AnomalyScore:
    if len(body) != ANOMALY_SIZE:
        raise WireError("length_mismatch", f"anomaly section of {len(body)} bytes, expected {ANOMALY_SIZE}")
    score, threshold, token, flags, reserved, set_id, version = _ANOMALY.unpack(body)
    if flags & ~1 or reserved:
        raise WireError("bad_value", "anomaly section: unknown flag bits or a reserved byte that is not 0")
    if np.isnan(score) or np.isnan(threshold) or np.isinf(score):
        raise WireError("non_finite", "anomaly score is not a number")
    if not -1 <= token < k:
        raise WireError("out_of_range", f"anomaly token {token} is not a token of K={k}")
    return AnomalyScore(score=float(score), threshold=float(threshold), token=int(token), flagged=bool(flags & 1),
                        set_id=int(set_id), set_version=int(version))


def message_size(token_dtype: str, k: int, d: int, names: Tuple[str, str, str, str] = ("", "", "", ""),
                 token_dim: Optional[int] = None, footprint_grid: Optional[Tuple[int, int]] = None,
                 metadata_bytes: int = 0, anomaly: bool = False) -> int:
    """Exact encoded size: global of dim ``d``, K tokens of dim ``token_dim`` (default d), BOXES or (with
    ``footprint_grid``) FOOTPRINT, a METADATA section of ``metadata_bytes`` when > 0, and an ANOMALY section."""
    td = d if token_dim is None else token_dim
    strings = sum(1 + len(s.encode("ascii")) for s in names)
    size = FIXED_SIZE + strings + CRC_SIZE
    size += SECTION_HEAD + (2 * d if token_dtype == "fp16" else 4 + d)
    size += SECTION_HEAD + 4 + rows_size(token_dtype, k, td)
    if footprint_grid is None:
        size += SECTION_HEAD + 8 * k
    else:
        n = footprint_grid[0] * footprint_grid[1]
        size += SECTION_HEAD + 4 + ((n + 1) // 2 if footprint_bits(k) == 4 else n)
    if metadata_bytes:
        size += SECTION_HEAD + metadata_bytes
    if anomaly:
        size += SECTION_HEAD + ANOMALY_SIZE
    return size


def encode(msg: TokenMessage, mode: str) -> bytes:
    """Serialize ``msg`` as version 2; FOOTPRINT replaces BOXES when the summary has a footprint."""
    names = check_header_fields(msg)
    g, t = check_vectors(msg.summary, same_dim=False)
    k, d = t.shape
    sections: List[bytes] = []
    if mode == "fp16":
        if np.any(np.abs(g) > 65504):
            raise WireError("out_of_range", "values exceed the float16 range")
        sections.append(_section(GLOBAL, 3, g.astype("<f2").tobytes()))
    else:
        sections.append(_section(GLOBAL, 1, encode_vector(g, 8)))
    sections.append(_section(TOKENS, DTYPE_CODES[mode], struct.pack("<HH", k, d) + encode_rows(t, mode)))
    fp = msg.summary.footprint
    if fp is None:
        s, c = check_boxes(msg.summary.sizes, msg.summary.centroids, k)
        sections.append(_section(BOXES, 0, s.astype("<f4").tobytes() +
                                 np.rint(c * _CENTROID_SCALE).astype("<u2").tobytes()))
    else:
        bits, body = _footprint_body(fp, k)
        sections.append(_section(FOOTPRINT, bits, body))
    if msg.metadata:
        sections.append(_section(METADATA, 0, encode_metadata(msg.metadata)))
    if msg.anomaly is not None:
        if not -1 <= int(msg.anomaly.token) < k:
            raise WireError("out_of_range", f"anomaly token {msg.anomaly.token} is not a token of K={k}")
        sections.append(_section(ANOMALY, 0, _anomaly_body(msg.anomaly)))
    strings = pack_names(names)
    body = b"".join(sections)
    total = FIXED_SIZE + len(strings) + len(body) + CRC_SIZE
    head = _FIXED.pack(MAGIC, VERSION, len(sections), 0, int(msg.flags), total, bytes(msg.frame_id),
                       int(msg.capture_ts_us), int(msg.seq), bytes(msg.manifest_hash))
    return seal(head + strings + body)


def decode(buf: bytes, max_bytes: int) -> TokenMessage:
    """Parse and validate a version-2 message."""
    data = open_message(buf, max_bytes, FIXED_SIZE)
    n = len(data)
    (_, _, count, reserved, flags, _, fid, ts_us, seq, mhash) = _FIXED.unpack_from(data, 0)
    if reserved:
        raise WireError("bad_value", f"reserved header byte is {reserved}, must be 0")
    check_flags(flags)
    check_frame_id_bytes(fid)
    check_timestamp(ts_us)
    r = Reader(data, FIXED_SIZE, n - CRC_SIZE)
    names = r.names()
    found: Dict[int, Tuple[int, Reader]] = {}
    for _ in range(count):
        kind, codec, length = _SECTION.unpack(r.take(SECTION_HEAD, "section header"))
        body = Reader(data, r.pos, r.pos + length)
        r.take(length, f"section 0x{kind:02x}")
        if kind in found:
            raise WireError("bad_section", f"section {SECTION_NAMES.get(kind, hex(kind))} appears twice")
        if kind not in SECTION_NAMES:
            if kind >= CRITICAL:
                raise WireError("bad_section", f"unknown required section type 0x{kind:02x}")
            continue  # an optional section of a newer writer
        found[kind] = (codec, body)
    if r.pos != r.end:
        raise WireError("length_mismatch", f"{r.end - r.pos} bytes after the last of {count} sections")
    for kind in (GLOBAL, TOKENS):
        if kind not in found:
            raise WireError("bad_section", f"the {SECTION_NAMES[kind]} section is missing")
    if BOXES not in found and FOOTPRINT not in found:
        raise WireError("bad_section", "neither a boxes nor a footprint section")

    codec, sec = found[GLOBAL]
    gmode = GLOBAL_CODECS.get(codec)
    if gmode is None:
        raise WireError("bad_dtype", f"unknown global codec {codec}")
    per = {"int8": 1, "fp16": 2}[gmode]
    d = (sec.end - sec.pos - (4 if gmode == "int8" else 0)) // per
    if d < 1 or d > MAX_D or (sec.end - sec.pos) != d * per + (4 if gmode == "int8" else 0):
        raise WireError("bad_dims", f"global section of {sec.end - sec.pos} bytes is no {gmode} vector of 1..{MAX_D}")
    g = sec.vector(d, gmode, "global_embedding")

    codec, sec = found[TOKENS]
    mode = CODE_DTYPES.get(codec)
    if mode is None:
        raise WireError("bad_dtype", f"unknown token codec {codec}")
    k, td = struct.unpack("<HH", sec.take(4, "token dimensions"))
    if not (1 <= k <= MAX_K and 1 <= td <= MAX_D):
        raise WireError("bad_dims", f"K={k}, d={td} outside 1..{MAX_K} / 1..{MAX_D}")
    if sec.end - sec.pos != rows_size(mode, k, td):
        raise WireError("length_mismatch", f"K={k}, d={td}, {mode} need {rows_size(mode, k, td)} bytes, the tokens "
                                           f"section has {sec.end - sec.pos}")
    t, raw_rows = sec.rows(k, td, mode, "tokens")

    footprint = None
    if FOOTPRINT in found:
        codec, sec = found[FOOTPRINT]
        if codec not in (4, 8) or (codec == 4 and k > 16) or k > 255:
            raise WireError("bad_dtype", f"footprint codec {codec} is not valid with K={k}")
        gh, gw = struct.unpack("<HH", sec.take(4, "footprint grid"))
        npatch = gh * gw
        if not (1 <= gh <= 1024 and 1 <= gw <= 1024):
            raise WireError("bad_dims", f"footprint grid {gh}x{gw} outside 1..1024")
        need = (npatch + 1) // 2 if codec == 4 else npatch
        if sec.end - sec.pos != need:
            raise WireError("length_mismatch", f"a {gh}x{gw} footprint needs {need} bytes, has {sec.end - sec.pos}")
        raw = sec.array("<u1", need, "footprint")
        flat = unpack_nibbles(raw, npatch) if codec == 4 else raw
        if flat.max() >= k:
            raise WireError("out_of_range", f"footprint names token {int(flat.max())}, K={k}")
        footprint = flat.reshape(gh, gw).astype(np.uint8)
    if BOXES in found:
        _, sec = found[BOXES]
        if sec.end - sec.pos != 8 * k:
            raise WireError("length_mismatch", f"boxes for K={k} need {8 * k} bytes, have {sec.end - sec.pos}")
        sizes = sec.array("<f4", k, "sizes").astype(np.float32)
        centroids = (sec.array("<u2", 2 * k, "centroids").astype(np.float32) / _CENTROID_SCALE).reshape(k, 2)
        sizes, centroids = check_boxes(sizes, centroids, k)
    else:
        sizes, centroids = boxes_from_footprint(footprint, k)

    metadata = None
    if METADATA in found:
        codec, sec = found[METADATA]
        if codec != 0:
            raise WireError("bad_dtype", f"unknown metadata codec {codec}")
        metadata = decode_metadata(sec.take(sec.end - sec.pos, "metadata"))
    anomaly = None
    if ANOMALY in found:
        codec, sec = found[ANOMALY]
        if codec != 0:
            raise WireError("bad_dtype", f"unknown anomaly codec {codec}")
        anomaly = _decode_anomaly(sec.take(sec.end - sec.pos, "anomaly"), k)
    summary = Summary(g, t, sizes, centroids, footprint)
    return TokenMessage(
        frame_id=fid, device=names[0], site=names[1], line=names[2], camera=names[3], capture_ts_us=ts_us,
        seq=seq, manifest_hash=mhash, summary=summary, token_dtype=mode, flags=flags, metadata=metadata,
        anomaly=anomaly, version=VERSION, raw_rows=raw_rows, rows_of=summary,
    )
