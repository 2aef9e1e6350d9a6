"""`--budget`: the export chooses its schedule by the search on the calibration images and records it in the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pytest

from exporter.errors import ExportError, OptionsError
from exporter.export import ExportOptions, export_encoder
from exporter.options import MergeConfig
from exporter.search import SUMMARY_MEASURE
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


def _export(out: Path, calib: Path, budget: float, summary_budget: Optional[float] = None, **options):
    opts = ExportOptions(out_dir=out, name="tiny", calib_dir=calib, calib_count=60, batch_sizes=[2], bench_runs=2,
                         check_trt=False, **options)
    merge = MergeConfig(budget=budget, summary_budget=summary_budget, alpha=5.0, k=4)
    return export_encoder(tiny_vit(seed=1), merge, opts, family="timm_vit", source_path="tiny.safetensors",
                          source_sha256="a" * 64)


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


def test_a_summary_budget_keeps_the_schedule_that_the_summary_allows(tmp_path: Path) -> None:
    """With --summary-budget the search also measures the summary tokens against the unmerged encoder's and picks
    a milder schedule than the global embedding alone allows; the manifest records both measures."""
    calib = _image_folder(tmp_path / "calib")
    global_only = _export(tmp_path / "g", calib, budget=3.0).search
    res = _export(tmp_path / "s", calib, budget=3.0, summary_budget=50.0)
    s = mf.Manifest.from_file(tmp_path / "s").merge.search
    assert all(p.fidelity.summary_loss is not None for p in res.search.points)
    chosen = res.search.chosen
    assert chosen is not None and chosen.fidelity.summary_loss <= 50.0 and chosen.fidelity.loss <= 3.0
    over = [p for p in global_only.points if p.candidate.gflops < chosen.candidate.gflops]
    assert chosen.candidate.gflops > global_only.chosen.candidate.gflops  # the summary held the search back
    assert over and all(q.fidelity.summary_loss > 50.0 for q in res.search.points
                        if q.candidate.gflops < chosen.candidate.gflops)  # every cheaper one measured misses it
    assert s.summary_budget == 50.0 and s.summary_measure == SUMMARY_MEASURE
    assert s.summary_loss == pytest.approx(chosen.fidelity.summary_loss)
    assert s.summary_agreement == pytest.approx(chosen.fidelity.summary_agreement)
    assert "summary_budget" not in mf.Manifest.from_file(tmp_path / "g").merge.search.model_dump()  # old hash kept
    none = _export(tmp_path / "z", calib, budget=3.0, summary_budget=0.0)  # nothing merged keeps the summary
    z = mf.Manifest.from_file(tmp_path / "z")
    assert none.search.chosen is None and z.merge.method == "none" and z.merge.search.summary_loss == 0.0
    with pytest.raises(OptionsError, match="summary_budget"):
        MergeConfig(summary_budget=1.0)


def test_int8_alone_over_the_summary_budget_is_refused(tmp_path: Path) -> None:
    """With --cpu-int8 the unmerged INT8 model's summary loss is measured first; over the summary budget the search
    stops with a one-line error instead of exporting (seed 0 of the tiny model: INT8 moves a summary neighbour)."""
    from exporter.budget import choose_schedule
    from exporter.calibration import calibration_images
    from exporter.export import input_spec
    from exporter.search import SearchError

    calib_dir = _image_folder(tmp_path / "calib")

    def run(summary_budget: float):
        vit = tiny_vit(seed=0).eval()
        x = calibration_images(input_spec(vit), calib_dir, 60)
        return choose_schedule(vit, MergeConfig(budget=50.0, summary_budget=summary_budget, k=4, alpha=5.0), x,
                               int8=True)[1]

    own = run(100.0).base.summary_loss
    assert own is not None and own > 0, "INT8 no longer moves this tiny model's summaries: pick another seed"
    with pytest.raises(SearchError, match=r"INT8 alone loses [0-9.]+ points of the summary .* summary budget"):
        run(own / 2)


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
    sb = run_cli("export", str(ckpt), "--out", str(tmp_path / "sb"), "--budget", "5", "--summary-budget", "60",
                 "--calib", str(calib), "--k", "4", "--batch", "2", "--no-trt-check")
    assert sb.returncode == 0, sb.stderr
    ss = mf.Manifest.from_file(tmp_path / "sb").merge.search
    assert ss.summary_budget == 60.0 and "60 summary points" in sb.stdout  # the title (rich wraps the columns)
    chosen_row = next(line for line in sb.stdout.splitlines() if line.lstrip("│┃ ").startswith("chosen"))
    assert f"{ss.summary_loss:.2f}" in chosen_row  # the chosen schedule's summary loss, in its own column
    alone = run_cli("export", str(ckpt), "--out", str(tmp_path / "alone"), "--summary-budget", "1", "--calib",
                    str(calib))
    assert alone.returncode == 2 and "give it with budget" in alone.stderr and "Traceback" not in alone.stderr
    bad = run_cli("export", str(ckpt), "--out", str(tmp_path / "bad"), "--budget", "1")
    assert bad.returncode == 2 and "--calib" in bad.stderr and "Traceback" not in bad.stderr
    both = run_cli("export", str(ckpt), "--out", str(tmp_path / "both"), "--budget", "1", "--pre-r", "4",
                   "--calib", str(calib))
    assert both.returncode == 2 and "budget chooses the schedule" in both.stderr
