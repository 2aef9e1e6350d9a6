"""Wire format version 1: a fixed 60-byte header, names, then global, tokens, sizes and centroids in order.

Kept so that central accepts edges not yet upgraded (and tests can make v1 messages); new edges send v2.
Byte-by-byte layout in ``docs/protocol.md`` section 2.
"""

from __future__ import annotations

import struct
from typing import Dict, Tuple

import numpy as np

from tokenline.summary import Summary
from tokenline.wire.common import (
    CODE_DTYPES, CRC_SIZE, DTYPE_CODES, MAGIC, MAX_D, MAX_K, Reader, TokenMessage, WireError, check_boxes,
    check_flags, check_frame_id_bytes, check_header_fields, check_timestamp, check_vectors, encode_rows,
    encode_vector, open_message, pack_names, rows_size, seal,
)

VERSION = 1
# global embedding codes (int8 for the int8/int4 token modes, fp16 for fp16)
GLOBAL_INT8, GLOBAL_FP16 = 1, 3
GLOBAL_FOR_TOKENS: Dict[str, int] = {"int8": GLOBAL_INT8, "int4": GLOBAL_INT8, "fp16": GLOBAL_FP16}

# The fixed header, field by field (struct codes, little-endian, no padding); offsets derive from it.
HEADER: Tuple[Tuple[str, str], ...] = (
    ("magic", "4s"), ("version", "B"), ("token_dtype", "B"), ("global_dtype", "B"), ("flags", "B"),
    ("total_len", "I"), ("frame_id", "16s"), ("capture_ts_us", "q"), ("seq", "I"), ("manifest_hash", "16s"),
    ("k", "H"), ("d", "H"),
)
_FIXED = struct.Struct("<" + "".join(code for _, code in HEADER))
FIXED_SIZE = _FIXED.size  # 60
_CENTROID_SCALE = 65535.0


def message_size(token_dtype: str, k: int, d: int, names: Tuple[str, str, str, str] = ("", "", "", "")) -> int:
    """Exact encoded size in bytes for the given mode, dimensions and name strings."""
    g = 2 * d if token_dtype == "fp16" else 4 + d
    strings = sum(1 + len(s.encode("ascii")) for s in names)
    return FIXED_SIZE + strings + g + rows_size(token_dtype, k, d) + 4 * k + 4 * k + CRC_SIZE


def encode(msg: TokenMessage, mode: str) -> bytes:
    """Serialize ``msg`` as version 1 (no metadata, no anomaly score: v1 cannot carry them)."""
    names = check_header_fields(msg)
    if msg.metadata:
        raise WireError("bad_metadata", "wire version 1 cannot carry metadata; send version 2")
    if msg.anomaly is not None:
        raise WireError("bad_section", "wire version 1 cannot carry an anomaly score; send version 2")
    g, t = check_vectors(msg.summary, same_dim=True)
    k, d = t.shape
    s, c = check_boxes(msg.summary.sizes, msg.summary.centroids, k)
    if mode == "fp16":
        if np.any(np.abs(g) > 65504):
            raise WireError("out_of_range", "values exceed the float16 range")
        gpart = g.astype("<f2").tobytes()
    else:
        gpart = encode_vector(g, 8)
    body = gpart + encode_rows(t, mode) + s.astype("<f4").tobytes() + np.rint(c * _CENTROID_SCALE).astype("<u2").tobytes()
    strings = pack_names(names)
    total = FIXED_SIZE + len(strings) + len(body) + CRC_SIZE
    head = _FIXED.pack(MAGIC, VERSION, DTYPE_CODES[mode], GLOBAL_FOR_TOKENS[mode], int(msg.flags), total,
                       bytes(msg.frame_id), int(msg.capture_ts_us), int(msg.seq), bytes(msg.manifest_hash), k, d)
    return seal(head + strings + body)


def decode(buf: bytes, max_bytes: int) -> TokenMessage:
    """Parse and validate a version-1 message."""
    data = open_message(buf, max_bytes, FIXED_SIZE)
    n = len(data)
    (_, _, tcode, gcode, flags, _, fid, ts_us, seq, mhash, k, d) = _FIXED.unpack_from(data, 0)
    if tcode not in CODE_DTYPES:
        raise WireError("bad_dtype", f"unknown token dtype code {tcode}")
    mode = CODE_DTYPES[tcode]
    if gcode != GLOBAL_FOR_TOKENS[mode]:
        raise WireError("bad_dtype", f"global dtype code {gcode} is not valid with {mode} tokens")
    check_flags(flags)
    check_frame_id_bytes(fid)
    check_timestamp(ts_us)
    if not (1 <= k <= MAX_K and 1 <= d <= MAX_D):
        raise WireError("bad_dims", f"K={k}, D={d} outside 1..{MAX_K} / 1..{MAX_D}")

    r = Reader(data, FIXED_SIZE, n - CRC_SIZE)
    names = r.names()
    expect = message_size(mode, k, d, tuple(names))  # type: ignore[arg-type]
    if expect != n:
        raise WireError("length_mismatch", f"K={k}, D={d}, {mode} need {expect} bytes, payload has {n}")
    g = r.vector(d, "fp16" if mode == "fp16" else "int8", "global_embedding")
    t, raw_rows = r.rows(k, d, mode, "tokens")
    sizes = r.array("<f4", k, "sizes").astype(np.float32)
    centroids = (r.array("<u2", 2 * k, "centroids").astype(np.float32) / _CENTROID_SCALE).reshape(k, 2)
    sizes, centroids = check_boxes(sizes, centroids, k)
    summary = Summary(g, t, sizes, centroids)
    return TokenMessage(
        frame_id=fid, device=names[0], site=names[1], line=names[2], camera=names[3], capture_ts_us=ts_us,
        seq=seq, manifest_hash=mhash, summary=summary, token_dtype=mode, flags=flags, version=VERSION,
        raw_rows=raw_rows, rows_of=summary,
    )
