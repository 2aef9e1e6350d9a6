"""Frame -> encoder input tensor, exactly as the manifest's input spec says (numpy + OpenCV, no torch).

One implementation shared by the exporter (calibration/validation images), the edge agent (camera frames, image
files) and central (search by example image, thumbnails), so all three feed the encoder identical tensors and
decode untrusted files the same guarded way: the header's declared size is checked (``tokenline.imagesize``)
before OpenCV decodes anything. The same geometry maps positions back: ``input_rect`` is where the model input
lies in the original frame (ROI, resize, centre crop or letterbox), ``input_to_frame`` and ``frame_to_input`` map
boxes between the two and ``mask_to_frame`` a footprint (central draws footprints and reads drawn boxes with them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

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


Box = Tuple[float, float, float, float]  # (x0, y0, x1, y1)


@dataclass(frozen=True)
class FrameGeometry:
    """A camera frame's size and the region of it the model saw (``roi`` = (x, y, w, h) in pixels, already
    clipped to the frame; None: the whole frame). The edge sends it with every message (wire metadata
    ``frame``)."""

    width: int
    height: int
    roi: Optional[Tuple[int, int, int, int]] = None

    @property
    def crop(self) -> Tuple[int, int, int, int]:
        """(x, y, w, h) of the pixels that were resized into the model input."""
        return self.roi if self.roi is not None else (0, 0, self.width, self.height)

    def to_json(self) -> dict:
        out = {"width": self.width, "height": self.height}
        if self.roi is not None:
            out["roi"] = list(self.roi)
        return out

    @classmethod
    def from_json(cls, d: dict) -> "FrameGeometry":
        roi = d.get("roi")
        return cls(int(d["width"]), int(d["height"]), None if roi is None else tuple(int(v) for v in roi))


def clip_roi(roi: Tuple[int, int, int, int], width: int, height: int) -> Tuple[int, int, int, int]:
    """An ROI (x, y, w, h) clipped to a ``width`` x ``height`` frame; ImageError when nothing is left."""
    x, y, w, h = roi
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(width, x + w), min(height, y + h)
    if x1 <= x0 or y1 <= y0:
        raise ImageError(f"ROI {roi} lies outside the {width}x{height} frame")
    return (x0, y0, x1 - x0, y1 - y0)


def frame_geometry(frame: np.ndarray, roi: Optional[Tuple[int, int, int, int]] = None) -> FrameGeometry:
    """The geometry of a frame as ``preprocess`` sees it with this ``roi``."""
    h, w = frame.shape[:2]
    return FrameGeometry(int(w), int(h), None if roi is None else clip_roi(roi, w, h))


def _placement(spec: InputSpec, w: int, h: int) -> Tuple[int, int, int, int]:
    """(nw, nh, x0, y0): a w x h crop is resized to nw x nh and placed at (-x0, -y0) of the model input
    (centre crop: x0, y0 >= 0 cut off; letterbox: x0, y0 <= 0 of padding)."""
    th, tw = spec.height, spec.width
    if spec.resize == "resize":
        return tw, th, 0, 0
    if spec.resize == "resize_center_crop":
        s = max(th / h, tw / w)
        nh, nw = max(th, round(h * s)), max(tw, round(w * s))
        return nw, nh, (nw - tw) // 2, (nh - th) // 2
    s = min(th / h, tw / w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    return nw, nh, -((tw - nw) // 2), -((th - nh) // 2)


def _resize(frame: np.ndarray, spec: InputSpec) -> np.ndarray:
    cv2 = _cv2()
    h, w = frame.shape[:2]
    th, tw = spec.height, spec.width
    interp = _INTERP[spec.interpolation]
    nw, nh, x0, y0 = _placement(spec, w, h)
    out = cv2.resize(frame, (nw, nh), interpolation=interp)
    if spec.resize == "resize":
        return out
    if spec.resize == "resize_center_crop":
        return out[y0 : y0 + th, x0 : x0 + tw]
    # letterbox: keep aspect ratio, pad with the mean colour
    fill = np.array(spec.mean, dtype=np.float64) / spec.scale
    canvas = np.empty((th, tw, 3), dtype=np.uint8)
    canvas[:] = np.clip(np.round(fill if spec.color_order == "BGR" else fill[::-1]), 0, 255).astype(np.uint8)
    canvas[-y0 : -y0 + nh, -x0 : -x0 + nw] = out
    return canvas


def input_rect(spec: InputSpec, geometry: FrameGeometry) -> Box:
    """Where the model input's [0, 1]^2 lies in the original frame, in pixels (x0, y0, x1, y1): the ROI crop
    resized and placed as ``preprocess`` does (a letterboxed input reaches past the crop into its padding, a
    centre-cropped one covers less than the crop)."""
    cx, cy, cw, ch = geometry.crop
    nw, nh, x0, y0 = _placement(spec, cw, ch)
    sx, sy = cw / nw, ch / nh  # frame pixels per resized pixel
    return (cx + x0 * sx, cy + y0 * sy, cx + (x0 + spec.width) * sx, cy + (y0 + spec.height) * sy)


def input_to_frame(box: Box, spec: InputSpec, geometry: FrameGeometry, clip: bool = True) -> Optional[Box]:
    """A box (x0, y0, x1, y1) in [0, 1] of the model input -> pixels of the original frame, clipped to the
    pixels the model saw (the ROI crop; letterbox padding is no part of the frame) unless ``clip`` is False;
    None when nothing of it is left."""
    rx0, ry0, rx1, ry1 = input_rect(spec, geometry)
    out = (rx0 + box[0] * (rx1 - rx0), ry0 + box[1] * (ry1 - ry0), rx0 + box[2] * (rx1 - rx0),
           ry0 + box[3] * (ry1 - ry0))
    if not clip:
        return out
    cx, cy, cw, ch = geometry.crop
    out = (max(out[0], cx), max(out[1], cy), min(out[2], cx + cw), min(out[3], cy + ch))
    return out if out[2] > out[0] and out[3] > out[1] else None


def mask_to_frame(mask: np.ndarray, spec: InputSpec, geometry: FrameGeometry) -> List[Box]:
    """A footprint mask [grid_h, grid_w] (True: the cells a token stands for) as boxes in pixels of the original
    frame: one box per run of adjacent cells in a row, clipped to what the model saw (runs wholly in the padding
    dropped). Drawing them draws the footprint on the frame."""
    m = np.asarray(mask, bool)
    gh, gw = m.shape
    out: List[Box] = []
    for r in range(gh):
        c = 0
        while c < gw:
            if not m[r, c]:
                c += 1
                continue
            start = c
            while c < gw and m[r, c]:
                c += 1
            box = input_to_frame((start / gw, r / gh, c / gw, (r + 1) / gh), spec, geometry)
            if box is not None:
                out.append(box)
    return out


def frame_to_input(box: Box, spec: InputSpec, geometry: FrameGeometry) -> Optional[Box]:
    """A box in pixels of the original frame -> (x0, y0, x1, y1) in [0, 1] of the model input, clipped to the
    input; None when it lies wholly outside what the model saw."""
    cx, cy, cw, ch = geometry.crop
    b = (max(box[0], cx), max(box[1], cy), min(box[2], cx + cw), min(box[3], cy + ch))
    if b[2] <= b[0] or b[3] <= b[1]:
        return None
    rx0, ry0, rx1, ry1 = input_rect(spec, geometry)
    out = ((b[0] - rx0) / (rx1 - rx0), (b[1] - ry0) / (ry1 - ry0), (b[2] - rx0) / (rx1 - rx0),
           (b[3] - ry0) / (ry1 - ry0))
    out = (max(out[0], 0.0), max(out[1], 0.0), min(out[2], 1.0), min(out[3], 1.0))
    return out if out[2] > out[0] and out[3] > out[1] else None


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
        x, y, w, h = clip_roi(roi, frame.shape[1], frame.shape[0])
        frame = frame[y : y + h, x : x + w]
    img = _resize(frame, spec)
    if spec.color_order == "RGB":
        img = img[:, :, ::-1]
    x = img.astype(np.float32) * np.float32(spec.scale)
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_batch(frames: Sequence[np.ndarray], spec: InputSpec) -> np.ndarray:
    """Several frames -> float32 [B, 3, H, W]."""
    return np.stack([preprocess(f, spec) for f in frames], axis=0)
