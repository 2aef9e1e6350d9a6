"""Synthetic conveyor camera: pure functions that draw frame n of a belt carrying parts with defects (OpenCV)."""

from __future__ import annotations

import cv2
import numpy as np

DEFECTS = ("scratch", "hole", "stain", "crack")


def _part_rng(seed: int, part: int) -> np.random.Generator:
    return np.random.default_rng((seed * 1_000_003 + part) & 0xFFFFFFFF)


def draw_conveyor_frame(n: int, width: int = 320, height: int = 240, seed: int = 0, defect_rate: float = 0.3,
                        speed_px: int = 8) -> np.ndarray:
    """Frame ``n`` (BGR uint8 HxWx3) of a belt moving ``speed_px`` per frame; deterministic in (n, seed).

    Parts are metal plates spaced one frame-width apart; a part has a defect with probability ``defect_rate``
    (scratch, hole, stain or crack, at a position fixed per part).
    """
    img = np.empty((height, width, 3), np.uint8)
    img[:] = (60, 60, 60)
    offset = n * speed_px
    # belt texture: moving stripes
    for x in range(-(offset % 40), width, 40):
        cv2.line(img, (x, 0), (x, height - 1), (70, 70, 70), 2)
    pitch = width
    first = offset // pitch - 1
    for part in range(first, first + 3):
        cx = part * pitch + pitch // 2 - offset + width // 2
        if cx < -width or cx > 2 * width:
            continue
        rng = _part_rng(seed, part)
        pw, ph = int(width * 0.45), int(height * 0.55)
        x0, y0 = cx - pw // 2, (height - ph) // 2
        shade = int(rng.integers(150, 200))
        cv2.rectangle(img, (x0, y0), (x0 + pw, y0 + ph), (shade, shade, shade + 10), -1)
        cv2.rectangle(img, (x0, y0), (x0 + pw, y0 + ph), (110, 110, 110), 2)
        if rng.random() < defect_rate:
            kind = DEFECTS[int(rng.integers(len(DEFECTS)))]
            dx, dy = int(rng.integers(pw // 5, 4 * pw // 5)), int(rng.integers(ph // 5, 4 * ph // 5))
            px, py = x0 + dx, y0 + dy
            s = max(3, min(pw, ph) // 8)
            if kind == "scratch":
                cv2.line(img, (px - 2 * s, py - s), (px + 2 * s, py + s), (40, 40, 40), 2)
            elif kind == "hole":
                cv2.circle(img, (px, py), s // 2 + 1, (10, 10, 10), -1)
            elif kind == "stain":
                cv2.ellipse(img, (px, py), (s, s // 2 + 1), int(rng.integers(180)), 0, 360, (40, 90, 140), -1)
            else:
                pts = np.array([[px - s, py], [px - s // 3, py - s // 2], [px + s // 3, py + s // 2], [px + s, py]],
                               np.int32)
                cv2.polylines(img, [pts], False, (20, 20, 20), 1)
    return img


def corrupt_frame(width: int, height: int, n: int) -> np.ndarray:
    """A deliberately broken frame for tests: wrong shape (a 1-pixel-tall strip) of random bytes."""
    rng = np.random.default_rng(n)
    return rng.integers(0, 256, size=(1, max(1, width // 7), 2), dtype=np.uint8)
