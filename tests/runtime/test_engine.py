"""Engine verification at run time: the sidecar next to an engine, refusal of engines built for another
TensorRT/GPU or tampered with, crafted sidecars, the machine probe. No TensorRT needed; the parts that need a GPU
skip loudly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from runtime import engine as eng
from runtime.engine import EngineError, EngineMismatch, RuntimeInfo, read_sidecar, sidecar_path, verify_engine
from tests.support.fake_engine import ORIN, fake_build

XAVIER_JP5 = RuntimeInfo(trt_version="8.5.2.2", gpu_name="Xavier", compute_capability=(7, 2))


def _has_tensorrt() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def test_sidecar_round_trip_next_to_the_engine(tmp_path: Path) -> None:
    engine, _, sc = fake_build(tmp_path)
    assert sidecar_path(engine) == engine.with_name(engine.name + ".json") and sidecar_path(engine).is_file()
    assert read_sidecar(engine) == sc
    assert engine.read_bytes() == b"serialized-plan" * 100  # nothing prepended: trtexec/DeepStream can load it
    assert verify_engine(engine, ORIN, tmp_path / "encoder_b1.onnx", "m" * 64) == sc


def test_refuses_other_tensorrt_version_and_gpu(tmp_path: Path) -> None:
    engine, onnx_path, _ = fake_build(tmp_path)
    with pytest.raises(EngineMismatch) as exc:
        verify_engine(engine, RuntimeInfo("10.3.1", "Orin", (8, 7)), onnx_path)
    msg = str(exc.value)
    assert "TensorRT 10.3.0" in msg and "10.3.1" in msg and "tokenline-export build-engine" in msg
    assert "--rebuild-on-mismatch" in msg
    with pytest.raises(EngineMismatch, match="built for GPU 'Orin'"):
        verify_engine(engine, XAVIER_JP5.__class__("10.3.0", "Xavier", (7, 2)), onnx_path)
    with pytest.raises(EngineMismatch) as exc:
        verify_engine(engine, XAVIER_JP5, onnx_path)
    assert len(exc.value.reasons) == 2  # every reason is listed, not only the first


def test_refuses_tampered_engine_changed_onnx_and_other_manifest(tmp_path: Path) -> None:
    engine, onnx_path, _ = fake_build(tmp_path)
    data = bytearray(engine.read_bytes())
    data[10] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(EngineMismatch, match="engine file sha256"):
        verify_engine(engine, ORIN)
    engine, onnx_path, _ = fake_build(tmp_path)
    onnx_path.write_bytes(b"re-exported model")
    with pytest.raises(EngineMismatch, match="source ONNX sha256"):
        verify_engine(engine, ORIN, onnx_path)
    engine, onnx_path, _ = fake_build(tmp_path)
    with pytest.raises(EngineMismatch, match="manifest hash"):
        verify_engine(engine, ORIN, onnx_path, manifest_hash="0" * 64)


def test_crafted_sidecars_are_rejected(tmp_path: Path) -> None:
    engine, _, sc = fake_build(tmp_path)
    side = sidecar_path(engine)
    good = json.loads(side.read_text())
    cases = {
        "not JSON": "{",
        "schema": json.dumps({**good, "schema": "other/1"}),
        "missing": json.dumps({k: v for k, v in good.items() if k != "gpu_name"}),
        "unknown": json.dumps({**good, "extra": 1}),
        "sha256": json.dumps({**good, "engine_sha256": "xyz"}),
        "compute_capability": json.dumps({**good, "compute_capability": [8]}),
    }
    for expect, text in cases.items():
        side.write_text(text)
        with pytest.raises(EngineError, match=expect):
            verify_engine(engine, ORIN)
    side.unlink()
    with pytest.raises(EngineError, match="no sidecar"):
        verify_engine(engine, ORIN)
    # a sidecar that lies about the GPU to pass the check is still caught by the hash of the engine file
    side.write_text(json.dumps({**good, "engine_sha256": "0" * 64}))
    with pytest.raises(EngineMismatch, match="engine file sha256"):
        verify_engine(engine, ORIN)


def test_probe_runtime_without_tensorrt_says_how_to_install() -> None:
    if _has_tensorrt():
        pytest.skip("TensorRT is installed here; this test covers machines without it")
    with pytest.raises(EngineError, match="python3-libnvinfer"):
        eng.probe_runtime()


def test_probe_gpu_reads_the_cuda_driver() -> None:
    try:
        name, cc = eng.probe_gpu()
    except EngineError as exc:
        pytest.skip(f"no NVIDIA GPU/driver on this machine ({exc}); probe_gpu runs on the device")
    assert name and cc[0] >= 5
