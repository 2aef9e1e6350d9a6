"""Bad checkpoints get a clear CheckpointError naming what is wrong (and the supported families where useful)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.checkpoints import FAMILIES, CheckpointError, ConversionOptions, load_encoder

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden"
TIMM = GOLDEN / "timm_vit_cls.safetensors"
HEADS = ConversionOptions(num_heads=2)


def timm_state() -> dict:
    return load_file(str(TIMM))


def test_unsupported_keys_name_the_families_and_the_keys(tmp_path: Path) -> None:
    tensors = {"encoder.conv.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(4)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_encoder(tmp_path / "x.safetensors")
    msg = str(err.value)
    assert all(f in msg for f in FAMILIES) and "encoder.conv.weight" in msg


def test_unknown_extra_keys_are_an_unsupported_variant(tmp_path: Path) -> None:
    """A variant the converter does not understand (here: qk-norm) must fail, not convert into a wrong model."""
    sd = timm_state()
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    save_file(sd, str(tmp_path / "qknorm.safetensors"))
    with pytest.raises(CheckpointError, match=r"unsupported timm_vit variant.*blocks\.0\.attn\.q_norm\.weight"):
        load_encoder(tmp_path / "qknorm.safetensors", options=HEADS)


def test_tensors_of_unexpected_shape(tmp_path: Path) -> None:
    """Right names, wrong shapes (a linear patch embedding, a 1-D position table) still give a CheckpointError."""
    sd = timm_state()
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].reshape(32, -1)
    save_file(sd, str(tmp_path / "linear_patch.safetensors"))
    with pytest.raises(CheckpointError, match="do not fit|could not convert"):
        load_encoder(tmp_path / "linear_patch.safetensors", options=HEADS)
    sd = timm_state()
    sd["pos_embed"] = sd["pos_embed"][0, :, 0].contiguous()
    save_file(sd, str(tmp_path / "flat_pos.safetensors"))
    with pytest.raises(CheckpointError, match="do not fit|could not convert"):
        load_encoder(tmp_path / "flat_pos.safetensors", options=HEADS)


def test_missing_key_is_named(tmp_path: Path) -> None:
    sd = timm_state()
    del sd["blocks.1.mlp.fc2.bias"]
    save_file(sd, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.fc2\.bias"):
        load_encoder(tmp_path / "m.safetensors", options=HEADS)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".onnx"])
def test_truncated_files(tmp_path: Path, suffix: str) -> None:
    if suffix == ".safetensors":
        data = TIMM.read_bytes()
    elif suffix == ".pth":
        torch.save(timm_state(), tmp_path / "full.pth")
        data = (tmp_path / "full.pth").read_bytes()
    else:
        data = b"\x08\x07\x12\x04onnx" + bytes(range(256)) * 4  # starts like a ModelProto, then garbage
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt|truncated|initializers"):
        load_encoder(path)


def test_empty_file_and_unknown_extension(tmp_path: Path) -> None:
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_encoder(tmp_path / "e.safetensors")
    (tmp_path / "w.h5").write_bytes(b"\x89HDF")
    with pytest.raises(CheckpointError, match=r"unsupported file type '\.h5'"):
        load_encoder(tmp_path / "w.h5")
    with pytest.raises(CheckpointError, match="no such file"):
        load_encoder(tmp_path / "missing.safetensors")


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    torch.save({"model": {"w": torch.zeros(1)}, "cfg": Path("/x")}, tmp_path / "obj.pt")  # not weights-only
    with pytest.raises(CheckpointError, match="weights_only"):
        load_encoder(tmp_path / "obj.pt")


def test_wrong_family_forced_says_what_it_looks_like() -> None:
    with pytest.raises(CheckpointError) as err:
        load_encoder(TIMM, family="hf_clip")
    msg = str(err.value)
    assert "not a hf_clip checkpoint" in msg and "vision_model.embeddings.class_embedding" in msg
    assert "looks like timm_vit" in msg
    with pytest.raises(CheckpointError, match="unknown family 'clip'"):
        load_encoder(TIMM, family="clip")


def test_hf_weights_without_config_json(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=32, patch_size=8)
    transformers.Dinov2Model(cfg).save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    for path in (tmp_path, tmp_path / "model.safetensors"):
        with pytest.raises(CheckpointError, match="need their config.json"):
            load_encoder(path)


def test_directory_without_weights_and_bad_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="no weights found"):
        load_encoder(tmp_path)
    save_file(timm_state(), str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_encoder(tmp_path)


def test_non_finite_weights(tmp_path: Path) -> None:
    sd = timm_state()
    sd["blocks.0.norm1.weight"][3] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="non-finite"):
        load_encoder(tmp_path / "nan.safetensors", options=HEADS)


def test_heads_that_do_not_divide_the_width() -> None:
    with pytest.raises(CheckpointError, match="num_heads"):
        load_encoder(TIMM)  # width 32: the default head width 64 does not apply
    with pytest.raises(CheckpointError, match="num_heads"):
        load_encoder(TIMM, options=ConversionOptions(num_heads=3))


def test_bad_image_sizes() -> None:
    with pytest.raises(CheckpointError, match="positive"):
        load_encoder(TIMM, image_size=0, options=HEADS)
    with pytest.raises(CheckpointError, match="multiple of the patch"):
        load_encoder(TIMM, image_size=(40, 36), options=HEADS)
    with pytest.raises(CheckpointError, match="height, width"):
        load_encoder(TIMM, image_size=(1, 2, 3), options=HEADS)  # type: ignore[arg-type]


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="num_head"):
        ConversionOptions(num_head=2)  # type: ignore[call-arg]


def test_sharded_index_with_missing_shard(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="shards missing"):
        load_encoder(tmp_path)
