"""Parity of converted Hugging Face CLIP / SigLIP / Dinov2 checkpoints with transformers, live, on tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

transformers = pytest.importorskip("transformers")

from exporter.checkpoints import load_encoder  # noqa: E402
from exporter.text import TEXT_INPUT, TEXT_OUTPUT, export_text_onnx  # noqa: E402

TOL = 1e-4
VISION = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3, vocab_size=99,
            max_position_embeddings=10)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random-init weights are too tame (unit norms, zero biases): perturb every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def pixels(size: int = 32, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def token_ids(eos: int, lengths=(3, 7, 10), ctx: int = 10, pad: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    ids = torch.full((len(lengths), ctx), pad, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, : n - 1] = torch.randint(3, 90, (n - 1,), generator=g)
        ids[row, n - 1] = eos
    return ids


def save(model, tmp_path: Path) -> Path:
    out = tmp_path / "hf"
    model.save_pretrained(out)
    return out


def test_hf_clip_vision_and_text_match_transformers(tmp_path: Path) -> None:
    cfg = transformers.CLIPConfig(
        vision_config=VISION, text_config={**TEXT, "eos_token_id": 98, "bos_token_id": 97, "pad_token_id": 0},
        projection_dim=24,
    )
    model = perturb(transformers.CLIPModel(cfg))
    enc = load_encoder(save(model, tmp_path))
    assert enc.family == "hf_clip" and enc.vit.cfg.act == "quick_gelu" and enc.vit.cfg.num_heads == 4
    x = pixels()
    ids = token_ids(eos=98)
    with torch.no_grad():
        vis = model.vision_model(pixel_values=x)
        ref_pooled = model.visual_projection(vis.pooler_output)
        ref_tokens = model.vision_model.post_layernorm(vis.last_hidden_state)
        ref_text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        pooled, tokens = enc.vit.reference_outputs(x)
        text = enc.text.embed(ids)
        text_unit = enc.text(ids)
    assert rel_err(pooled, ref_pooled) < TOL
    assert rel_err(tokens, ref_tokens) < TOL
    assert enc.text.cfg.pool == "eos" and enc.text.cfg.causal
    assert rel_err(text, ref_text) < TOL
    assert torch.allclose(text_unit.norm(dim=-1), torch.ones(3), atol=1e-5)

    # the exported text ONNX gives the same unit-norm embeddings in ONNX Runtime, at another batch size
    info = export_text_onnx(enc.text, tmp_path / "text.onnx")
    assert info["tokenizer"] == "hf_tokenizer_json" and info["tokenizer_files"] == []  # none saved in the dir
    assert (info["context_length"], info["vocab_size"], info["pad_id"]) == (10, 99, 0)
    sess = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [TEXT_INPUT] and sess.get_outputs()[0].name == TEXT_OUTPUT
    got = sess.run([TEXT_OUTPUT], {TEXT_INPUT: ids.numpy()})[0]
    np.testing.assert_allclose(got, text_unit.numpy(), atol=1e-5)
    got1 = sess.run([TEXT_OUTPUT], {TEXT_INPUT: ids[:1].numpy()})[0]
    np.testing.assert_allclose(got1, text_unit[:1].numpy(), atol=1e-5)


def test_hf_clip_legacy_eos_uses_argmax_pooling(tmp_path: Path) -> None:
    """Configs with eos_token_id == 2 (before transformers fixed it) pool at the largest token id."""
    cfg = transformers.CLIPTextConfig(**TEXT, eos_token_id=2)
    vision = transformers.CLIPVisionConfig(**VISION)
    model = perturb(transformers.CLIPModel(transformers.CLIPConfig(text_config=cfg.to_dict(),
                                                                    vision_config=vision.to_dict(),
                                                                    projection_dim=16)))
    enc = load_encoder(save(model, tmp_path), family="hf_clip")
    ids = token_ids(eos=98)
    with torch.no_grad():
        ref = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        ours = enc.text.embed(ids)
    assert enc.text.cfg.pool == "argmax"
    assert rel_err(ours, ref) < TOL


def test_hf_clip_vision_model_without_projection(tmp_path: Path) -> None:
    model = perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION, hidden_act="gelu")))
    enc = load_encoder(save(model, tmp_path))
    assert enc.text is None and enc.vit.cfg.proj_dim is None and enc.vit.cfg.act == "gelu"
    x = pixels()
    with torch.no_grad():
        ref = model(pixel_values=x).pooler_output
        pooled, _ = enc.vit.reference_outputs(x)
    assert rel_err(pooled, ref) < TOL


def test_hf_siglip_vision_and_text_match_transformers(tmp_path: Path) -> None:
    cfg = transformers.SiglipConfig(vision_config=VISION, text_config={**TEXT, "projection_size": 40})
    model = perturb(transformers.SiglipModel(cfg))
    enc = load_encoder(save(model, tmp_path))
    assert enc.family == "hf_siglip" and enc.vit.cfg.pool == "map" and enc.vit.cfg.num_prefix == 0
    assert enc.mean == (0.5, 0.5, 0.5) and enc.resize == "resize"
    x = pixels()
    ids = token_ids(eos=98, pad=1)  # SigLIP pads to the full length (pad id 1); pooled = last position
    with torch.no_grad():
        vis = model.vision_model(pixel_values=x)
        pooled, tokens = enc.vit.reference_outputs(x)
        ref_text = model.text_model(input_ids=ids).pooler_output
        text = enc.text.embed(ids)
    assert rel_err(pooled, vis.pooler_output) < TOL
    assert rel_err(tokens, vis.last_hidden_state) < TOL  # SigLIP's post_layernorm applies to all tokens
    assert not enc.text.cfg.causal and enc.text.cfg.pool == "last" and enc.text.cfg.proj_bias
    assert rel_err(text, ref_text) < TOL


@pytest.mark.parametrize("swiglu", [False, True])
def test_hf_dinov2_matches_transformers(tmp_path: Path, swiglu: bool) -> None:
    model = perturb(transformers.Dinov2Model(transformers.Dinov2Config(**VISION, use_swiglu_ffn=swiglu)))
    enc = load_encoder(save(model, tmp_path))
    assert enc.family == "hf_dinov2" and enc.vit.cfg.layer_scale
    assert enc.vit.cfg.mlp_type == ("swiglu" if swiglu else "mlp")
    x = pixels()
    with torch.no_grad():
        out = model(pixel_values=x)
        pooled, tokens = enc.vit.reference_outputs(x)
    assert rel_err(pooled, out.pooler_output) < TOL
    assert rel_err(tokens, out.last_hidden_state) < TOL


def test_hf_dinov2_registers_and_resampled_positions(tmp_path: Path) -> None:
    """Registers sit after [CLS] without position; at another input size the position embeddings are
    resampled the way transformers interpolates them."""
    cfg = transformers.Dinov2WithRegistersConfig(**VISION, num_register_tokens=3)
    model = perturb(transformers.Dinov2WithRegistersModel(cfg))
    path = save(model, tmp_path)
    for size in (32, 48):
        enc = load_encoder(path, image_size=size)
        assert enc.vit.cfg.num_registers == 3 and enc.vit.cfg.grid == (size // 8, size // 8)
        x = pixels(size)
        with torch.no_grad():
            out = model(pixel_values=x)
            pooled, tokens = enc.vit.reference_outputs(x)
        assert tokens.shape == out.last_hidden_state.shape
        assert rel_err(pooled, out.pooler_output) < TOL
        assert rel_err(tokens, out.last_hidden_state) < TOL


def test_hf_tokenizer_files_are_listed_for_copying(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = perturb(transformers.CLIPModel(transformers.CLIPConfig(vision_config=VISION, text_config=TEXT)))
    path = save(model, tmp_path)
    enc = load_encoder(path)
    assert enc.tokenizer is not None and enc.tokenizer.files == [] and enc.tokenizer.notes  # nothing to ship yet
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "steel": 1, "scratch": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    enc = load_encoder(path)
    assert enc.tokenizer.kind == "hf_tokenizer_json" and enc.text.tokenizer is enc.tokenizer
    assert enc.tokenizer.files == [path / "tokenizer.json"] and not enc.tokenizer.notes
    assert enc.tokenizer.context_length == 10 and enc.tokenizer.vocab_size == 99 and enc.tokenizer.pad_id == 1


def test_preprocessor_config_sets_size_and_normalization(tmp_path: Path) -> None:
    import json

    model = perturb(transformers.Dinov2Model(transformers.Dinov2Config(**VISION)))
    path = save(model, tmp_path)
    (path / "preprocessor_config.json").write_text(
        json.dumps({"crop_size": {"height": 40, "width": 40}, "image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]})
    )
    enc = load_encoder(path)
    assert enc.vit.cfg.image_size == (40, 40) and enc.mean == (0.1, 0.2, 0.3) and enc.std == (1, 2, 3)
    assert len(enc.source_sha256) == 64
