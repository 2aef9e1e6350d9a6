"""`--budget`: the export chooses its schedule by the search on the calibration images and records it in the manifest."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from exporter.errors import ExportError, OptionsError
from exporter.export import ExportOptions, export_encoder
from exporter.options import MergeConfig
from tests.exporter.test_cli import run_cli, tiny_hf_dinov2
from tests.support.tiny_vit import tiny_vit
from tokenline import manifest as mf


def _image_folder(path: Path, n: int = 60, seed: int = 0) -> Path:
    """n smooth random colour images (upsampled 4x4 noise) in ``path``: a calibration folder."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        cv2.imwrite(str(path / f"frame_{i:03d}.png"), cv2.resize(low, (64, 64), interpolation=cv2.INTER_CUBIC))
    return path


def _export(out: Path, calib: Path, budget: float, **options):
    opts = ExportOptions(out_dir=out, name="tiny", calib_dir=calib, calib_count=60, batch_sizes=[2], bench_runs=2,
                         check_trt=False, **options)
    return export_encoder(tiny_vit(seed=1), MergeConfig(budget=budget, alpha=5.0, k=4), opts, family="timm_vit",
                          source_path="tiny.safetensors", source_sha256="a" * 64)


def test_budget_export_records_the_search_in_the_manifest(tmp_path: Path) -> None:
    calib = _image_folder(tmp_path / "calib")
    res = _export(tmp_path / "a", calib, budget=3.0)
    man = mf.Manifest.from_file(tmp_path / "a")
    s, chosen = man.merge.search, res.search.chosen
    assert s is not None and chosen is not None
    assert s.budget == 3.0 and s.loss == pytest.approx(chosen.fidelity.loss) and s.loss <= 3.0
    assert s.precision is None and s.file_loss is None and "precision" not in man.merge.search.model_dump()
    assert s.calibration_images == 60 and s.candidates_evaluated == len(res.search.points)
    assert s.schedule == chosen.candidate.name and s.flop_speedup == pytest.approx(chosen.candidate.speedup)
    assert man.merge.r_per_block == list(chosen.candidate.r_per_block) and man.merge.pre_r == chosen.candidate.pre_r
    assert {p.candidate.alpha for p in res.search.points} == {0.0, 5.0}  # ToMe's score and the configured alpha
    assert man.merge.alpha == chosen.candidate.alpha and man.merge.alpha_scale == 30.0
    assert man.merge.method == ("turbo" if chosen.candidate.alpha else "tome")
    assert man.validation.gflops < man.validation.gflops_unmerged
    again = _export(tmp_path / "b", calib, budget=3.0)  # deterministic: same points, same choice
    assert again.search == res.search
    assert mf.Manifest.from_file(tmp_path / "b").merge == man.merge


def test_budget_needs_real_calibration_images_and_no_schedule(tmp_path: Path) -> None:
    opts = ExportOptions(out_dir=tmp_path, name="tiny", batch_sizes=[2], check_trt=False)
    with pytest.raises(ExportError, match="calibration images"):
        export_encoder(tiny_vit(), MergeConfig(budget=1.0, k=4), opts, family="timm_vit", source_path="t.pt",
                       source_sha256="a" * 64)
    few = ExportOptions(out_dir=tmp_path, name="tiny", batch_sizes=[2], check_trt=False, calib_count=10,
                        calib_dir=_image_folder(tmp_path / "few", n=10))
    with pytest.raises(ExportError, match="at least 50 calibration images"):
        export_encoder(tiny_vit(), MergeConfig(budget=1.0, k=4), few, family="timm_vit", source_path="t.pt",
                       source_sha256="a" * 64)
    with pytest.raises(OptionsError, match="budget chooses the schedule"):
        MergeConfig(budget=1.0, r=4)
    with pytest.raises(OptionsError, match="budget"):
        MergeConfig(budget=-1.0)


def test_cli_budget_prints_the_explored_pareto(tmp_path: Path) -> None:
    ckpt = tiny_hf_dinov2(tmp_path / "dinov2")
    calib = _image_folder(tmp_path / "calib")
    res = run_cli("export", str(ckpt), "--out", str(tmp_path / "out"), "--budget", "5", "--calib", str(calib),
                  "--k", "4", "--batch", "2", "--no-trt-check", "--cpu-int8")
    assert res.returncode == 0, res.stderr
    man = mf.Manifest.from_file(tmp_path / "out")
    assert man.merge.search is not None and man.merge.search.calibration_images == 60  # all of the folder
    assert "schedule search within 5 points" in res.stdout
    assert "merged and INT8" in res.stdout  # the title says what was measured (rich wraps it)
    assert man.merge.search.precision == "int8" and any(f.role == "encoder_int8" for f in man.files)
    assert "(int8)" in res.stdout and "encoder_int8" in res.stdout  # the unmerged INT8 row, the INT8 file
    assert sum(line.lstrip("│┃ ").startswith("chosen") for line in res.stdout.splitlines()) == 1
    bad = run_cli("export", str(ckpt), "--out", str(tmp_path / "bad"), "--budget", "1")
    assert bad.returncode == 2 and "--calib" in bad.stderr and "Traceback" not in bad.stderr
    both = run_cli("export", str(ckpt), "--out", str(tmp_path / "both"), "--budget", "1", "--pre-r", "4",
                   "--calib", str(calib))
    assert both.returncode == 2 and "budget chooses the schedule" in both.stderr
