"""Declared image sizes from headers (every format OpenCV decodes here), checked before any decoding."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from tests.support.image_bombs import jpeg_bomb
from tokenline.imagesize import HeaderError, declared_size
from tokenline.preprocess import ImageError, check_image, decode_image

FORMATS = [".jpg", ".png", ".bmp", ".tif", ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".pam", ".pfm", ".jp2", ".sr",
           ".hdr"]


def _try_encode(ext: str, w: int = 67, h: int = 45) -> "bytes | None":
    """``ext`` as this OpenCV writes it, None when it cannot (older builds: no GIF, sometimes no JPEG 2000)."""
    img = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    if ext in (".pgm", ".pbm"):
        img = img[:, :, 0] if ext == ".pgm" else ((img[:, :, 0] > 127) * 255).astype(np.uint8)
    try:
        ok, buf = cv2.imencode(ext, img)
    except cv2.error:
        return None
    return buf.tobytes() if ok else None


@pytest.mark.parametrize("ext", FORMATS)
def test_declared_size_matches_what_opencv_decodes(ext: str) -> None:
    data = _try_encode(ext)
    if data is None:
        pytest.skip(f"OpenCV {cv2.__version__} does not write {ext} here")
    fmt, w, h = declared_size(data)
    assert (w, h) == (67, 45), (ext, fmt)
    try:
        img = decode_image(data)
    except ImageError:
        pytest.skip(f"OpenCV {cv2.__version__} does not read {ext} here")
    assert img.shape[:2] == (45, 67)


def test_variants_progressive_jpeg_lossy_webp_bigendian_tiff_and_j2k_codestream() -> None:
    img = np.zeros((30, 41, 3), np.uint8)
    assert declared_size(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes())[1:] == (41, 30)
    assert declared_size(cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 50])[1].tobytes())[1:] == (41, 30)
    # a big-endian TIFF with SHORT width/height, written by hand
    ifd = struct.pack(">H", 2) + struct.pack(">HHIHH", 256, 3, 1, 41, 0) + struct.pack(">HHIHH", 257, 3, 1, 30, 0)
    assert declared_size(b"MM\x00*" + struct.pack(">I", 8) + ifd + b"\x00" * 4) == ("tiff", 41, 30)
    siz = b"\xff\x4f\xff\x51" + struct.pack(">HH", 41, 0) + struct.pack(">IIII", 50, 40, 9, 10)
    assert declared_size(siz + b"\x00" * 40) == ("jpeg2000", 41, 30)


def test_unknown_and_malformed_headers_are_refused() -> None:
    with pytest.raises(HeaderError) as e:
        declared_size(b"hello world, not an image")
    assert e.value.reason == "unknown_format"
    ok, avif = cv2.imencode(".avif", np.zeros((8, 8, 3), np.uint8)) if hasattr(cv2, "IMWRITE_AVIF_QUALITY") \
        else (False, None)
    if ok:  # decodable by OpenCV, but its size is not read here: refused rather than decoded blind
        with pytest.raises(HeaderError, match="not an image format"):
            declared_size(avif.tobytes())
    for bad in (b"\xff\xd8\xff\xe0\x00", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDX", b"BM" + b"\x00" * 20,
                b"II*\x00\xff\xff\xff\x00", b"RIFF\x00\x00\x00\x00WEBPVP9 ", b"P6\nx y\n255\n", b"GIF89a"):
        with pytest.raises(HeaderError) as e:
            declared_size(bad)
        assert e.value.reason == "bad_header", bad


def test_every_prefix_and_random_bytes_give_a_size_or_a_header_error() -> None:
    rng = np.random.default_rng(1)
    samples = [d for d in (_try_encode(ext) for ext in FORMATS) if d is not None]
    for data in samples:
        for n in range(0, min(len(data), 400)):
            try:
                declared_size(data[:n])
            except HeaderError:
                pass
    for _ in range(3000):
        head = bytes(rng.integers(0, 256, 64, dtype=np.uint8))
        prefix = samples[int(rng.integers(len(samples)))][: int(rng.integers(0, 16))]
        try:
            declared_size(prefix + head)
        except HeaderError:
            pass


def test_the_pixel_limit_refuses_before_decoding() -> None:
    with pytest.raises(ImageError) as e:
        check_image(jpeg_bomb())
    assert e.value.reason == "too_many_pixels" and "65000x65000" in str(e.value)
    data = _try_encode(".png", 200, 100)
    assert check_image(data, max_pixels=20_000) == ("png", 200, 100)
    with pytest.raises(ImageError, match="over the limit of 19,999"):
        decode_image(data, max_pixels=19_999)
    with pytest.raises(ImageError) as e:
        decode_image(b"")
    assert e.value.reason == "empty"
