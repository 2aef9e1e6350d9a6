"""Column types that store numpy arrays portably: halfvec on PostgreSQL, float32 bytes on SQLite."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from pgvector import HalfVector
from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import JSON, LargeBinary
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from tokenline.wire.common import pack_nibbles, unpack_int4, unpack_nibbles


class Embedding(TypeDecorator):
    """A float vector: ``halfvec`` (no fixed dimension) on PostgreSQL, little-endian float32 bytes elsewhere.

    The dimension is left open so that models of different widths share one table; PostgreSQL indexes each
    model separately with a partial expression index that casts to ``halfvec(D)`` (see ``sql.store``).
    """

    impl = LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(HALFVEC())
        return dialect.type_descriptor(LargeBinary())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        arr = np.asarray(value, dtype=np.float32).reshape(-1)
        if dialect.name == "postgresql":
            return arr.tolist()  # pgvector's fast path for lists (its ndarray path is ~5x slower)
        return arr.astype("<f4").tobytes()

    def process_result_value(self, value: Any, dialect: Dialect) -> Optional[np.ndarray]:
        if value is None:
            return None
        if isinstance(value, HalfVector):
            return value.to_numpy().astype(np.float32)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return np.frombuffer(bytes(value), dtype="<f4").astype(np.float32)
        return np.asarray(value, dtype=np.float32)


# Free-form labels ({name: text}): JSONB on PostgreSQL (a GIN index answers "labels @> {...}"), JSON text on
# SQLite (json_extract). Python None is SQL NULL, not the JSON text 'null'.
Labels = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def pack_tokens(tokens: np.ndarray) -> bytes:
    """Store [K, d] float tokens as int8 with one float32 scale per token: K*4 scale bytes, then K*d int8 (the
    layout of the wire's int8 token rows, ``tokenline.wire.common.encode_rows``). Central stores the token rows
    of int8 and int4 messages as they arrived (``TokenMessage.token_rows``) and packs other tokens (fp16
    messages) with this.

    Tokens are unit-norm, so a per-token symmetric scale keeps cosine similarity above 0.999.
    """
    t = np.asarray(tokens, dtype=np.float32)
    if t.ndim != 2:
        raise ValueError(f"tokens must be [K, D], got shape {t.shape}")
    scale = np.abs(t).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(t / scale[:, None]), -127, 127).astype(np.int8)
    return scale.astype("<f4").tobytes() + q.tobytes()


def token_bits(nbytes: int, k: int, d: int) -> int:
    """The layout of a stored token blob of K tokens of the model's dimension d, from its length: 8 (K*4 scale
    bytes, then K*d int8) or 4 (K*4 scale bytes, then per token ceil(d/2) bytes of two int4 values, the first in
    the low nibble: the wire's int4 rows). The two lengths differ for every d > 1; a model's d is fixed (its
    manifest's ``summary.dim``), so the length tells them apart without a column of its own."""
    if nbytes == k * (4 + d):
        return 8
    if d > 1 and nbytes == k * (4 + (d + 1) // 2):
        return 4
    raise ValueError(f"a token blob of {nbytes} bytes does not hold K={k} tokens of dimension {d}")


def unpack_tokens(blob: bytes, k: int, d: int) -> np.ndarray:
    """One stored token blob (int8 or int4 layout, see ``token_bits``) as float32 [K, d]."""
    return unpack_token_rows([blob], k, d)[0]


def unpack_token_rows(blobs: Sequence[bytes], k: int, d: int) -> np.ndarray:
    """Many frames' token blobs of one model (K tokens of dimension d; int8 and int4 layouts may be mixed) at once:
    float32 [F, K, d], in the blobs' order. Blobs of one layout are decoded together."""
    by_len: Dict[int, List[int]] = {}
    for i, b in enumerate(blobs):
        by_len.setdefault(len(b), []).append(i)
    if len(by_len) == 1:  # the usual case: one layout, no reordering
        return _unpack_same(blobs, next(iter(by_len)), k, d)
    out = np.empty((len(blobs), k, d), np.float32)
    for n, idx in by_len.items():
        out[idx] = _unpack_same([blobs[i] for i in idx], n, k, d)
    return out


def _unpack_same(blobs: Sequence[bytes], n: int, k: int, d: int) -> np.ndarray:
    """``unpack_token_rows`` of blobs that are all ``n`` bytes long."""
    bits = token_bits(n, k, d)
    raw = np.frombuffer(b"".join(bytes(b) for b in blobs), dtype=np.uint8).reshape(len(blobs), n)
    scale = raw[:, : 4 * k].copy().view("<f4").astype(np.float32)  # [F, K]
    body = raw[:, 4 * k:]
    q = (body.view(np.int8).reshape(len(blobs), k, d) if bits == 8
         else unpack_int4(body.reshape(len(blobs), k, (d + 1) // 2), d))
    return q.astype(np.float32) * scale[:, :, None]


def pack_footprint(footprint: np.ndarray) -> bytes:
    """A footprint [gh, gw] of token indices as bytes: two cells per byte (first in the low nibble) when every
    index is below 16, as on the wire; ``unpack_footprint`` needs the grid (the model's manifest says it)."""
    fp = np.asarray(footprint, dtype=np.uint8).reshape(-1)
    return (pack_nibbles(fp) if fp.size and int(fp.max()) < 16 else fp).tobytes()


def unpack_footprints(blobs: Sequence[bytes], grid: tuple) -> np.ndarray:
    """Many frames' ``pack_footprint`` blobs of one model (one length) at once: uint8 [F, gh, gw]."""
    gh, gw = int(grid[0]), int(grid[1])
    n = gh * gw
    if not blobs:
        return np.zeros((0, gh, gw), np.uint8)
    sizes = {len(x) for x in blobs}
    if len(sizes) > 1 or not sizes <= {n, (n + 1) // 2}:
        raise ValueError(f"footprint blobs of {sorted(sizes)} bytes do not fit a {gh}x{gw} grid")
    b = np.frombuffer(b"".join(bytes(x) for x in blobs), dtype=np.uint8).reshape(len(blobs), -1)
    if sizes == {n}:
        return b.reshape(len(blobs), gh, gw).copy()
    return unpack_nibbles(b, n).reshape(len(blobs), gh, gw)


def unpack_footprint(blob: bytes, grid: tuple) -> np.ndarray:
    """Inverse of ``pack_footprint``: uint8 [gh, gw]."""
    return unpack_footprints([blob], grid)[0]


def pack_f32(arr: np.ndarray) -> bytes:
    """Little-endian float32 bytes of any array (shape is known from the row)."""
    return np.ascontiguousarray(arr, dtype="<f4").tobytes()


def unpack_f32(blob: bytes, shape: tuple) -> np.ndarray:
    return np.frombuffer(bytes(blob), dtype="<f4").astype(np.float32).reshape(shape)


def unpack_f32_rows(blobs: Sequence[bytes], shape: tuple) -> np.ndarray:
    """Many rows' ``pack_f32`` blobs of one ``shape`` at once: float32 [F, *shape]."""
    return np.frombuffer(b"".join(bytes(b) for b in blobs), dtype="<f4").astype(np.float32).reshape(
        (len(blobs),) + tuple(shape))
