"""`tokenline-export export` end to end on tiny checkpoints of each family, and its error cases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    assert "Traceback" not in res.stderr


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


def test_export_cli_argument_errors(tmp_path: Path) -> None:
    res = run_cli("export", "x.pt", "--out", str(tmp_path), "--batch", "0")
    assert res.returncode == 2 and "batch" in res.stderr
    res = run_cli("export", "x.pt", "--out", str(tmp_path), "--r", "2", "--target-tokens", "8")
    assert res.returncode == 2 and "not allowed with" in res.stderr
    ckpt = tiny_hf_dinov2(tmp_path / "d")
    res = run_cli("export", str(ckpt), "--out", str(tmp_path / "o"), "--k", "64")
    assert res.returncode == 2 and "K" in res.stderr and "Traceback" not in res.stderr
