"""Convert Hugging Face CLIP, SigLIP and Dinov2 checkpoints (a directory with config.json and the weights).

The config gives heads, activation, LayerNorm epsilon, image size and the text tower's end-of-text id; keys
give every shape. Missing config entries take the transformers defaults of the model type (``HF_DEFAULTS``).
Hugging Face CLIP applies ``post_layernorm`` to the pooled [CLS] only; the ViT applies it to every token
(as open_clip does), which leaves the pooled embedding identical. Tokenizer files in the directory
(tokenizer.json and friends) are listed for the exporter to copy.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from exporter.checkpoints.base import (
    BlockLayout,
    CheckpointError,
    ConversionOptions,
    Converted,
    TokenizerInfo,
    Weights,
    heads_for,
    hf_act,
    map_blocks,
    patch_pos,
)
from exporter.checkpoints.readers import RawCheckpoint
from exporter.text import TextConfig
from exporter.vit import ViTConfig

CLIP_LAYOUT = BlockLayout(
    norm1="layer_norm1",
    norm2="layer_norm2",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    proj="self_attn.out_proj",
    fc1=("mlp.fc1",),
    fc2=("mlp.fc2",),
)
DINOV2_LAYOUT = BlockLayout(
    norm1="norm1",
    norm2="norm2",
    qkv=("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    proj="attention.output.dense",
    fc1=("mlp.fc1", "mlp.weights_in"),
    fc2=("mlp.fc2", "mlp.weights_out"),
    ls1="layer_scale1.lambda1",
    ls2="layer_scale2.lambda1",
)
# transformers >= 5 module names for Dinov2WithRegisters (checkpoints are saved in the layout above)
DINOV2_LAYOUT_V5 = BlockLayout(
    norm1="norm1",
    norm2="norm2",
    qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    proj="attention.o_proj",
    fc1=("mlp.fc1", "mlp.weights_in"),
    fc2=("mlp.fc2", "mlp.weights_out"),
    ls1="layer_scale1.lambda1",
    ls2="layer_scale2.lambda1",
)

# transformers' config defaults, for configs that leave entries out
HF_DEFAULTS: Dict[str, dict] = {
    "clip_vision": {"num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    "clip_text": {"num_attention_heads": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407,
                  "pad_token_id": 1},
    "siglip_vision": {"num_attention_heads": 12, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
    "siglip_text": {"num_attention_heads": 12, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                    "pad_token_id": 1},
    "dinov2": {"num_attention_heads": 12, "hidden_act": "gelu", "layer_norm_eps": 1e-6},
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
)
IGNORED = ("logit_scale", "logit_bias", "embeddings.mask_token", "vision_model.embeddings.position_ids",
           "text_model.embeddings.position_ids", "embeddings.position_ids")


def canonical_keys(raw: RawCheckpoint) -> None:
    """CLIPVisionModel / SiglipVisionModel save their tower without the ``vision_model.`` prefix that
    CLIPModel and *WithProjection use: put it back so that one converter reads both."""
    model_type = str((raw.config or {}).get("model_type", ""))
    if model_type.endswith("_vision_model") and not any(k.startswith("vision_model.") for k in raw.tensors):
        raw.tensors = {
            (k if k.startswith("visual_projection.") else "vision_model." + k): v for k, v in raw.tensors.items()
        }


def _preprocessing(preprocessor: Optional[dict]) -> Dict[str, Any]:
    """mean/std of a Hugging Face ``preprocessor_config.json`` (as ``Converted.preprocessing``)."""
    pre = preprocessor or {}
    return {ours: pre[theirs] for ours, theirs in (("mean", "image_mean"), ("std", "image_std")) if theirs in pre}


def _config(raw: RawCheckpoint, family: str) -> dict:
    if raw.config is None:
        raise CheckpointError(
            f"{raw.where}: {family} weights need their config.json (heads, activation, image size): pass the "
            f"Hugging Face model directory, or put config.json beside {raw.path.name}"
        )
    return raw.config


def _sub(config: dict, tower: str, defaults: str) -> dict:
    """The vision/text sub-config (or the config itself for a *VisionModel / *TextModel), over the defaults."""
    sub = config.get(f"{tower}_config") or config.get(f"{tower}_config_dict") or config
    return {**HF_DEFAULTS[defaults], **sub}


def _act(cfg: dict, opts: ConversionOptions, where: str):
    return opts.act or hf_act(cfg["hidden_act"], where)


def _image_size(raw: RawCheckpoint, vcfg: dict, pos_grid: int, patch: int,
                size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    if size:
        return size
    crop = (raw.preprocessor or {}).get("crop_size")
    if isinstance(crop, dict) and "height" in crop:
        return (int(crop["height"]), int(crop["width"]))
    if isinstance(crop, int):
        return (crop, crop)
    s = vcfg.get("image_size") or pos_grid * patch
    return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))


def _tokenizer(raw: RawCheckpoint, tcfg: TextConfig) -> TokenizerInfo:
    files = [raw.directory / f for f in TOKENIZER_FILES if (raw.directory / f).is_file()]
    notes = [] if (raw.directory / "tokenizer.json").is_file() else [
        f"no tokenizer.json in {raw.directory}: save the tokenizer there (tokenizer.save_pretrained) to ship it"
    ]
    return TokenizerInfo(kind="hf_tokenizer_json", files=files, context_length=tcfg.context_length,
                         vocab_size=tcfg.vocab_size, pad_id=tcfg.pad_id, notes=notes)


def _encoder(w: Weights, src: str, layout: BlockLayout) -> Tuple[dict, object, int]:
    depth = w.count(src + "{}." + layout.norm1 + ".weight")
    state, info = map_blocks(w, src + "{}.", depth, layout)
    return state, info, depth


def _text(w: Weights, tcfg: dict, opts: ConversionOptions, *, causal: bool, siglip: bool) -> Tuple[TextConfig, dict]:
    emb = w.take("text_model.embeddings.token_embedding.weight")
    pos = w.take("text_model.embeddings.position_embedding.weight")
    state, info, depth = _encoder(w, "text_model.encoder.layers.", CLIP_LAYOUT)
    state.update({
        "token_embedding.weight": emb,
        "pos_embed": pos,
        "norm.weight": w.take("text_model.final_layer_norm.weight"),
        "norm.bias": w.take("text_model.final_layer_norm.bias"),
    })
    if siglip:
        state["proj.weight"], state["proj.bias"] = w.take("text_model.head.weight"), w.take("text_model.head.bias")
        pool, eos = "last", None
    else:
        proj = w.optional("text_projection.weight")  # CLIPModel / CLIPTextModelWithProjection
        if proj is not None:
            state["proj.weight"] = proj
        eos = tcfg.get("eos_token_id")
        pool = "argmax" if eos == 2 else "eos"  # transformers keeps argmax for configs from before eos was fixed
    width = emb.shape[1]
    cfg = TextConfig(
        vocab_size=emb.shape[0],
        context_length=pos.shape[0],
        width=width,
        depth=depth,
        num_heads=heads_for(width, tcfg["num_attention_heads"], opts.text_num_heads, w.where),
        mlp_hidden=info.mlp_hidden,
        act=_act(tcfg, opts, w.where),
        ln_eps=opts.ln_eps or tcfg["layer_norm_eps"],
        causal=causal,
        pool=pool,  # type: ignore[arg-type]
        eos_id=eos if pool == "eos" else None,
        proj_dim=state["proj.weight"].shape[0] if "proj.weight" in state else None,
        proj_bias="proj.bias" in state,
        pad_id=int(tcfg.get("pad_token_id") or 0),
    )
    return cfg, state


def convert_clip(w: Weights, raw: RawCheckpoint, opts: ConversionOptions,
                 size: Optional[Tuple[int, int]]) -> Converted:
    config = _config(raw, "hf_clip")
    vcfg = _sub(config, "vision", "clip_vision")
    pw = w.take("vision_model.embeddings.patch_embedding.weight")
    dim, patch = pw.shape[0], pw.shape[-1]
    pos = w.take("vision_model.embeddings.position_embedding.weight")[None]
    state, info, depth = _encoder(w, "vision_model.encoder.layers.", CLIP_LAYOUT)
    proj = w.optional("visual_projection.weight")
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    cfg = ViTConfig(
        image_size=_image_size(raw, vcfg, grid, patch, size),
        patch_size=patch, embed_dim=dim, depth=depth,
        num_heads=heads_for(dim, vcfg["num_attention_heads"], opts.num_heads, w.where),
        mlp_hidden=info.mlp_hidden, act=_act(vcfg, opts, w.where),
        ln_eps=opts.ln_eps or vcfg["layer_norm_eps"], qkv_bias=info.qkv_bias, patch_bias=False,
        pre_norm=True, final_norm=True, pool="cls", proj_dim=None if proj is None else proj.shape[0],
    )
    cls = w.take("vision_model.embeddings.class_embedding").reshape(1, 1, dim)
    state.update({
        "patch_embed.weight": pw,
        "prefix": cls + pos[:, :1],
        "pos_embed": patch_pos(pos[:, 1:], cfg, w.where),
        "norm_pre.weight": w.take("vision_model.pre_layrnorm.weight"),
        "norm_pre.bias": w.take("vision_model.pre_layrnorm.bias"),
        "norm.weight": w.take("vision_model.post_layernorm.weight"),
        "norm.bias": w.take("vision_model.post_layernorm.bias"),
    })
    if proj is not None:
        state["proj"] = proj.t().contiguous()
    out = Converted(cfg=cfg, state=state)
    if w.has("text_model.embeddings.token_embedding.weight"):
        tcfg = _sub(config, "text", "clip_text")
        out.text_cfg, out.text_state = _text(w, tcfg, opts, causal=True, siglip=False)
        out.tokenizer = _tokenizer(raw, out.text_cfg)
        out.notes += out.tokenizer.notes
    w.ignore(IGNORED)
    out.preprocessing = _preprocessing(raw.preprocessor)
    return out


def convert_siglip(w: Weights, raw: RawCheckpoint, opts: ConversionOptions,
                   size: Optional[Tuple[int, int]]) -> Converted:
    config = _config(raw, "hf_siglip")
    vcfg = _sub(config, "vision", "siglip_vision")
    pw = w.take("vision_model.embeddings.patch_embedding.weight")
    dim, patch = pw.shape[0], pw.shape[-1]
    pos = w.take("vision_model.embeddings.position_embedding.weight")[None]
    state, info, depth = _encoder(w, "vision_model.encoder.layers.", CLIP_LAYOUT)
    heads = heads_for(dim, vcfg["num_attention_heads"], opts.num_heads, w.where)
    has_head = w.has("vision_model.head.probe")
    notes: List[str] = []
    cfg = ViTConfig(
        image_size=_image_size(raw, vcfg, int(round(pos.shape[1] ** 0.5)), patch, size),
        patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_hidden=info.mlp_hidden,
        act=_act(vcfg, opts, w.where), ln_eps=opts.ln_eps or vcfg["layer_norm_eps"], qkv_bias=info.qkv_bias,
        patch_bias=True, class_token=False, final_norm=True, pool="map" if has_head else "mean",
        map_heads=heads if has_head else 0,
    )
    state.update({
        "patch_embed.weight": pw,
        "patch_embed.bias": w.take("vision_model.embeddings.patch_embedding.bias"),
        "pos_embed": patch_pos(pos, cfg, w.where),
        "norm.weight": w.take("vision_model.post_layernorm.weight"),
        "norm.bias": w.take("vision_model.post_layernorm.bias"),
    })
    if has_head:
        h = "vision_model.head."
        in_w, in_b = w.take(h + "attention.in_proj_weight"), w.take(h + "attention.in_proj_bias")
        state.update({
            "map_head.probe": w.take(h + "probe"),
            "map_head.q.weight": in_w[:dim], "map_head.q.bias": in_b[:dim],
            "map_head.kv.weight": in_w[dim:], "map_head.kv.bias": in_b[dim:],
            "map_head.proj.weight": w.take(h + "attention.out_proj.weight"),
            "map_head.proj.bias": w.take(h + "attention.out_proj.bias"),
            "map_head.norm.weight": w.take(h + "layernorm.weight"),
            "map_head.norm.bias": w.take(h + "layernorm.bias"),
        })
        for fc in ("fc1", "fc2"):
            state[f"map_head.mlp.{fc}.weight"] = w.take(h + f"mlp.{fc}.weight")
            state[f"map_head.mlp.{fc}.bias"] = w.take(h + f"mlp.{fc}.bias")
        cfg.map_mlp_hidden = state["map_head.mlp.fc1.weight"].shape[0]
    else:
        notes.append("no attention-pool head (vision_use_head=False): pooled = mean of the patch tokens")
    out = Converted(cfg=cfg, state=state, notes=notes)
    if w.has("text_model.embeddings.token_embedding.weight"):
        tcfg = _sub(config, "text", "siglip_text")
        out.text_cfg, out.text_state = _text(w, tcfg, opts, causal=False, siglip=True)
        out.tokenizer = _tokenizer(raw, out.text_cfg)
        out.notes += out.tokenizer.notes
    w.ignore(IGNORED)
    out.preprocessing = _preprocessing(raw.preprocessor)
    return out


def convert_dinov2(w: Weights, raw: RawCheckpoint, opts: ConversionOptions, size: Optional[Tuple[int, int]],
                   config: Optional[dict] = None, family: str = "hf_dinov2") -> Converted:
    vcfg = {**HF_DEFAULTS["dinov2"], **(config or _config(raw, family))}
    pw = w.take("embeddings.patch_embeddings.projection.weight")
    dim, patch = pw.shape[0], pw.shape[-1]
    pos = w.take("embeddings.position_embeddings")
    layout = DINOV2_LAYOUT if w.has("encoder.layer.0.attention.attention.query.weight") else DINOV2_LAYOUT_V5
    state, info, depth = _encoder(w, "encoder.layer.", layout)
    regs = w.optional("embeddings.register_tokens")
    cls = w.take("embeddings.cls_token")
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    cfg = ViTConfig(
        image_size=_image_size(raw, vcfg, grid, patch, size),
        patch_size=patch, embed_dim=dim, depth=depth,
        num_heads=heads_for(dim, vcfg["num_attention_heads"], opts.num_heads, w.where),
        mlp_hidden=info.mlp_hidden, mlp_type="swiglu" if info.swiglu else "mlp",
        act=_act(vcfg, opts, w.where), ln_eps=opts.ln_eps or vcfg["layer_norm_eps"], qkv_bias=info.qkv_bias,
        patch_bias=True, layer_scale=info.layer_scale, class_token=True,
        num_registers=0 if regs is None else regs.shape[1], final_norm=True, pool="cls",
    )
    prefix = cls + pos[:, :1]
    if regs is not None:  # registers sit after [CLS] and carry no position embedding
        prefix = torch.cat([prefix, regs], dim=1)
    state.update({
        "patch_embed.weight": pw,
        "patch_embed.bias": w.take("embeddings.patch_embeddings.projection.bias"),
        "prefix": prefix,
        # transformers' Dinov2WithRegisters interpolates with the antialiased kernel, Dinov2 without
        "pos_embed": patch_pos(pos[:, 1:], cfg, w.where, antialias=vcfg.get("model_type") == "dinov2_with_registers"),
        "norm.weight": w.take("layernorm.weight"),
        "norm.bias": w.take("layernorm.bias"),
    })
    w.ignore(IGNORED)
    return Converted(cfg=cfg, state=state, preprocessing=_preprocessing(raw.preprocessor))
