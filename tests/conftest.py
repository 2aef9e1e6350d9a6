"""Shared pytest fixtures: data set location, a real Mosquitto broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.broker import Mosquitto, mosquitto_binary

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
