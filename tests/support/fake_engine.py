"""Test helper: an engine file and its sidecar as the exporter's build leaves them (the bytes are not a real plan).

Lets the run-time checks (runtime.engine) and the exporter's cache decision be tested without TensorRT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from runtime.engine import RuntimeInfo, Sidecar, write_sidecar
from tokenline.manifest import sha256_file

ORIN = RuntimeInfo(trt_version="10.3.0", gpu_name="Orin", compute_capability=(8, 7))
# what the exporter's BuildOptions().flags() writes (tests/trt builds the real thing)
BUILD_FLAGS: Dict[str, Any] = {"precision": "fp16", "batch_sizes": [1], "workspace_mib": 1024, "dla_core": None,
                               "timing_cache": None, "optimization_level": None}


def fake_build(tmp_path: Path, runtime: RuntimeInfo = ORIN, manifest_hash: str = "m" * 64,
               name: str = "tiny_fp16_b1_orin-sm87_trt10.3.0.engine", build_flags: Dict[str, Any] = BUILD_FLAGS):
    """Write ``encoder_b1.onnx`` and engine ``name`` with its sidecar into ``tmp_path``; (engine, onnx, sidecar)."""
    onnx_path = tmp_path / "encoder_b1.onnx"
    onnx_path.write_bytes(b"onnx-model-bytes")
    engine = tmp_path / name
    engine.write_bytes(b"serialized-plan" * 100)
    sc = Sidecar(model="tiny", precision="fp16", batch_sizes=[1], trt_version=runtime.trt_version,
                 gpu_name=runtime.gpu_name, compute_capability=list(runtime.compute_capability),
                 build_flags=build_flags, engine_sha256=sha256_file(engine),
                 onnx_sha256=sha256_file(onnx_path), onnx_file=onnx_path.name, manifest_hash=manifest_hash,
                 created_at="2026-11-24T00:00:00+00:00")
    write_sidecar(engine, sc)
    return engine, onnx_path, sc
