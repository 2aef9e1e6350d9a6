"""`--cpu-int8`: the dynamic INT8 file, the search's torch simulation of it, the budget measured in INT8, the runner's
choice of file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporter.errors import ExportError, OptionsError
from exporter.export import ExportOptions, export_onnx
from exporter.int8_cpu import cosine_rows, quantize_dynamic_file, simulate
from exporter.options import MergeConfig
from exporter.validate import ort_session, run_batched
from runtime.cpu import int8_saturates
from runtime.runners import OnnxRuntimeRunner, RunnerError
from tests.exporter.test_budget import _export as export_budget
from tests.exporter.test_budget import _image_folder
from tests.support.tiny_vit import tiny_vit
from tokenline import manifest as mf


SATURATES = int8_saturates() is True  # this CPU: x86 without VNNI (runtime.cpu)
# what the file and its simulation compute agree only where the CPU computes the file's products exactly: 7-bit
# weights everywhere, 8-bit ones not on x86 without VNNI (docs/choosing-a-schedule.md, 'The CPU matters')
EXACT_HERE = [pytest.param(8, marks=pytest.mark.skipif(
    SATURATES, reason="this x86 CPU has no VNNI: ONNX Runtime saturates 8-bit weight products here, so that file "
    "does not compute what its simulation does (the 7-bit case runs instead)")), 7]


def _global(vit, x: np.ndarray, batch: int) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([vit(torch.from_numpy(x[i : i + batch]))[0] for i in range(0, len(x), batch)]).numpy()


@pytest.mark.parametrize("bits", EXACT_HERE)
def test_simulation_computes_what_the_onnx_runtime_file_computes(tmp_path: Path, bits: int) -> None:
    vit = tiny_vit(seed=3)
    vit.configure_merging(MergeConfig(r=4, k=4))
    export_onnx(vit, tmp_path / "fp32.onnx", 4, 17, "fp32", simplify=True)
    made = quantize_dynamic_file(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", weight_bits=bits)
    nodes = onnx.load(str(tmp_path / "int8.onnx")).graph.node
    weights = [onnx.numpy_helper.to_array(t).astype(np.int32) for t in onnx.load(str(tmp_path / "int8.onnx")).graph
               .initializer if t.data_type == onnx.TensorProto.INT8]
    assert max(int(np.abs(w).max()) for w in weights) == {8: 127, 7: 64}[bits]  # the weights' range
    x = np.random.default_rng(0).standard_normal((12, 3, 48, 48)).astype(np.float32)
    with simulate(vit, bits) as names:
        sim = _global(vit, x, 4)
        # every projection of every block: q/k/v, attention output, both MLP layers (the down-projection too)
        assert len(names) == made == sum(n.op_type == "MatMulInteger" for n in nodes) // 4 == 4 * 3  # per image
        assert {n.rsplit(".", 1)[-1] for n in names} == {"qkv", "proj", "fc1", "fc2"}
    fp32 = _global(vit, x, 4)
    ort = run_batched(ort_session(tmp_path / "int8.onnx"), x, 4)[0]
    err_sim, err_fp32 = 1 - cosine_rows(sim, ort), 1 - cosine_rows(fp32, ort)
    assert err_fp32.mean() > 1e-6  # INT8 moves the embedding ...
    assert err_sim.mean() < 0.2 * err_fp32.mean()  # ... and the simulation moves it the same way
    again = _global(vit, x, 4)  # leaving the block restores fp32
    np.testing.assert_array_equal(again, fp32)


def test_a_batch_file_quantizes_each_image_by_its_own_ranges(tmp_path: Path) -> None:
    """In a batch file an image's outputs do not depend on the images batched with it, other images or 40 times
    larger ones (ONNX Runtime's quantizer alone, one range per call, moves its summary tokens: the check can fail)."""
    vit = tiny_vit(seed=3)
    vit.configure_merging(MergeConfig(r=4, k=4))
    export_onnx(vit, tmp_path / "fp32.onnx", 4, 17, "fp32", simplify=True)
    made = quantize_dynamic_file(tmp_path / "fp32.onnx", tmp_path / "int8.onnx")
    quantize_dynamic_file(tmp_path / "fp32.onnx", tmp_path / "per_call.onnx", per_image=False)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 48, 48)).astype(np.float32)
    loud = np.concatenate([x[:1], 40 * rng.standard_normal((3, 3, 48, 48)).astype(np.float32)])
    alone = np.repeat(x[:1], 4, axis=0)
    nodes = onnx.load(str(tmp_path / "int8.onnx")).graph.node
    assert made == 12 and sum(n.op_type == "DynamicQuantizeLinear" for n in nodes) == 4 * made  # per image
    per_image = ort_session(tmp_path / "int8.onnx")
    outs = [per_image.run(None, {"pixels": b}) for b in (x, loud, alone)]
    for name, a, b, c in zip([o.name for o in per_image.get_outputs()], *outs):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(a[0], c[0], rtol=1e-5, atol=1e-6, err_msg=name)
    per_call = ort_session(tmp_path / "per_call.onnx")
    quiet, noisy = (per_call.run(None, {"pixels": b}) for b in (alone, loud))
    assert np.abs(quiet[1][0] - noisy[1][0]).max() > 1e-2  # its mates move image 0's summary tokens
    for a, b in zip(quiet, outs[2]):  # alone, the two files compute the same
        np.testing.assert_allclose(a[0], b[0], rtol=1e-4, atol=1e-5)


