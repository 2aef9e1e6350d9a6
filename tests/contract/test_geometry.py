"""Model input <-> original frame coordinates (tokenline.preprocess): what central uses to draw a footprint on the
frame and to read a box drawn on it, checked against where preprocessing really puts the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from tokenline import manifest as mf
from tokenline.preprocess import (FrameGeometry, ImageError, frame_geometry, frame_to_input, input_rect,
                                  input_to_frame, preprocess)

W, H = 320, 180  # a wide camera frame
TARGET = (200, 60, 260, 120)  # a bright square, pixels (x0, y0, x1, y1)


def _spec(resize: str) -> mf.InputSpec:
    return mf.InputSpec(height=64, width=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize=resize,
                        interpolation="nearest")


def _frame() -> np.ndarray:
    f = np.zeros((H, W, 3), np.uint8)
    x0, y0, x1, y1 = TARGET
    f[y0:y1, x0:x1] = 255
    return f


def _bright_box(x: np.ndarray) -> tuple:
    """(x0, y0, x1, y1) in [0, 1] of the model input around the bright pixels."""
    ys, xs = np.nonzero(x[0] > 0.5)
    h, w = x.shape[1:]
    return (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)


@pytest.mark.parametrize("resize", ["resize", "resize_center_crop", "letterbox"])
@pytest.mark.parametrize("roi", [None, (120, 20, 180, 150)])
def test_a_region_found_in_the_model_input_maps_back_onto_the_frame(resize: str, roi) -> None:
    spec, frame = _spec(resize), _frame()
    geo = frame_geometry(frame, roi)
    box = input_to_frame(_bright_box(preprocess(frame, spec, roi)), spec, geo)
    assert box is not None
    tol = max((geo.crop[2]) / 64, geo.crop[3] / 64) + 1  # one model-input pixel in frame pixels
    rx0, ry0, rx1, ry1 = input_rect(spec, geo)  # what the model saw of the square (a centre crop cuts it)
    cx, cy, cw, ch = geo.crop
    seen = (max(TARGET[0], rx0, cx), max(TARGET[1], ry0, cy), min(TARGET[2], rx1, cx + cw), min(TARGET[3], ry1, cy + ch))
    np.testing.assert_allclose(box, seen, atol=tol)
    back = frame_to_input(TARGET, spec, geo)  # and the drawn box lands where the pixels went
    np.testing.assert_allclose(back, _bright_box(preprocess(frame, spec, roi)), atol=1 / 64 + 1e-6)


def test_input_rect_per_mode() -> None:
    geo = FrameGeometry(W, H)
    assert input_rect(_spec("resize"), geo) == (0, 0, W, H)
    # centre crop: the input is the middle 180 x 180 of the frame
    np.testing.assert_allclose(input_rect(_spec("resize_center_crop"), geo), (70, 0, 250, 180), atol=0.5)
    # letterbox: the input is 320 x 320, reaching 70 px into padding above and below the frame
    np.testing.assert_allclose(input_rect(_spec("letterbox"), geo), (0, -70, 320, 250), atol=2.6)
    roi = FrameGeometry(W, H, (100, 50, 100, 100))
    assert input_rect(_spec("resize"), roi) == (100, 50, 200, 150)


def test_padding_and_the_outside_of_the_roi_are_no_part_of_the_frame() -> None:
    geo = FrameGeometry(W, H)
    top_pad = (0.0, 0.0, 1.0, 0.1)  # the top 10% of a letterboxed input: padding only
    assert input_to_frame(top_pad, _spec("letterbox"), geo) is None
    assert input_to_frame(top_pad, _spec("letterbox"), geo, clip=False)[1] < 0
    roi = FrameGeometry(W, H, (100, 50, 100, 100))
    assert frame_to_input((0, 0, 90, 40), _spec("resize"), roi) is None  # wholly outside the ROI
    np.testing.assert_allclose(frame_to_input((0, 0, 150, 100), _spec("resize"), roi), (0, 0, 0.5, 0.5))


def test_frame_geometry_clips_the_roi_like_preprocess() -> None:
    frame = np.zeros((H, W, 3), np.uint8)
    assert frame_geometry(frame, (300, 100, 100, 100)) == FrameGeometry(W, H, (300, 100, 20, 80))
    assert FrameGeometry.from_json(FrameGeometry(W, H, (1, 2, 3, 4)).to_json()) == FrameGeometry(W, H, (1, 2, 3, 4))
    with pytest.raises(ImageError, match="outside"):
        frame_geometry(frame, (400, 0, 10, 10))
