"""Parity of converted timm and open_clip checkpoints with outputs the real libraries computed (golden fixtures).

The fixtures come from ``tests/exporter/fixtures/make_golden.py`` (run in a separate venv: timm and open_clip need a
torchvision that cannot import beside this venv's torch).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from exporter.checkpoints import ConversionOptions, load_encoder
from exporter.checkpoints.openclip import BPE_VOCAB
from exporter.text import TEXT_INPUT, TEXT_OUTPUT, export_text_onnx

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden"
INDEX = json.loads((GOLDEN / "golden.json").read_text())
TOL = 1e-4

EXPECTED = {  # what each fixture must convert into
    "timm_vit_cls": dict(pool="cls", num_prefix=1, layer_scale=False, mlp_type="mlp"),
    "timm_deit_distilled": dict(pool="cls_dist", num_prefix=2, layer_scale=False, mlp_type="mlp"),
    "timm_dinov2_reg": dict(pool="cls", num_prefix=3, layer_scale=True, mlp_type="swiglu"),
    "timm_vit_avg": dict(pool="mean", num_prefix=0, layer_scale=False, mlp_type="mlp"),
    "timm_vit_map": dict(pool="map", num_prefix=0, layer_scale=False, mlp_type="mlp"),
    "open_clip": dict(pool="cls", num_prefix=1, layer_scale=False, mlp_type="mlp"),
}


def rel_err(ours: torch.Tensor, ref: np.ndarray) -> float:
    r = torch.from_numpy(ref)
    return float((ours - r).abs().max() / r.abs().max())


def load(name: str, **overrides):
    meta = INDEX[name]
    opts = ConversionOptions(**{**meta["options"], **overrides})
    return load_encoder(GOLDEN / f"{name}.safetensors", options=opts), np.load(GOLDEN / f"{name}.npz")


def test_fixtures_cover_every_case_and_stay_small() -> None:
    assert set(INDEX) == set(EXPECTED)
    assert sum(p.stat().st_size for p in GOLDEN.iterdir()) < 1_000_000


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_image_tower_parity(name: str) -> None:
    enc, ref = load(name)
    assert enc.family == INDEX[name]["family"]
    cfg = enc.vit.cfg
    for key, value in EXPECTED[name].items():
        assert getattr(cfg, key) == value, key
    with torch.no_grad():
        pooled, tokens = enc.vit.reference_outputs(torch.from_numpy(ref["pixels"]))
    assert tokens.shape == ref["tokens"].shape
    assert rel_err(pooled, ref["pooled"]) < TOL
    assert rel_err(tokens, ref["tokens"]) < TOL


def test_golden_open_clip_text_parity_and_onnx(tmp_path: Path) -> None:
    enc, ref = load("open_clip")
    ids = torch.from_numpy(ref["input_ids"])
    assert enc.text is not None and enc.text.cfg.pool == "argmax" and enc.text.cfg.causal
    with torch.no_grad():
        text = enc.text.embed(ids)
        unit = enc.text(ids)
    assert rel_err(text, ref["text"]) < TOL
    info = export_text_onnx(enc.text, tmp_path / "t.onnx")
    assert info["tokenizer"] == "open_clip_bpe" and info["context_length"] == 12 and info["vocab_size"] == 64
    assert info["pad_id"] == 0
    sess = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run([TEXT_OUTPUT], {TEXT_INPUT: ids.numpy()})[0], unit.numpy(), atol=1e-5)
    tok = enc.tokenizer
    assert tok is not None and tok.kind == "open_clip_bpe" and tok.context_length == 12 and tok.vocab_size == 64
    assert all(f.name == BPE_VOCAB for f in tok.files)


def test_open_clip_quick_gelu_is_an_explicit_option() -> None:
    """The keys cannot tell QuickGELU from GELU: without the option the conversion is measurably different."""
    enc, ref = load("open_clip", act=None)
    assert enc.vit.cfg.act == "gelu" and any("quick_gelu" in n for n in enc.notes)
    with torch.no_grad():
        pooled, _ = enc.vit.reference_outputs(torch.from_numpy(ref["pixels"]))
    assert rel_err(pooled, ref["pooled"]) > 1e-3
    # the CLI's --quick-gelu shorthand
    enc = load_encoder(GOLDEN / "open_clip.safetensors", quick_gelu=True,
                       options=ConversionOptions(num_heads=2, text_num_heads=2))
    assert enc.vit.cfg.act == "quick_gelu" and enc.text.cfg.act == "quick_gelu"


def test_open_clip_tokenizer_vocab_beside_checkpoint_is_shipped(tmp_path: Path) -> None:
    (tmp_path / "m.safetensors").write_bytes((GOLDEN / "open_clip.safetensors").read_bytes())
    (tmp_path / BPE_VOCAB).write_bytes(b"placeholder: only its presence is checked here")
    enc = load_encoder(tmp_path / "m.safetensors", options=ConversionOptions(**INDEX["open_clip"]["options"]))
    assert enc.tokenizer is not None and enc.tokenizer.files == [tmp_path / BPE_VOCAB] and not enc.tokenizer.notes


def test_torch_pickle_with_state_dict_wrapper_loads_the_same(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(GOLDEN / "timm_vit_cls.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ckpt.pth")
    enc = load_encoder(tmp_path / "ckpt.pth", options=ConversionOptions(num_heads=2))
    _, ref = load("timm_vit_cls")
    with torch.no_grad():
        pooled, _ = enc.vit.reference_outputs(torch.from_numpy(ref["pixels"]))
    assert rel_err(pooled, ref["pooled"]) < TOL


def test_image_size_resamples_timm_positions() -> None:
    enc = load_encoder(GOLDEN / "timm_vit_cls.safetensors", image_size=48, options=ConversionOptions(num_heads=2))
    assert enc.vit.cfg.grid == (6, 6) and enc.vit.pos_embed.shape == (1, 36, 32)
    with torch.no_grad():
        g, tokens, footprint, patch_mean = enc.vit(torch.randn(1, 3, 48, 48))
    assert torch.isfinite(g).all() and torch.allclose(g.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_open_clip_config_json_supplies_quick_gelu_heads_and_normalization(tmp_path: Path) -> None:
    """The Hugging Face hub layout of open_clip: open_clip_config.json answers what the keys cannot."""
    (tmp_path / "open_clip_model.safetensors").write_bytes((GOLDEN / "open_clip.safetensors").read_bytes())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 24, "quick_gelu": True, "vision_cfg": {"width": 32, "head_width": 16},
                      "text_cfg": {"width": 32, "heads": 2}},
        "preprocess_cfg": {"mean": [0.4, 0.4, 0.4], "std": [0.3, 0.3, 0.3]},
    }))
    enc = load_encoder(tmp_path)  # a directory, no options
    _, ref = load("open_clip")
    assert enc.vit.cfg.act == "quick_gelu" and enc.vit.cfg.num_heads == 2 and enc.text.cfg.num_heads == 2
    assert enc.mean == (0.4, 0.4, 0.4) and enc.std == (0.3, 0.3, 0.3)
    with torch.no_grad():
        pooled, _ = enc.vit.reference_outputs(torch.from_numpy(ref["pixels"]))
        text = enc.text.embed(torch.from_numpy(ref["input_ids"]))
    assert rel_err(pooled, ref["pooled"]) < TOL and rel_err(text, ref["text"]) < TOL


def test_timm_hub_config_supplies_input_size_and_normalization(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes((GOLDEN / "timm_vit_cls.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch8_32.test",
        "pretrained_cfg": {"input_size": [3, 48, 48], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                           "interpolation": "bilinear"},
    }))
    enc = load_encoder(tmp_path, options=ConversionOptions(num_heads=2))
    assert enc.family == "timm_vit" and enc.vit.cfg.image_size == (48, 48)
    assert (enc.mean, enc.std, enc.interpolation) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    assert load_encoder(tmp_path, image_size=32, options=ConversionOptions(num_heads=2)).vit.cfg.image_size == (32, 32)
