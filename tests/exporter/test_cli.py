"""`tokenline-export export` end to end on tiny checkpoints of each family, and its error cases; the shared CLI
conventions (options anywhere, one-line errors with exit 2, the traceback only with --debug, quiet by default) and
the progress display on a terminal."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
from pathlib import Path
from typing import List

import pytest

from tokenline.manifest import Manifest, verify_files

ROOT = Path(__file__).resolve().parents[2]


def tiny_hf_dinov2(path: Path) -> Path:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=28, patch_size=7, layerscale_value=0.5)
    Dinov2Model(cfg).eval().save_pretrained(path)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_export_cli_writes_a_valid_manifest_and_table(tmp_path: Path) -> None:
    ckpt = tiny_hf_dinov2(tmp_path / "dinov2")
    out = tmp_path / "out"
    res = run_cli("export", str(ckpt), "--out", str(out), "--r", "3", "--alpha", "5", "--k", "4", "--batch", "2",
                  "--name", "tiny-dinov2", "--summary-layer", "2", "--summary-dim", "8")
    assert res.returncode == 0, res.stderr
    man = Manifest.from_file(out)
    verify_files(man, out)
    assert man.family == "hf_dinov2" and man.merge.method == "turbo" and man.summary.k == 4
    assert (man.summary.method, man.summary.layer, man.summary.dim) == ("slic", 2, 8)
    assert man.summary.projection.method == "pca" and man.summary.projection.input_dim == 32
    assert man.merge.r_per_block == [3, 3] and man.merge.tokens_per_block == [17, 14]
    for word in ("tokens per block", "GFLOPs", "images/s", "cosine vs unmerged", "max abs error"):
        assert word in res.stdout
    assert only_warnings(res)  # quiet by default, no progress display when stderr is not a terminal


def stderr_lines(res: subprocess.CompletedProcess) -> List[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


def only_warnings(res: subprocess.CompletedProcess) -> bool:
    """stderr holds log records from WARNING on (synthetic calibration images are one) and nothing else."""
    return all(" WARNING " in line for line in stderr_lines(res))


@pytest.mark.parametrize("content,expect", [
    (b"\x00garbage that is no checkpoint", "error:"),
    (None, "error:"),
])
def test_export_cli_rejects_bad_checkpoints_without_traceback(tmp_path: Path, content, expect: str) -> None:
    ckpt = tmp_path / "model.safetensors"
    if content is not None:
        ckpt.write_bytes(content)
    res = run_cli("export", str(ckpt), "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    assert expect in res.stderr and "Traceback" not in res.stderr
    assert len(stderr_lines(res)) == 1 and stderr_lines(res)[0].startswith("error: "), res.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_missing_checkpoint_is_one_line_and_debug_anywhere_adds_the_traceback(tmp_path: Path, where: str) -> None:
    args = ["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out")]
    res = run_cli(*args)
    assert res.returncode == 2 and res.stdout == ""
    assert stderr_lines(res) == [f"error: {tmp_path / 'missing.pt'}: no such file or directory"], res.stderr
    res = run_cli(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert res.returncode == 2
    assert "Traceback (most recent call last)" in res.stderr and "CheckpointError" in res.stderr
    assert stderr_lines(res)[-1] == f"error: {tmp_path / 'missing.pt'}: no such file or directory"
    assert not (tmp_path / "out").exists()


def test_trt_subcommand_errors_take_the_same_path(tmp_path: Path) -> None:
    res = run_cli("check-trt", str(tmp_path / "missing.onnx"), "-v")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert stderr_lines(res) == [f"error: {tmp_path / 'missing.onnx'}: no such ONNX file"], res.stderr


def test_export_cli_unsupported_keys_name_the_families(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    ckpt = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, str(ckpt))
    res = run_cli("export", str(ckpt), "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    for fam in ("timm_vit", "open_clip", "hf_clip", "hf_siglip", "hf_dinov2"):
        assert fam in res.stderr
    assert "conv1.weight" in res.stderr  # the keys that did not match are named


def test_export_shows_its_steps_with_elapsed_time_and_eta_on_a_terminal(tmp_path: Path) -> None:
    """stderr is a real pseudo-terminal here: the bar counts the planned steps (loading + ``planned_steps``, 10 for
    these options) and ends with all of them done, so the plan matched the steps the export reported."""
    ckpt = tiny_hf_dinov2(tmp_path / "dinov2")
    master, slave = pty.openpty()
    chunks: List[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = {**os.environ, "COLUMNS": "200", "TERM": "xterm"}
    proc = subprocess.run([sys.executable, "-m", "exporter.cli", "export", str(ckpt), "--out", str(tmp_path / "out"),
                           "--r", "3", "--k", "4", "--batch", "2", "--summary-layer", "2", "--summary-dim", "8"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=slave, text=True, timeout=300, env=env)
    os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, screen
    assert "10/10" in screen and "ETA" in screen and "0:00:" in screen, screen  # done/total, elapsed, ETA
    assert "done" in screen
    assert "tokens per block" in proc.stdout  # the result table stays on stdout
    quiet = run_cli("export", str(ckpt), "--out", str(tmp_path / "out2"), "--r", "3", "--quiet")
    assert quiet.returncode == 0 and only_warnings(quiet)


def test_export_steps_are_log_records_with_verbose_off_a_terminal(tmp_path: Path) -> None:
    ckpt = tiny_hf_dinov2(tmp_path / "dinov2")
    res = run_cli("export", str(ckpt), "--r", "3", "--no-unmerged", "--out", str(tmp_path / "out"),
                  "--log-level", "INFO")
    assert res.returncode == 0, res.stderr
    steps = [line for line in stderr_lines(res) if " INFO exporter.cli: " in line]
    assert [s.split(": ", 1)[1] for s in steps[:2]] == ["loading dinov2", "preparing calibration images"]
    assert steps[-1].endswith("manifest.json") and len(steps) == 8, steps  # loading + planned_steps


def test_export_cli_argument_errors(tmp_path: Path) -> None:
    res = run_cli("export", "x.pt", "--out", str(tmp_path), "--batch", "0")
    assert res.returncode == 2 and "batch" in res.stderr
    res = run_cli("export", "x.pt", "--out", str(tmp_path), "--r", "2", "--target-tokens", "8")
    assert res.returncode == 2 and "not allowed with" in res.stderr
    ckpt = tiny_hf_dinov2(tmp_path / "d")
    res = run_cli("export", str(ckpt), "--out", str(tmp_path / "o"), "--k", "64")
    assert res.returncode == 2 and "K" in res.stderr and "Traceback" not in res.stderr
