"""ExportOptions and MergeConfig: strict validation that names the key; the CLI names the flag, on one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from exporter.cli import _flag_errors, build_parser
from exporter.errors import ExportError, OptionsError
from exporter.options import DEFAULT_TOLERANCE, ExportOptions, MergeConfig
from tokenline.manifest import Family

ROOT = Path(__file__).resolve().parents[2]


def test_unknown_keys_are_rejected_by_name(tmp_path: Path) -> None:
    with pytest.raises(OptionsError) as err:
        ExportOptions(out_dir=tmp_path, name="m", batch=[2])
    assert str(err.value).splitlines() == ["ExportOptions: invalid export options:",
                                           "  batch: unknown key (not allowed)"]
    with pytest.raises(OptionsError, match=r"(?s)invalid merge settings:.*  ratio: unknown key"):
        MergeConfig(ratio=3)


def test_bad_values_name_every_key(tmp_path: Path) -> None:
    with pytest.raises(OptionsError) as err:
        ExportOptions(out_dir=tmp_path, name="m", precision="int8", opset=13, batch_sizes=[1, 0], bench_runs=0)
    lines = str(err.value).splitlines()[1:]
    assert [ln.split(":")[0].strip() for ln in lines] == ["precision", "batch_sizes", "opset", "bench_runs"]
    text = str(err.value)
    assert "opset 13 is too old" in text and "batch sizes must be >= 1" in text
    assert isinstance(err.value, ExportError)  # callers that catch the exporter's error catch these too
    assert {e["loc"][0] for e in err.value.errors} == {"precision", "opset", "batch_sizes", "bench_runs"}
    with pytest.raises(OptionsError, match="  k: Input should be a valid integer"):
        MergeConfig(k="many")


def test_defaults_and_derived_values(tmp_path: Path) -> None:
    o = ExportOptions(out_dir=str(tmp_path), name="m")
    assert o.out_dir == tmp_path and o.batch_sizes == [1] and o.opset == 17 and o.precision == "fp32"
    assert o.max_abs_error == DEFAULT_TOLERANCE["fp32"]
    assert ExportOptions(out_dir=tmp_path, name="m", precision="fp16").max_abs_error == DEFAULT_TOLERANCE["fp16"]
    assert ExportOptions(out_dir=tmp_path, name="m", tolerance=0.5).max_abs_error == 0.5
    assert ExportOptions(out_dir=tmp_path, name="m", batch_sizes=[4]).batch_sizes == [4]
    a, b = ExportOptions(out_dir=tmp_path, name="a"), ExportOptions(out_dir=tmp_path, name="b")
    assert a.batch_sizes is not b.batch_sizes  # a mutable default is not shared
    m = MergeConfig(r=4, alpha=5.0, k=8, summary_layer=6, summary_dim=64)
    assert (m.method, MergeConfig(r=4).method, MergeConfig().method) == ("turbo", "tome", "none")
    assert m.unmerged() == MergeConfig(k=8, alpha=5.0, summary_layer=6, summary_dim=64) and m.unmerged().method == "none"
    assert (MergeConfig().summary_layer, MergeConfig().summary_dim, MergeConfig().summary_iters) == (None, 96, 3)
    with pytest.raises(Exception):  # frozen: options are values
        m.k = 3  # type: ignore[misc]


def test_cli_help_shows_the_models_defaults_and_the_families(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ONNX opset (>= 17) (default: 17)" in text and "summary tokens per image (default: 16)" in text
    assert f"(spread over the folder) (default: {ExportOptions.model_fields['calib_count'].default})" in text
    assert " | ".join(get_args(Family)) + " (default: detect)" in text


def test_cli_names_the_flag_of_a_bad_option(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "exporter.cli", "export", "x.pt", "--out", str(tmp_path),
                          "--opset", "13", "--batch", "2", "--target-tokens", "8"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: --opset: Value error, opset 13 is too old: LayerNorm-era graphs need >= 17"]


def test_cli_flags_are_named_after_the_fields_they_set() -> None:
    args = build_parser().parse_args(["export", "x.pt", "--out", "o", "--target-tokens", "8", "--no-unmerged"])
    assert args.target == 8 and args.export_unmerged is False and not hasattr(args, "opset")  # unset: model default
    assert args.flags["target"] == "--target-tokens" and args.flags["calib_dir"] == "--calib"
    with pytest.raises(OptionsError) as err:
        MergeConfig(target="eight", floor=-1.5)
    assert _flag_errors(err.value.errors, args.flags) == (
        "--target-tokens: Input should be a valid integer, unable to parse string as an integer; "
        "--floor: Input should be a valid integer, got a number with a fractional part")
