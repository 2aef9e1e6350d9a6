"""Frame -> encoder input tensor, exactly as the manifest's input spec says (numpy + OpenCV, no torch).

One implementation shared by the exporter (calibration/validation images), the edge agent (camera frames, image
files) and central (search by example image, thumbnails), so all three feed the encoder identical tensors and
decode untrusted files the same guarded way: the header's declared size is checked (``tokenline.imagesize``)
before OpenCV decodes anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from tokenline.imagesize import HeaderError, declared_size
from tokenline.manifest import InputSpec


class ImageError(ValueError):
    """An image that cannot be read or decoded, or that is refused before decoding; ``reason`` says which:
    ``empty``, ``unknown_format``, ``bad_header``, ``too_many_pixels``, ``undecodable``, ``unreadable`` (a file),
    ``bad_image`` (a frame that cannot be preprocessed)."""

    def __init__(self, message: str, reason: str = "bad_image") -> None:
        super().__init__(message)
        self.reason = reason


def _cv2():
    try:
        import cv2  # noqa: PLC0415 - optional dependency of the contract package
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("preprocessing needs OpenCV: pip install opencv-python-headless") from exc
    return cv2


_INTERP = {"bilinear": 1, "bicubic": 2, "area": 3, "nearest": 0}  # cv2.INTER_* values

# Pixels (width x height, as the header declares them) above which an image is refused without decoding:
# 50 MP decode to 150 MB of BGR. Each program has its own configuration key for it (docs/edge.md, central.md).
DEFAULT_MAX_PIXELS = 50_000_000


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[str, int, int]:
    """``(format, width, height)`` from the header; ``ImageError`` when empty, of an unknown format, malformed
    or over ``max_pixels``. Nothing is decoded: a 600-byte file claiming 65000x65000 costs nothing."""
    if not data:
        raise ImageError("empty image data", reason="empty")
    try:
        fmt, width, height = declared_size(data)
    except HeaderError as exc:
        raise ImageError(str(exc), reason=exc.reason) from None
    if width * height > max_pixels:
        raise ImageError(f"{fmt} image of {width}x{height} = {width * height:,} pixels is over the limit of "
                         f"{max_pixels:,}", reason="too_many_pixels")
    return fmt, width, height


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes into an HxWx3 uint8 BGR frame, after ``check_image``; ImageError otherwise."""
    cv2 = _cv2()
    check_image(data, max_pixels)
    try:
        frame = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:  # e.g. OpenCV's own size limits, a decoder that gives up
        raise ImageError(f"not decodable: {str(exc).strip().splitlines()[-1][:200]}", reason="undecodable") from None
    if frame is None:
        raise ImageError("not a decodable image", reason="undecodable")
    return frame


def read_image(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 BGR frame (``decode_image``'s checks)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror or exc}", reason="unreadable") from None
    try:
        return decode_image(data, max_pixels)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}", reason=exc.reason) from None


def _resize(frame: np.ndarray, spec: InputSpec) -> np.ndarray:
    cv2 = _cv2()
    h, w = frame.shape[:2]
    th, tw = spec.height, spec.width
    interp = _INTERP[spec.interpolation]
    if spec.resize == "resize":
        return cv2.resize(frame, (tw, th), interpolation=interp)
    if spec.resize == "resize_center_crop":
        s = max(th / h, tw / w)
        nh, nw = max(th, round(h * s)), max(tw, round(w * s))
        out = cv2.resize(frame, (nw, nh), interpolation=interp)
        y0, x0 = (nh - th) // 2, (nw - tw) // 2
        return out[y0 : y0 + th, x0 : x0 + tw]
    # letterbox: keep aspect ratio, pad with the mean colour
    s = min(th / h, tw / w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    out = cv2.resize(frame, (nw, nh), interpolation=interp)
    fill = np.array(spec.mean, dtype=np.float64) / spec.scale
    canvas = np.empty((th, tw, 3), dtype=np.uint8)
    canvas[:] = np.clip(np.round(fill if spec.color_order == "BGR" else fill[::-1]), 0, 255).astype(np.uint8)
    y0, x0 = (th - nh) // 2, (tw - nw) // 2
    canvas[y0 : y0 + nh, x0 : x0 + nw] = out
    return canvas


def preprocess(frame: np.ndarray, spec: InputSpec, roi: Optional[Tuple[int, int, int, int]] = None) -> np.ndarray:
    """One BGR uint8 frame (HxW, HxWx1 or HxWx3) -> float32 [3, H, W] normalized per the spec.

    ``roi`` = (x, y, w, h) crops the frame first (pixels, clipped to the frame).
    """
    if frame is None or not isinstance(frame, np.ndarray) or frame.size == 0:
        raise ImageError("empty frame")
    if frame.dtype != np.uint8:
        raise ImageError(f"frame must be uint8, got {frame.dtype}")
    if frame.ndim == 2:
        frame = np.repeat(frame[:, :, None], 3, axis=2)
    elif frame.ndim == 3 and frame.shape[2] == 1:
        frame = np.repeat(frame, 3, axis=2)
    elif frame.ndim != 3 or frame.shape[2] not in (3, 4):
        raise ImageError(f"frame must be HxW, HxWx1, HxWx3 or HxWx4, got shape {frame.shape}")
    frame = frame[:, :, :3]
    if roi is not None:
        x, y, w, h = roi
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(frame.shape[1], x + w), min(frame.shape[0], y + h)
        if x1 <= x0 or y1 <= y0:
            raise ImageError(f"ROI {roi} lies outside the {frame.shape[1]}x{frame.shape[0]} frame")
        frame = frame[y0:y1, x0:x1]
    img = _resize(frame, spec)
    if spec.color_order == "RGB":
        img = img[:, :, ::-1]
    x = img.astype(np.float32) * np.float32(spec.scale)
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_batch(frames: Sequence[np.ndarray], spec: InputSpec) -> np.ndarray:
    """Several frames -> float32 [B, 3, H, W]."""
    return np.stack([preprocess(f, spec) for f in frames], axis=0)