def _export(out: Path, calib: Path, budget: float, bits: int = 8):
    return export_budget(out, calib, budget, cpu_int8=True, **({} if bits == 8 else {"cpu_int8_weight_bits": bits}))


@pytest.mark.parametrize("bits", EXACT_HERE)
def test_budget_search_in_int8_writes_and_records_the_int8_file(tmp_path: Path, bits: int) -> None:
    calib = _image_folder(tmp_path / "calib")
    res = _export(tmp_path / "a", calib, budget=3.0, bits=bits)
    man = mf.Manifest.from_file(tmp_path / "a")
    s = man.merge.search
    assert s is not None and s.precision == "int8" and res.search.precision == "int8"
    base = res.search.base
    assert base is not None and 0 < base.loss <= 3.0  # INT8 alone costs something, within the budget
    assert s.loss <= 3.0 and s.loss == pytest.approx(res.search.chosen.fidelity.loss)
    # the written file measured the same way: on this model the simulation is exact to rounding
    assert s.file_loss is not None and s.file_loss == pytest.approx(s.loss, abs=0.2)
    int8 = [f for f in man.files if f.role == "encoder_int8"]
    assert [(f.path, f.precision, f.batch, f.weight_bits) for f in int8] == [("encoder_int8_b2.onnx", "int8", 2, bits)]
    assert mf.sha256_file(tmp_path / "a" / int8[0].path) == int8[0].sha256
    v = man.validation
    assert 0.98 <= v.int8_cosine_vs_fp32_min <= v.int8_cosine_vs_fp32_mean < 1.0 and v.ort_images_per_s_int8 > 0

    # the runner: INT8 on a CPU-only ONNX Runtime by default ("auto"), fp32 when asked, close to each other
    x = np.random.default_rng(1).standard_normal((3, 3, 48, 48)).astype(np.float32)
    auto = OnnxRuntimeRunner(tmp_path / "a", man, providers=["CPUExecutionProvider"], int8="auto")  # exact here
    off = OnnxRuntimeRunner(tmp_path / "a", man, providers=["CPUExecutionProvider"], int8="off")
    assert auto.role == "encoder_int8" and "int8" in auto.name and off.role == "encoder"
    a, o = auto.run(x).global_embedding, off.run(x).global_embedding
    assert not np.array_equal(a, o) and cosine_rows(a, o).min() > 0.98


def test_int8_over_the_budget_is_refused_and_options_are_checked(tmp_path: Path) -> None:
    calib = _image_folder(tmp_path / "calib")
    with pytest.raises(ExportError, match="INT8 alone loses .* over the budget of 0"):
        _export(tmp_path / "z", calib, budget=0.0)
    with pytest.raises(OptionsError, match="cpu_int8 quantizes the fp32 graph"):
        ExportOptions(out_dir=tmp_path, name="x", cpu_int8=True, precision="fp16")
    with pytest.raises(OptionsError, match="cpu_int8_weight_bits sets the encoder_int8 files' weights: give it with"):
        ExportOptions(out_dir=tmp_path, name="x", cpu_int8_weight_bits=7)
    with pytest.raises(OptionsError, match="cpu_int8_weight_bits"):
        ExportOptions(out_dir=tmp_path, name="x", cpu_int8=True, cpu_int8_weight_bits=6)


def test_runner_int8_on_needs_the_file(tiny_model_dir: Path) -> None:
    man = mf.Manifest.from_file(tiny_model_dir)
    with pytest.raises(RunnerError, match="model.int8: 'on'.*--cpu-int8"):
        OnnxRuntimeRunner(tiny_model_dir, man, providers=["CPUExecutionProvider"], int8="on")
    assert OnnxRuntimeRunner(tiny_model_dir, man, providers=["CPUExecutionProvider"], int8="auto").role == "encoder"


def test_export_refuses_an_int8_batch_file_whose_images_depend_on_each_other(tmp_path: Path, monkeypatch) -> None:
    """The export's own check: a batch file made with one activation range per call (ONNX Runtime's quantizer as
    it is) is refused with a one-line reason; the exporter's per-image file passes it (the other tests)."""
    from functools import partial

    import exporter.export as export_mod
    from exporter.export import export_encoder

    monkeypatch.setattr(export_mod, "quantize_dynamic_file", partial(quantize_dynamic_file, per_image=False))
    calib = _image_folder(tmp_path / "calib")
    opts = ExportOptions(out_dir=tmp_path / "out", name="tiny", calib_dir=calib, calib_count=8, batch_sizes=[4],
                         bench_runs=1, check_trt=False, cpu_int8=True)
    with pytest.raises(ExportError, match="changes with the images batched with it"):
        export_encoder(tiny_vit(seed=1), MergeConfig(r=4, k=4), opts, family="timm_vit",
                       source_path="tiny.safetensors", source_sha256="a" * 64)
