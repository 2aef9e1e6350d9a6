"""Encoder runners: ONNX Runtime against a bare session, fixed-batch padding, refusal of a model that disagrees
with its manifest, provider resolution; the TensorRT runner's "not installed" path (the rest skips loudly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.cpu import int8_saturates
from runtime.runners import (OnnxRuntimeRunner, RunnerError, RunnerUnavailable, TensorRTRunner, encoder_role,
                             pad_batch, resolve_providers)
from tests.support.tiny_model import build_tiny_model, reference_outputs
from tokenline.manifest import Manifest
from tokenline.preprocess import preprocess


def test_onnxruntime_runner_matches_bare_session(tiny_model_dir: Path) -> None:
    m = Manifest.from_file(tiny_model_dir)
    r = OnnxRuntimeRunner(tiny_model_dir, m, providers=["auto"])
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(3)]  # camera-sized BGR frames
    px = np.stack([preprocess(f, m.input) for f in frames])
    out = r.run(px)
    ref = reference_outputs(tiny_model_dir, px)
    np.testing.assert_allclose(out.tokens, ref[1], atol=1e-6)
    assert out.global_embedding.shape == (3, 384) and out.centroids.shape == (3, 16, 2) and "CPU" in r.name


def test_onnxruntime_threads_sleep_when_asked(tiny_model_dir: Path) -> None:
    m = Manifest.from_file(tiny_model_dir)
    key = "session.intra_op.allow_spinning"
    asleep = OnnxRuntimeRunner(tiny_model_dir, m, providers=["CPUExecutionProvider"], spinning=False)
    spinning = OnnxRuntimeRunner(tiny_model_dir, m, providers=["CPUExecutionProvider"])  # central's encoder
    assert asleep.sessions[None].get_session_options().get_session_config_entry(key) == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ONNX Runtime's own default: spin
        spinning.sessions[None].get_session_options().get_session_config_entry(key)


def test_fixed_batch_model_is_padded(tmp_path: Path) -> None:
    d = build_tiny_model(tmp_path / "b2", batch=2, dim=16)
    m = Manifest.from_file(d)
    r = OnnxRuntimeRunner(d, m)
    assert r.batch_sizes == [2]
    px = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    out = r.run(px)
    assert out.tokens.shape == (3, 16, 16)
    np.testing.assert_allclose(out.tokens[2], r.run(px[2:3]).tokens[0], atol=1e-6)
    assert [c.shape[0] for c in pad_batch(px, [1, 4])] == [4]
    assert [c.shape[0] for c in pad_batch(np.zeros((9, 1)), [1, 4])] == [4, 4, 1]
    # padding repeats the last frame: an older encoder_int8 file's per-call activation range sees nothing new
    padded = pad_batch(px, [4])[0]
    np.testing.assert_array_equal(padded[3], px[2])


def test_runner_refuses_a_model_that_disagrees_with_its_manifest(tmp_path: Path) -> None:
    d = build_tiny_model(tmp_path / "m", dim=32, output_dims=(64, 16))
    with pytest.raises(RunnerError, match="global_embedding is \\[B, 32\\], manifest says \\[B, 64\\]"):
        OnnxRuntimeRunner(d, Manifest.from_file(d))


def test_provider_resolution() -> None:
    assert resolve_providers(["auto"], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers(["auto"], ["CUDAExecutionProvider", "CPUExecutionProvider", "TensorrtExecutionProvider"]) \
        == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(RunnerError, match="model.providers"):
        resolve_providers(["CUDAExecutionProvider"], ["CPUExecutionProvider"])


def test_tensorrt_runner(tiny_model_dir: Path, tmp_path: Path) -> None:
    m = Manifest.from_file(tiny_model_dir)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(RunnerUnavailable, match="tensorrt"):
            TensorRTRunner(tmp_path / "x.engine", m)
        pytest.skip("tensorrt is not installed here: only the 'unavailable' path of the native runner is tested")
    with pytest.raises(RunnerError, match="does not exist"):
        TensorRTRunner(tmp_path / "x.engine", m)


X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx fma avx2 {extra}\n\n"


def test_which_cpus_saturate_int8_products() -> None:
    """x86 without VNNI saturates 8-bit weight products; VNNI (AVX-512 or AVX) and ARM do not; unknown stays None."""
    assert int8_saturates("x86_64", X86.format(extra="")) is True
    assert int8_saturates("x86_64", X86.format(extra="avx512f avx512_vnni")) is False
    assert int8_saturates("AMD64", X86.format(extra="avx_vnni")) is False
    assert int8_saturates("x86_64", X86.format(extra="avx512f avx512bw")) is True  # Skylake-X: AVX-512, no VNNI
    assert int8_saturates("aarch64", "Features\t: fp asimd asimddp") is False  # Jetson: exact without a flag
    assert int8_saturates("x86_64", "processor\t: 0\n") is None


def _with_int8_files(man: Manifest, bits) -> Manifest:
    enc = next(f for f in man.files if f.role == "encoder")
    extra = enc.model_copy(update={"role": "encoder_int8", "precision": "int8", "weight_bits": bits})
    return man.model_copy(update={"files": [*man.files, extra]})


def test_int8_files_with_8_bit_weights_are_not_run_where_they_saturate(tiny_model_dir: Path, caplog,
                                                                       monkeypatch) -> None:
    """'auto' runs the fp32 encoder on a CPU that saturates 8-bit weights (and says why), 7-bit files there and
    8-bit files elsewhere; 'on' runs them and warns; other providers and 'off' never run them."""
    man = Manifest.from_file(tiny_model_dir)
    cpu = ["CPUExecutionProvider"]
    assert encoder_role("auto", man, cpu, saturates=True) == "encoder"  # no INT8 files
    for bits in (None, 8):  # None: files exported before weight_bits existed have 8-bit weights
        m = _with_int8_files(man, bits)
        assert encoder_role("auto", m, cpu, saturates=False) == "encoder_int8"
        caplog.clear()
        assert encoder_role("auto", m, cpu, saturates=True) == "encoder"
        assert "saturates" in caplog.text and "--cpu-int8-weight-bits 7" in caplog.text
        caplog.clear()
        assert encoder_role("on", m, cpu, saturates=True) == "encoder_int8" and "saturates" in caplog.text
        assert encoder_role("auto", m, ["CUDAExecutionProvider", *cpu], saturates=False) == "encoder"
        assert encoder_role("off", m, cpu, saturates=False) == "encoder"
    # the runner says so in its name (the agent's /status and check-config show it)
    monkeypatch.setattr("runtime.runners.int8_saturates", lambda: True)
    fallback = OnnxRuntimeRunner(tiny_model_dir, _with_int8_files(man, 8), providers=cpu, int8="auto")
    assert fallback.role == "encoder" and "int8 files not run" in fallback.name
    plain = OnnxRuntimeRunner(tiny_model_dir, man, providers=cpu, int8="auto")
    assert plain.role == "encoder" and plain.name == "onnxruntime[CPU]"
    monkeypatch.undo()
    seven = _with_int8_files(man, 7)
    caplog.clear()
    assert encoder_role("auto", seven, cpu, saturates=True) == "encoder_int8" and not caplog.text
    assert encoder_role("auto", seven, cpu) == "encoder_int8"  # whatever this machine's CPU is
