"""Convert open_clip CLIP checkpoints (ViT image tower ``visual.*`` and the text tower) without importing open_clip.

Keys give the shapes; the config gives what keys cannot: OpenAI-trained weights use QuickGELU (``act=
"quick_gelu"``; open_clip's ``-quickgelu`` model names), heads default to width/64 (open_clip's head width).
An ``open_clip_config.json`` beside the weights (the Hugging Face hub layout) supplies quick_gelu, heads and
mean/std; explicit ``ConversionOptions`` win over it.
Text pooling is the argmax of the token ids (the end-of-text token has the largest id), causal attention,
``x @ text_projection``. The tokenizer is open_clip's BPE vocabulary ``bpe_simple_vocab_16e6.txt.gz``: it is
taken from beside the checkpoint or from an installed open_clip package (found without importing it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import List, Optional, Tuple

from exporter.checkpoints.base import (
    BlockLayout,
    CheckpointError,
    ConversionOptions,
    Converted,
    TokenizerInfo,
    Weights,
    heads_for,
    map_blocks,
    patch_pos,
)
from exporter.checkpoints.readers import RawCheckpoint
from exporter.text import TextConfig
from exporter.vit import ViTConfig

LAYOUT = BlockLayout(
    norm1="ln_1",
    norm2="ln_2",
    qkv=("attn.in_proj_weight", "attn.in_proj_bias"),
    proj="attn.out_proj",
    fc1=("mlp.c_fc",),
    fc2=("mlp.c_proj",),
    ls1="ls_1.gamma",
    ls2="ls_2.gamma",
)
BPE_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
IGNORED = ("logit_scale", "logit_bias", "attn_mask")


def find_bpe_vocab(directory: Path) -> Optional[Path]:
    """open_clip's BPE vocabulary: beside the checkpoint, else inside an installed open_clip package."""
    if (directory / BPE_VOCAB).is_file():
        return directory / BPE_VOCAB
    try:
        spec = importlib.util.find_spec("open_clip")  # locates the package without executing it
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / BPE_VOCAB
        if path.is_file():
            return path
    return None


def _vision(w: Weights, opts: ConversionOptions, size: Optional[Tuple[int, int]]) -> Tuple[ViTConfig, dict]:
    pw = w.take("visual.conv1.weight")
    dim, patch = pw.shape[0], pw.shape[-1]
    depth = w.count("visual.transformer.resblocks.{}.ln_1.weight")
    state, info = map_blocks(w, "visual.transformer.resblocks.{}.", depth, LAYOUT)
    pos = w.take("visual.positional_embedding")
    if pos.ndim == 2:
        pos = pos[None]
    cls = w.take("visual.class_embedding").reshape(1, 1, dim)
    proj = w.optional("visual.proj")
    cfg = ViTConfig(
        image_size=(0, 0),
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads_for(dim, None, opts.num_heads, w.where),
        mlp_hidden=info.mlp_hidden,
        act=opts.act or "gelu",
        ln_eps=opts.ln_eps or 1e-5,
        qkv_bias=info.qkv_bias,
        patch_bias=False,
        layer_scale=info.layer_scale,
        pre_norm=True,
        final_norm=True,
        pool="cls",
        proj_dim=None if proj is None else proj.shape[1],
    )
    grid_n = pos.shape[1] - 1
    side = int(round(grid_n**0.5))
    cfg.image_size = size or (side * patch, side * patch)
    state.update(
        {
            "patch_embed.weight": pw,
            "prefix": cls + pos[:, :1],
            "pos_embed": patch_pos(pos[:, 1:], cfg, w.where),
            "norm_pre.weight": w.take("visual.ln_pre.weight"),
            "norm_pre.bias": w.take("visual.ln_pre.bias"),
            "norm.weight": w.take("visual.ln_post.weight"),
            "norm.bias": w.take("visual.ln_post.bias"),
        }
    )
    if proj is not None:
        state["proj"] = proj
    return cfg, state


