"""Engine building: names, build options, the cache's use/build/rebuild decision, imports without torch;
building a real engine needs TensorRT and skips loudly. Verification at run time: tests/runtime/test_engine.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.trt import engine as eng
from exporter.trt.engine import BuildOptions, cache_decision, engine_name
from runtime.engine import EngineMismatch, RuntimeInfo, load_engine, probe_runtime, sidecar_path
from tests.support.fake_engine import fake_build

ORIN = RuntimeInfo(trt_version="10.3.0", gpu_name="Orin", compute_capability=(8, 7))
XAVIER_JP5 = RuntimeInfo(trt_version="8.5.2.2", gpu_name="Xavier", compute_capability=(7, 2))
ROOT = Path(__file__).resolve().parents[2]


def _has_tensorrt() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def _fake_build(tmp_path: Path, runtime: RuntimeInfo = ORIN, manifest_hash: str = "m" * 64):
    """A named engine with its sidecar, as build_engine leaves it (the bytes are not a real plan)."""
    return fake_build(tmp_path, runtime, manifest_hash, engine_name("tiny", "fp16", [1], runtime),
                      BuildOptions().flags())


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


def test_engine_modules_import_without_torch_and_the_runtime_without_the_exporter() -> None:
    """The run-time half (runtime.engine, which the edge agent loads engines with) imports no torch, ONNX tooling or
    exporter; the building half (exporter/trt/engine.py, run on the device that builds) imports no torch either."""
    code = (
        "import sys\n"
        "import runtime.engine, runtime.runners, runtime.cuda\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'exporter', 'onnx', 'onnxruntime')]\n"
        "assert not bad, bad\n"
        "import exporter.trt.engine as mod\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxruntime')]\n"
        "assert not bad, bad\n"
        "print(mod.engine_name('m', 'fp16', [1], mod.RuntimeInfo('10.3.0', 'Orin', (8, 7))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "m_fp16_b1_orin-sm87_trt10.3.0.engine"


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
    loaded = load_engine(engine, path, "a" * 64)
    assert {io["name"] for io in loaded.io} == {"x", "y"}
    cache = eng.EngineCache(tmp_path)
    assert cache.decide("eye", path, opts, probe_runtime(), "a" * 64).action == "use"
