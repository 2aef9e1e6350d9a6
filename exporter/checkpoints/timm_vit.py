"""Convert timm VisionTransformer checkpoints (ViT, DeiT distilled, DINOv2-style with registers, avg/map pool).

Handled from the keys alone: ``cls_token`` / ``dist_token`` / ``reg_token`` prefix tokens; position embeddings
with the prefix tokens (``pos_embed`` length = prefix + grid) or without (``no_embed_class``: length = grid);
layer scale ``ls1.gamma``; packed SwiGLU (``fc1`` twice as wide as ``fc2``'s input, SiLU-gated first half, as
timm's SwiGLUPacked); ``norm_pre``; ``fc_norm`` (avg pool); ``attn_pool`` (map head). Pooling is timm's
pre-logits feature: [CLS], the mean of [CLS] and dist for DeiT distilled, the patch mean for avg models.
Not in the keys: heads (``num_heads``, default width/64) and GELU vs. other activations (``act``).
A timm hub ``config.json`` (``architecture`` + ``pretrained_cfg``) beside the weights supplies the trained
input size, mean/std and interpolation (e.g. the augreg models' 0.5/0.5 normalization).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from exporter.checkpoints.base import (
    BlockLayout,
    CheckpointError,
    ConversionOptions,
    Converted,
    Weights,
    heads_for,
    map_blocks,
    patch_pos,
)
from exporter.checkpoints.readers import RawCheckpoint
from exporter.vit import ViTConfig

LAYOUT = BlockLayout(
    norm1="norm1",
    norm2="norm2",
    qkv=("attn.qkv.weight", "attn.qkv.bias"),
    proj="attn.proj",
    fc1=("mlp.fc1",),
    fc2=("mlp.fc2",),
    ls1="ls1.gamma",
    ls2="ls2.gamma",
)

IGNORED = ("head.", "head_dist.")


def _square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def pretrained_cfg(raw: RawCheckpoint) -> dict:
    """timm's hub config (``{"architecture": ..., "pretrained_cfg": {...}}``) when it sits beside the weights."""
    config = raw.config or {}
    pre = config.get("pretrained_cfg") if "architecture" in config else None
    return pre if isinstance(pre, dict) else {}


def convert(w: Weights, raw: RawCheckpoint, opts: ConversionOptions, size: Optional[Tuple[int, int]]) -> Converted:
    notes = []
    pre = pretrained_cfg(raw)
    if size is None and isinstance(pre.get("input_size"), (list, tuple)) and len(pre["input_size"]) == 3:
        size = (int(pre["input_size"][1]), int(pre["input_size"][2]))
    pw = w.take("patch_embed.proj.weight")
    dim, patch = pw.shape[0], pw.shape[-1]
    state = {"patch_embed.weight": pw}
    pb = w.optional("patch_embed.proj.bias")
    if pb is not None:
        state["patch_embed.bias"] = pb
    depth = w.count("blocks.{}.norm1.weight")
    blocks, info = map_blocks(w, "blocks.{}.", depth, LAYOUT)
    state.update(blocks)

    cls, dist, reg = w.optional("cls_token"), w.optional("dist_token"), w.optional("reg_token")
    tokens = [t for t in (cls, dist, reg) if t is not None]
    prefix = torch.cat(tokens, dim=1) if tokens else None
    n_prefix = 0 if prefix is None else prefix.shape[1]
    if "pos_embed" not in w.tensors:
        raise CheckpointError(f"{w.where}: timm model without learned 'pos_embed' (rope / none) is not supported")
    pos = w.take("pos_embed")
    length = pos.shape[1]
    if n_prefix and _square(length - n_prefix):
        prefix = prefix + pos[:, :n_prefix]  # position embedding covers the prefix tokens
        pos = pos[:, n_prefix:]
    elif not _square(length):
        raise CheckpointError(
            f"{w.where}: pos_embed of length {length} is neither a square grid nor {n_prefix} prefix tokens + a grid"
        )
    elif n_prefix:
        notes.append("prefix tokens carry no position embedding (no_embed_class)")
    grid = math.isqrt(pos.shape[1])
    native = (grid * patch, grid * patch)

    final_norm = w.has("norm.weight")
    fc_norm = w.has("fc_norm.weight")
    has_map = w.has("attn_pool.latent")
    if has_map:
        pool = "map"
    elif dist is not None:
        pool = "cls_dist"
    elif fc_norm or cls is None:
        pool = "mean"
    else:
        pool = "cls"
    heads = heads_for(dim, None, opts.num_heads, w.where)
    cfg = ViTConfig(
        image_size=size or native,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_hidden=info.mlp_hidden,
        mlp_type="swiglu" if info.swiglu else "mlp",
        act=opts.act or "gelu",
        ln_eps=opts.ln_eps or 1e-6,
        qkv_bias=info.qkv_bias,
        patch_bias=pb is not None,
        layer_scale=info.layer_scale,
        class_token=cls is not None,
        num_registers=n_prefix - (cls is not None),
        pre_norm=w.has("norm_pre.weight"),
        final_norm=final_norm,
        pool=pool,  # type: ignore[arg-type]
        fc_norm=fc_norm,
    )
    if prefix is not None:
        state["prefix"] = prefix
    state["pos_embed"] = patch_pos(pos, cfg, w.where)
    for name in (["norm_pre"] if cfg.pre_norm else []) + (["norm"] if final_norm else []) + (
        ["fc_norm"] if fc_norm else []
    ):
        state[f"{name}.weight"], state[f"{name}.bias"] = w.take(f"{name}.weight"), w.take(f"{name}.bias")
    if has_map:
        latent = w.take("attn_pool.latent")
        if latent.shape[1] != 1:
            raise CheckpointError(f"{w.where}: attn_pool with {latent.shape[1]} latents is not supported (only 1)")
        state["map_head.probe"] = latent
        for ours, theirs in (("q", "q"), ("kv", "kv"), ("proj", "proj"), ("norm", "norm"), ("mlp.fc1", "mlp.fc1"),
                             ("mlp.fc2", "mlp.fc2")):
            state[f"map_head.{ours}.weight"] = w.take(f"attn_pool.{theirs}.weight")
            state[f"map_head.{ours}.bias"] = w.take(f"attn_pool.{theirs}.bias")
        cfg.map_heads = heads
        cfg.map_mlp_hidden = state["map_head.mlp.fc1.weight"].shape[0]
    skipped = w.ignore(IGNORED)
    if skipped:
        notes.append(f"ignored the classifier head ({len(skipped)} tensors)")
    preprocessing = {"mean": pre["mean"], "std": pre["std"]} if "mean" in pre else {}
    if pre.get("interpolation") in ("bilinear", "bicubic", "nearest"):
        preprocessing["interpolation"] = pre["interpolation"]
    if pre:
        notes.append(f"timm config.json: {raw.config.get('architecture')}")
    return Converted(cfg=cfg, state=state, notes=notes, preprocessing=preprocessing)
