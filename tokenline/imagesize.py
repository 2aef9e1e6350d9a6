"""Declared image dimensions read from a file's header, before anything decodes it (hostile-image guard).

``declared_size(data)`` returns ``(format, width, height)`` for every format this project lets OpenCV decode:
JPEG, PNG, BMP, TIFF (and BigTIFF), WebP, GIF, the PNM family (PBM/PGM/PPM, PAM, PFM), JPEG 2000 (JP2 and raw
codestreams), Sun raster and Radiance HDR. Anything else raises ``HeaderError('unknown_format')``: a format whose
size cannot be read first is not decoded at all (OpenCV also reads AVIF, EXR and others; they are refused).
Only the header is parsed, bounds-checked; a lie about the size is caught here, a lie about the content is
the decoder's to find. Python 3.8+, standard library only.
"""

from __future__ import annotations

import re
import struct
from typing import Callable, List, Optional, Tuple

FORMATS = ("jpeg", "png", "bmp", "tiff", "webp", "gif", "pnm", "jpeg2000", "sunras", "hdr")
HEADER_SCAN = 1 << 20  # bytes searched for a header that is not at a fixed place (JPEG segments, TIFF IFD, JP2 boxes)


class HeaderError(ValueError):
    """An image whose size cannot be read from its header; ``reason`` is ``unknown_format`` or ``bad_header``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


Size = Tuple[str, int, int]


def _bad(fmt: str, what: str) -> HeaderError:
    return HeaderError("bad_header", f"{fmt} header: {what}")


def _unpack(fmt: str, data: bytes, offset: int, name: str) -> tuple:
    try:
        return struct.unpack_from(fmt, data, offset)
    except struct.error:
        raise _bad(name, "truncated") from None


def _jpeg(data: bytes) -> Size:
    # Segments after SOI: FF xx [len u16 incl. itself]. The first SOF (C0-CF except C4 DHT, C8 JPG, CC DAC)
    # holds precision u8, height u16, width u16. Standalone markers (RSTn, TEM) carry no length.
    pos, end = 2, min(len(data), HEADER_SCAN)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            raise _bad("JPEG", f"expected a marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            break  # end of image / start of scan before any frame header
        (length,) = _unpack(">H", data, pos + 2, "JPEG")
        if length < 2:
            raise _bad("JPEG", f"segment length {length}")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            _, height, width = _unpack(">BHH", data, pos + 4, "JPEG")
            if height == 0:
                raise _bad("JPEG", "height 0 (defined later by a DNL marker) is not accepted")
            return "jpeg", width, height
        pos += 2 + length
    raise _bad("JPEG", "no frame header (SOF) before the image data")


def _png(data: bytes) -> Size:
    length, kind = _unpack(">I4s", data, 8, "PNG")
    if kind != b"IHDR" or length != 13:
        raise _bad("PNG", "the first chunk is not IHDR")
    width, height = _unpack(">II", data, 16, "PNG")
    return "png", width, height


def _bmp(data: bytes) -> Size:
    (dib,) = _unpack("<I", data, 14, "BMP")
    if dib == 12:  # BITMAPCOREHEADER
        width, height = _unpack("<HH", data, 18, "BMP")
    elif dib >= 16:
        width, height = _unpack("<ii", data, 18, "BMP")
    else:
        raise _bad("BMP", f"DIB header size {dib}")
    return "bmp", abs(width), abs(height)  # a negative height is a top-down bitmap


def _tiff(data: bytes) -> Size:
    e = "<" if data[:2] == b"II" else ">"
    (magic,) = _unpack(e + "H", data, 2, "TIFF")
    if magic == 42:
        (ifd,) = _unpack(e + "I", data, 4, "TIFF")
        count_fmt, entry_size, value_at = "H", 12, 8
        (count,) = _unpack(e + count_fmt, data, ifd, "TIFF")
        first = ifd + 2
    else:  # BigTIFF: 43, offset size 8, 0, then an 8-byte IFD offset; 20-byte entries, 8-byte counts
        (ifd,) = _unpack(e + "Q", data, 8, "TIFF")
        entry_size, value_at = 20, 12
        (count,) = _unpack(e + "Q", data, ifd, "TIFF")
        first = ifd + 8
    if count > 4096:
        raise _bad("TIFF", f"{count} entries in the first IFD")
    found = {}
    for i in range(int(count)):
        at = first + i * entry_size
        tag, typ = _unpack(e + "HH", data, at, "TIFF")
        if tag in (256, 257):
            if typ == 3:  # SHORT
                (v,) = _unpack(e + "H", data, at + value_at, "TIFF")
            elif typ == 4:  # LONG
                (v,) = _unpack(e + "I", data, at + value_at, "TIFF")
            elif typ == 16:  # LONG8 (BigTIFF)
                (v,) = _unpack(e + "Q", data, at + value_at, "TIFF")
            else:
                raise _bad("TIFF", f"tag {tag} has type {typ}")
            found[tag] = int(v)
    if 256 not in found or 257 not in found:
        raise _bad("TIFF", "no ImageWidth/ImageLength in the first IFD")
    return "tiff", found[256], found[257]


def _webp(data: bytes) -> Size:
    (chunk,) = _unpack("4s", data, 12, "WebP")
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise _bad("WebP", "no VP8 start code")
        w, h = _unpack("<HH", data, 26, "WebP")
        return "webp", w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        if data[20:21] != b"\x2f":
            raise _bad("WebP", "no VP8L signature")
        (bits,) = _unpack("<I", data, 21, "WebP")
        return "webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        raw = _unpack("6s", data, 24, "WebP")[0]
        return "webp", int.from_bytes(raw[:3], "little") + 1, int.from_bytes(raw[3:], "little") + 1
    raise _bad("WebP", f"unknown first chunk {chunk!r}")


def _gif(data: bytes) -> Size:
    width, height, flags = _unpack("<HHB", data, 6, "GIF")
    pos = 13 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)  # after the global colour table
    # The first image descriptor may be larger than the logical screen; the larger of the two counts.
    end = min(len(data), HEADER_SCAN)
    while pos < end:
        block = data[pos]
        if block == 0x2C:
            _, _, w, h = _unpack("<HHHH", data, pos + 1, "GIF")
            return "gif", max(width, w), max(height, h)
        if block != 0x21:  # not an extension: trailer or garbage
            break
        pos += 2
        while pos < end and data[pos]:  # extension sub-blocks
            pos += 1 + data[pos]
        pos += 1
    return "gif", width, height


_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n]*\n)*([^\s#]+)")


def _pnm(data: bytes) -> Size:
    head = data[:4096]
    if head[:2] == b"P7":
        fields = dict(re.findall(rb"^(WIDTH|HEIGHT)[ \t]+(\d+)", head.split(b"ENDHDR")[0], re.M))
        if b"WIDTH" not in fields or b"HEIGHT" not in fields:
            raise _bad("PAM", "no WIDTH/HEIGHT before ENDHDR")
        return "pnm", int(fields[b"WIDTH"]), int(fields[b"HEIGHT"])
    pos, values = 2, []
    for _ in range(2):
        m = _PNM_TOKEN.match(head, pos)
        if m is None or not m.group(1).isdigit():
            raise _bad("PNM", "width and height are not numbers")
        values.append(int(m.group(1)))
        pos = m.end()
    return "pnm", values[0], values[1]


def _jp2_boxes(data: bytes, pos: int, end: int) -> Optional[Tuple[int, int]]:
    """Depth-first search for ``ihdr`` (height u32, width u32) inside the ``jp2h`` super box."""
    while pos + 8 <= end:
        length, kind = _unpack(">I4s", data, pos, "JPEG 2000")
        header = 8
        if length == 1:
            (length,) = _unpack(">Q", data, pos + 8, "JPEG 2000")
            header = 16
        elif length == 0:
            length = end - pos
        if length < header:
            raise _bad("JPEG 2000", f"box {kind!r} of length {length}")
        if kind == b"ihdr":
            height, width = _unpack(">II", data, pos + header, "JPEG 2000")
            return width, height
        if kind == b"jp2h":
            found = _jp2_boxes(data, pos + header, min(end, pos + length))
            if found:
                return found
        if kind == b"jp2c":  # the codestream itself: its SIZ marker has the size
            return _j2k_siz(data, pos + header)
        pos += length
    return None


def _j2k_siz(data: bytes, pos: int) -> Tuple[int, int]:
    if data[pos:pos + 4] != b"\xff\x4f\xff\x51":
        raise _bad("JPEG 2000", "codestream does not start with SOC, SIZ")
    xsiz, ysiz, xo, yo = _unpack(">IIII", data, pos + 8, "JPEG 2000")
    if xo > xsiz or yo > ysiz:
        raise _bad("JPEG 2000", "image offset beyond the image")
    return xsiz - xo, ysiz - yo


def _jpeg2000(data: bytes) -> Size:
    if data[:4] == b"\xff\x4f\xff\x51":
        w, h = _j2k_siz(data, 0)
    else:
        found = _jp2_boxes(data, 0, min(len(data), HEADER_SCAN))
        if found is None:
            raise _bad("JPEG 2000", "no image header box")
        w, h = found
    return "jpeg2000", w, h


def _sunras(data: bytes) -> Size:
    width, height = _unpack(">II", data, 4, "Sun raster")
    return "sunras", width, height


_HDR_RES = re.compile(rb"^([-+])([XY]) +(\d+) +([-+])([XY]) +(\d+)\s*$", re.M)


def _hdr(data: bytes) -> Size:
    head = data[:8192]
    sep = head.find(b"\n\n")
    if sep < 0:
        raise _bad("HDR", "no end of header")
    line = head[sep + 2:].split(b"\n", 1)[0]
    m = _HDR_RES.match(line)
    if m is None or m.group(2) == m.group(5):
        raise _bad("HDR", "no resolution line")
    first, second = int(m.group(3)), int(m.group(6))
    return ("hdr", second, first) if m.group(2) == b"Y" else ("hdr", first, second)


# (signature test, parser), tried in order; the signatures are the ones OpenCV's decoders check.
_SIGNATURES: List[Tuple[Callable[[bytes], bool], Callable[[bytes], Size]]] = [
    (lambda d: d[:3] == b"\xff\xd8\xff", _jpeg),
    (lambda d: d[:8] == b"\x89PNG\r\n\x1a\n", _png),
    (lambda d: d[:2] == b"BM", _bmp),
    (lambda d: d[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), _tiff),
    (lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP", _webp),
    (lambda d: d[:6] in (b"GIF87a", b"GIF89a"), _gif),
    (lambda d: len(d) > 2 and d[:1] == b"P" and d[1:2] in b"1234567" and d[2:3].isspace(), _pnm),
    (lambda d: d[:2] in (b"PF", b"Pf") and d[2:3].isspace(), _pnm),
    (lambda d: d[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or d[:4] == b"\xff\x4f\xff\x51", _jpeg2000),
    (lambda d: d[:4] == b"\x59\xa6\x6a\x95", _sunras),
    (lambda d: d[:10] == b"#?RADIANCE" or d[:6] == b"#?RGBE", _hdr),
]


def declared_size(data: bytes) -> Size:
    """``(format, width, height)`` the header declares; ``HeaderError`` when unknown or malformed."""
    data = bytes(data[:HEADER_SCAN]) if not isinstance(data, bytes) else data
    for matches, parse in _SIGNATURES:
        if matches(data):
            fmt, width, height = parse(data)
            if width <= 0 or height <= 0:
                raise _bad(fmt, f"declares {width}x{height}")
            return fmt, int(width), int(height)
    raise HeaderError("unknown_format", "not an image format this build reads (JPEG, PNG, BMP, TIFF, WebP, GIF, "
                                        "PNM, JPEG 2000, Sun raster, Radiance HDR)")
