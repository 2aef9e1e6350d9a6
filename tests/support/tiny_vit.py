"""A tiny random-weight exporter ViT (48 px, 3 blocks) for export and TensorRT-compatibility tests."""

from __future__ import annotations

import torch

from exporter.vit import ViT, ViTConfig


def tiny_vit(seed: int = 0, **kw) -> ViT:
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=(48, 48), patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_hidden=64, **kw)
    vit = ViT(cfg)
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.1)
    return vit.eval()