def _text(w: Weights, opts: ConversionOptions) -> Tuple[TextConfig, dict]:
    emb = w.take("token_embedding.weight")
    vocab, width = emb.shape
    pos = w.take("positional_embedding")
    depth = w.count("transformer.resblocks.{}.ln_1.weight")
    state, info = map_blocks(w, "transformer.resblocks.{}.", depth, LAYOUT)
    if info.swiglu or not info.qkv_bias:
        raise CheckpointError(f"{w.where}: unsupported open_clip text tower (SwiGLU or no qkv bias)")
    state.update(
        {
            "token_embedding.weight": emb,
            "pos_embed": pos,
            "norm.weight": w.take("ln_final.weight"),
            "norm.bias": w.take("ln_final.bias"),
        }
    )
    proj_bias = False
    if w.has("text_projection.weight"):  # nn.Linear projection (proj_type 'linear')
        state["proj.weight"] = w.take("text_projection.weight")
        b = w.optional("text_projection.bias")
        if b is not None:
            state["proj.bias"], proj_bias = b, True
        proj_dim = state["proj.weight"].shape[0]
    else:
        proj = w.take("text_projection")
        state["proj.weight"] = proj.t().contiguous()
        proj_dim = proj.shape[1]
    cfg = TextConfig(
        vocab_size=vocab,
        context_length=pos.shape[0],
        width=width,
        depth=depth,
        num_heads=heads_for(width, None, opts.text_num_heads, w.where),
        mlp_hidden=info.mlp_hidden,
        act=opts.act or "gelu",
        ln_eps=opts.ln_eps or 1e-5,
        causal=True,
        layer_scale=info.layer_scale,
        pool="argmax",
        proj_dim=proj_dim,
        proj_bias=proj_bias,
        pad_id=0,
    )
    return cfg, state


def options_from_config(model_cfg: dict, opts: ConversionOptions, vision_width: int) -> ConversionOptions:
    """Fill the options open_clip_config.json answers (quick_gelu, heads), keeping explicit ones."""
    vision, text = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    head_width = int(vision.get("head_width", 64))
    filled = {
        "act": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        "num_heads": vision_width // head_width if vision_width % head_width == 0 else None,
        "text_num_heads": text.get("heads"),
    }
    given = opts.model_dump(exclude_none=True)
    return ConversionOptions(**{**{k: v for k, v in filled.items() if v is not None}, **given})


def convert(w: Weights, raw: RawCheckpoint, opts: ConversionOptions, size: Optional[Tuple[int, int]]) -> Converted:
    notes: List[str] = []
    model_cfg = (raw.open_clip_config or {}).get("model_cfg")
    if model_cfg:
        opts = options_from_config(model_cfg, opts, w.tensors["visual.conv1.weight"].shape[0])
        notes.append(f"open_clip_config.json: act {opts.act}, heads {opts.num_heads}/{opts.text_num_heads}")
    elif opts.act is None:
        notes.append("activation: GELU (open_clip default); OpenAI-trained weights need act='quick_gelu'")
    cfg, state = _vision(w, opts, size)
    text_cfg = text_state = tokenizer = None
    if w.has("token_embedding.weight"):
        text_cfg, text_state = _text(w, opts)
        vocab = find_bpe_vocab(raw.directory)
        tok_notes = [] if vocab else [
            f"open_clip's BPE vocabulary ({BPE_VOCAB}) was not found beside the checkpoint nor in an installed "
            "open_clip package: copy it next to the checkpoint to ship the tokenizer"
        ]
        tokenizer = TokenizerInfo(
            kind="open_clip_bpe",
            files=[vocab] if vocab else [],
            context_length=text_cfg.context_length,
            vocab_size=text_cfg.vocab_size,
            pad_id=0,
            notes=tok_notes,
        )
        notes += tok_notes
    w.ignore(IGNORED)
    pre = (raw.open_clip_config or {}).get("preprocess_cfg") or {}
    return Converted(cfg=cfg, state=state, text_cfg=text_cfg, text_state=text_state, tokenizer=tokenizer, notes=notes,
                     preprocessing={"mean": pre["mean"], "std": pre["std"]} if "mean" in pre else {})
