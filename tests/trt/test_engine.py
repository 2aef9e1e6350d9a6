"""Engine naming, sidecar, refusal of mismatched or tampered engines, cache policy; TensorRT parts skip loudly."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.trt import engine as eng
from exporter.trt.engine import (
    BuildOptions,
    EngineError,
    EngineMismatch,
    RuntimeInfo,
    Sidecar,
    cache_decision,
    engine_name,
    read_sidecar,
    sha256_file,
    sidecar_path,
    verify_engine,
    write_sidecar,
)

ORIN = RuntimeInfo(trt_version="10.3.0", gpu_name="Orin", compute_capability=(8, 7))
XAVIER_JP5 = RuntimeInfo(trt_version="8.5.2.2", gpu_name="Xavier", compute_capability=(7, 2))
ROOT = Path(__file__).resolve().parents[2]


def _has_tensorrt() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def test_engine_name_carries_model_precision_batch_gpu_and_version() -> None:
    assert engine_name("dinov2-s14 turbo", "fp16", [1], ORIN) == "dinov2-s14-turbo_fp16_b1_orin-sm87_trt10.3.0.engine"
    assert engine_name("m", "int8", [1, 4, 8], XAVIER_JP5, dla_core=0) == "m_int8_b1-8_xavier-sm72_dla0_trt8.5.2.2.engine"
    rtx = RuntimeInfo("10.3.0", "NVIDIA GeForce RTX 4090", (8, 9))
    assert engine_name("m", "fp16", [4], rtx) == "m_fp16_b4_nvidia-geforce-rtx-4090-sm89_trt10.3.0.engine"
    # different GPU or TensorRT -> different file: engines never overwrite each other across devices
    assert len({engine_name("m", "fp16", [1], r) for r in (ORIN, XAVIER_JP5, rtx)}) == 3
    with pytest.raises(ValueError, match="precision"):
        engine_name("m", "bf16", [1], ORIN)
    with pytest.raises(ValueError, match="batch"):
        engine_name("m", "fp16", [], ORIN)


def test_build_options_validation_names_the_key() -> None:
    with pytest.raises(ValueError, match="dla_core"):
        BuildOptions(precision="fp32", dla_core=0)
    with pytest.raises(ValueError, match="workspace_mib"):
        BuildOptions(workspace_mib=1)
    with pytest.raises(ValueError, match="optimization_level"):
        BuildOptions(optimization_level=9)
    assert BuildOptions(batch_sizes=(1, 4)).flags()["batch_sizes"] == [1, 4]


def _fake_build(tmp_path: Path, runtime: RuntimeInfo = ORIN, manifest_hash: str = "m" * 64):
    """An engine file as build_engine leaves it: bytes + sidecar (the bytes are not a real plan)."""
    onnx_path = tmp_path / "encoder_b1.onnx"
    onnx_path.write_bytes(b"onnx-model-bytes")
    name = engine_name("tiny", "fp16", [1], runtime)
    engine = tmp_path / name
    engine.write_bytes(b"serialized-plan" * 100)
    sc = Sidecar(model="tiny", precision="fp16", batch_sizes=[1], trt_version=runtime.trt_version,
                 gpu_name=runtime.gpu_name, compute_capability=list(runtime.compute_capability),
                 build_flags=BuildOptions().flags(), engine_sha256=sha256_file(engine),
                 onnx_sha256=sha256_file(onnx_path), onnx_file=onnx_path.name, manifest_hash=manifest_hash,
                 created_at="2026-11-24T00:00:00+00:00")
    write_sidecar(engine, sc)
    return engine, onnx_path, sc


def test_sidecar_round_trip_next_to_the_engine(tmp_path: Path) -> None:
    engine, _, sc = _fake_build(tmp_path)
    assert sidecar_path(engine) == engine.with_name(engine.name + ".json") and sidecar_path(engine).is_file()
    assert read_sidecar(engine) == sc
    assert engine.read_bytes() == b"serialized-plan" * 100  # nothing prepended: trtexec/DeepStream can load it
    assert verify_engine(engine, ORIN, tmp_path / "encoder_b1.onnx", "m" * 64) == sc


def test_refuses_other_tensorrt_version_and_gpu(tmp_path: Path) -> None:
    engine, onnx_path, _ = _fake_build(tmp_path)
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
    engine, onnx_path, _ = _fake_build(tmp_path)
    data = bytearray(engine.read_bytes())
    data[10] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(EngineMismatch, match="engine file sha256"):
        verify_engine(engine, ORIN)
    engine, onnx_path, _ = _fake_build(tmp_path)
    onnx_path.write_bytes(b"re-exported model")
    with pytest.raises(EngineMismatch, match="source ONNX sha256"):
        verify_engine(engine, ORIN, onnx_path)
    engine, onnx_path, _ = _fake_build(tmp_path)
    with pytest.raises(EngineMismatch, match="manifest hash"):
        verify_engine(engine, ORIN, onnx_path, manifest_hash="0" * 64)


def test_crafted_sidecars_are_rejected(tmp_path: Path) -> None:
    engine, _, sc = _fake_build(tmp_path)
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


def test_cache_decides_use_build_or_rebuild(tmp_path: Path) -> None:
    engine, onnx_path, _ = _fake_build(tmp_path)
    opts = BuildOptions(precision="fp16", batch_sizes=(1,))
    assert cache_decision(tmp_path, "tiny", onnx_path, opts, ORIN, "m" * 64).action == "use"
    d = cache_decision(tmp_path, "tiny", onnx_path, BuildOptions(precision="int8"), ORIN)
    assert d.action == "build" and "int8" in d.engine.name
    # the same engine name on a device whose TensorRT patch release differs: refuse, or rebuild when told to
    engine.rename(tmp_path / engine_name("tiny", "fp16", [1], RuntimeInfo("10.3.0", "Orin", (8, 7))))
    onnx_path.write_bytes(b"new export")
    with pytest.raises(EngineMismatch, match="source ONNX"):
        cache_decision(tmp_path, "tiny", onnx_path, opts, ORIN)
    d = cache_decision(tmp_path, "tiny", onnx_path, opts, ORIN, rebuild_on_mismatch=True)
    assert d.action == "rebuild" and any("source ONNX" in r for r in d.reasons)
    sidecar_path(d.engine).unlink()
    with pytest.raises(EngineMismatch, match="no sidecar"):
        cache_decision(tmp_path, "tiny", onnx_path, opts, ORIN)
    assert cache_decision(tmp_path, "tiny", onnx_path, opts, ORIN, rebuild_on_mismatch=True).action == "rebuild"


def test_engine_module_is_vendorable_without_torch_or_exporter() -> None:
    """engine.py is loaded from its file alone (as the edge agent would vendor it) and imports no torch."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('trt_engine', {str(ROOT / 'exporter/trt/engine.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['trt_engine'] = mod; spec.loader.exec_module(mod)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'exporter', 'onnx', 'onnxruntime')]\n"
        "assert not bad, bad\n"
        "print(mod.engine_name('m', 'fp16', [1], mod.RuntimeInfo('10.3.0', 'Orin', (8, 7))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "m_fp16_b1_orin-sm87_trt10.3.0.engine"


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


def test_build_and_load_real_engine(tmp_path: Path) -> None:
    if not _has_tensorrt():
        pytest.skip("TensorRT is not installed (PyPI's tensorrt is a stub and NVIDIA's index is unreachable "
                    "here): engine build/load runs on a Jetson or a machine with TensorRT, see docs/jetson.md")
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    w = numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [w])
    path = tmp_path / "eye.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    opts = BuildOptions(precision="fp16", batch_sizes=(1, 4), timing_cache=tmp_path / "timing.cache")
    engine = eng.build_engine(path, tmp_path, "eye", opts, manifest_hash="a" * 64)
    assert (tmp_path / "timing.cache").stat().st_size > 0
    loaded = eng.load_engine(engine, path, "a" * 64)
    assert {io["name"] for io in loaded.io} == {"x", "y"}
    cache = eng.EngineCache(tmp_path)
    assert cache.decide("eye", path, opts, eng.probe_runtime(), "a" * 64).action == "use"
