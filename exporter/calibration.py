"""Calibration images: a folder of frames preprocessed exactly as the edge does, or synthetic ones (no torch).

The export validates ONNX Runtime against torch on them; INT8 quantization (``exporter.trt.quantize``)
calibrates on them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import numpy as np

from exporter.errors import ExportError
from tokenline.manifest import InputSpec
from tokenline.preprocess import ImageError, preprocess, read_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(folder: Path, limit: Optional[int] = None) -> List[Path]:
    """The images of ``folder`` by name; with ``limit``, that many spread over the folder."""
    if not folder.is_dir():
        raise ExportError(f"calibration folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f"calibration folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if limit and len(files) > limit:  # spread over the folder (file names often group by class)
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def load_images(folder: Path, spec: InputSpec, count: int) -> np.ndarray:
    """Preprocess up to ``count`` images of ``folder`` (spread over it) exactly as the edge does: [N,3,H,W]."""
    arrays = []
    for p in list_images(Path(folder), count):
        try:
            arrays.append(preprocess(read_image(p), spec))
        except ImageError as exc:
            log.warning("skipping calibration image: %s", exc)
    if not arrays:
        raise ExportError(f"no readable calibration images in {folder}")
    return np.stack(arrays).astype(np.float32)


def synthetic_images(spec: InputSpec, count: int) -> np.ndarray:
    """``count`` smooth random images (upsampled 8x8 noise, seed 0), preprocessed per ``spec``: [N,3,H,W]."""
    import cv2  # noqa: PLC0415

    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, size=(count, 8, 8, 3), dtype=np.uint8)
    frames = [cv2.resize(f, (spec.width, spec.height), interpolation=cv2.INTER_CUBIC) for f in low]
    return np.stack([preprocess(f, spec) for f in frames])


def calibration_images(spec: InputSpec, folder: Optional[Path], count: int) -> np.ndarray:
    """Preprocessed calibration images [N,3,H,W] from ``folder``; synthetic ones when no folder is given."""
    if folder is None:
        log.warning("no calibration images given: validating on synthetic images (pass --calib for real ones)")
        return synthetic_images(spec, count)
    return load_images(folder, spec, count)
