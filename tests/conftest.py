"""Shared pytest fixtures: data set location, a real Mosquitto broker, the tiny ONNX encoder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.broker import Mosquitto, mosquitto_binary
from tests.support.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
NEU_DET = ROOT.parent / "shared" / "datasets" / "neu-det" / "images"


@pytest.fixture(scope="session")
def neu_det_dir() -> Path:
    if not NEU_DET.is_dir():
        pytest.skip(f"NEU-DET data set not found at {NEU_DET} (it lives in ../shared/datasets/neu-det)")
    return NEU_DET


@pytest.fixture
def mosquitto(tmp_path: Path):
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed; `make test` installs Debian's 'mosquitto' package")
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny real ONNX encoder (K=16, D=384) with its manifest (tests/support/tiny_model.py)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), size=32, patch=8, dim=384)


@pytest.fixture(scope="session")
def slic_model_dir(tmp_path_factory) -> Path:
    """The tiny encoder with the slic summary: tokens of dim 96 and a footprint (token j = patch j, K = 16)."""
    return build_tiny_model(tmp_path_factory.mktemp("slic-model"), size=32, patch=8, dim=384, head="slic", token_dim=96)
