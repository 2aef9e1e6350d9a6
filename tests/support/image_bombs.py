"""Hostile images for tests: valid headers that declare far more pixels than their bytes would suggest."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np


def jpeg_bomb(width: int = 65000, height: int = 65000, size: int = 600) -> bytes:
    """A ``size``-byte JPEG whose frame header (SOF0) claims ``width`` x ``height``: a real small JPEG with its
    SOF dimensions rewritten, cut after the header and closed with EOI."""
    ok, buf = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))
    assert ok
    data = bytearray(buf.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    out = bytes(data[: size - 2]) + b"\xff\xd9"
    return out + b"\x00" * (size - len(out))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(side: int = 20000) -> bytes:
    """A real, decodable 8-bit greyscale PNG of ``side`` x ``side`` zero pixels: a few hundred KB that decode to
    ``side``² bytes (20000: 389 KB -> 400 MB, more once converted to BGR)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [comp.compress(row * 500) for _ in range(side // 500)]
    parts.append(comp.compress(row * (side % 500)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")
