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
from runtime.runners import OnnxRuntimeRunner, RunnerError
from tests.exporter.test_budget import _export as export_budget
from tests.exporter.test_budget import _image_folder
from tests.support.tiny_vit import tiny_vit
from tokenline import manifest as mf


def _global(vit, x: np.ndarray, batch: int) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([vit(torch.from_numpy(x[i : i + batch]))[0] for i in range(0, len(x), batch)]).numpy()


def test_simulation_computes_what_the_onnx_runtime_file_computes(tmp_path: Path) -> None:
    vit = tiny_vit(seed=3)
    vit.configure_merging(MergeConfig(r=4, k=4))
    export_onnx(vit, tmp_path / "fp32.onnx", 4, 17, "fp32", simplify=True)
    made = quantize_dynamic_file(tmp_path / "fp32.onnx", tmp_path / "int8.onnx")
    nodes = onnx.load(str(tmp_path / "int8.onnx")).graph.node
    x = np.random.default_rng(0).standard_normal((12, 3, 48, 48)).astype(np.float32)
    with simulate(vit) as names:
        sim = _global(vit, x, 4)
        # every projection of every block: q/k/v, attention output, both MLP layers (the down-projection too)
        assert len(names) == made == sum(n.op_type == "MatMulInteger" for n in nodes) == 4 * 3
        assert {n.rsplit(".", 1)[-1] for n in names} == {"qkv", "proj", "fc1", "fc2"}
    fp32 = _global(vit, x, 4)
    ort = run_batched(ort_session(tmp_path / "int8.onnx"), x, 4)[0]
    err_sim, err_fp32 = 1 - cosine_rows(sim, ort), 1 - cosine_rows(fp32, ort)
    assert err_fp32.mean() > 1e-6  # INT8 moves the embedding ...
    assert err_sim.mean() < 0.2 * err_fp32.mean()  # ... and the simulation moves it the same way
    again = _global(vit, x, 4)  # leaving the block restores fp32
    np.testing.assert_array_equal(again, fp32)


def _export(out: Path, calib: Path, budget: float):
    return export_budget(out, calib, budget, cpu_int8=True)


def test_budget_search_in_int8_writes_and_records_the_int8_file(tmp_path: Path) -> None:
    calib = _image_folder(tmp_path / "calib")
    res = _export(tmp_path / "a", calib, budget=3.0)
    man = mf.Manifest.from_file(tmp_path / "a")
    s = man.merge.search
    assert s is not None and s.precision == "int8" and res.search.precision == "int8"
    base = res.search.base
    assert base is not None and 0 < base.loss <= 3.0  # INT8 alone costs something, within the budget
    assert s.loss <= 3.0 and s.loss == pytest.approx(res.search.chosen.fidelity.loss)
    # the written file measured the same way: on this model the simulation is exact to rounding
    assert s.file_loss is not None and s.file_loss == pytest.approx(s.loss, abs=0.2)
    int8 = [f for f in man.files if f.role == "encoder_int8"]
    assert [(f.path, f.precision, f.batch) for f in int8] == [("encoder_int8_b2.onnx", "int8", 2)]
    assert mf.sha256_file(tmp_path / "a" / int8[0].path) == int8[0].sha256
    v = man.validation
    assert 0.98 <= v.int8_cosine_vs_fp32_min <= v.int8_cosine_vs_fp32_mean < 1.0 and v.ort_images_per_s_int8 > 0

    # the runner: INT8 on a CPU-only ONNX Runtime by default ("auto"), fp32 when asked, close to each other
    x = np.random.default_rng(1).standard_normal((3, 3, 48, 48)).astype(np.float32)
    auto = OnnxRuntimeRunner(tmp_path / "a", man, providers=["CPUExecutionProvider"], int8="auto")
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


def test_runner_int8_on_needs_the_file(tiny_model_dir: Path) -> None:
    man = mf.Manifest.from_file(tiny_model_dir)
    with pytest.raises(RunnerError, match="model.int8: 'on'.*--cpu-int8"):
        OnnxRuntimeRunner(tiny_model_dir, man, providers=["CPUExecutionProvider"], int8="on")
    assert OnnxRuntimeRunner(tiny_model_dir, man, providers=["CPUExecutionProvider"], int8="auto").role == "encoder"
