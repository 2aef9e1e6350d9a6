"""Compact, export-friendly text transformer (the text tower of CLIP / open_clip / SigLIP) and its ONNX export.

Checkpoint converters (``exporter/checkpoints``) fill a ``TextConfig`` and a state dict whose block names are
the ViT's (``blocks.N.norm1``, ``attn.qkv`` fused q;k;v, ``attn.proj``, ``norm2``, ``mlp.fc1/fc2``,
``ls1/ls2``), plus ``token_embedding.weight`` [V, W], ``pos_embed`` [ctx, W], ``norm`` (final LayerNorm) and
``proj`` (a Linear, with or without bias). Written like ``exporter/vit.py`` for ONNX: hand-written LayerNorm,
explicit attention with a constant causal mask, pooling by a one-hot product (no GatherND), static context.

Forward: input_ids int64 [B, ctx] -> text_embedding float32 [B, E], L2-normalized.
"""

from __future__ import annotations

import warnings
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Union

import torch
from torch import Tensor, nn

from exporter.vit import Act, LayerNorm, Mlp

log = logging.getLogger(__name__)

TextPool = Literal["argmax", "eos", "last"]
TokenizerKind = Literal["open_clip_bpe", "hf_tokenizer_json"]

TEXT_INPUT = "input_ids"
TEXT_OUTPUT = "text_embedding"


@dataclass
class TextConfig:
    """Architecture of a converted text tower."""

    vocab_size: int
    context_length: int
    width: int
    depth: int
    num_heads: int
    mlp_hidden: int
    act: Act = "gelu"
    ln_eps: float = 1e-5
    causal: bool = True
    layer_scale: bool = False
    # "argmax": the token with the largest id (open_clip, old HF CLIP: EOT is the largest id);
    # "eos": the first position of eos_id (HF CLIP); "last": the last position (SigLIP, fixed-length padding)
    pool: TextPool = "argmax"
    eos_id: Optional[int] = None
    proj_dim: Optional[int] = None  # None: no projection
    proj_bias: bool = False
    pad_id: int = 0

    @property
    def out_dim(self) -> int:
        return self.proj_dim or self.width

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenizerInfo:
    """The tokenizer that belongs to a text tower: files the exporter copies next to the text ONNX so that
    central can tokenize queries (``kind`` as in ``tokenline.manifest.TextSpec.tokenizer``)."""

    kind: TokenizerKind
    files: List[Path]
    context_length: int
    vocab_size: int
    pad_id: int
    notes: List[str] = field(default_factory=list)


class TextAttention(nn.Module):
    """Multi-head self-attention with an optional additive mask (the ViT's layout: fused qkv, proj)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        logits = (qkv[0] * self.scale) @ qkv[1].transpose(-2, -1)
        if mask is not None:
            logits = logits + mask
        out = (logits.softmax(dim=-1) @ qkv[2]).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class TextBlock(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        d = cfg.width
        self.norm1 = LayerNorm(d, cfg.ln_eps)
        self.attn = TextAttention(d, cfg.num_heads)
        self.norm2 = LayerNorm(d, cfg.ln_eps)
        self.mlp = Mlp(d, cfg.mlp_hidden, cfg.act)
        self.ls1 = nn.Parameter(torch.ones(d)) if cfg.layer_scale else None
        self.ls2 = nn.Parameter(torch.ones(d)) if cfg.layer_scale else None

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        h = self.attn(self.norm1(x), mask)
        x = x + (h * self.ls1 if self.ls1 is not None else h)
        h = self.mlp(self.norm2(x))
        return x + (h * self.ls2 if self.ls2 is not None else h)


class TextTower(nn.Module):
    """The text encoder. ``embed`` gives the pooled, projected embedding; ``forward`` L2-normalizes it."""

    def __init__(self, cfg: TextConfig, tokenizer: Optional[TokenizerInfo] = None) -> None:
        super().__init__()
        if cfg.pool == "eos" and cfg.eos_id is None:
            raise ValueError("TextConfig.pool='eos' needs eos_id")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList([TextBlock(cfg) for _ in range(cfg.depth)])
        self.norm = LayerNorm(cfg.width, cfg.ln_eps)
        self.proj = nn.Linear(cfg.width, cfg.proj_dim, bias=cfg.proj_bias) if cfg.proj_dim else None
        n = cfg.context_length
        mask = torch.full((n, n), float("-inf")).triu(1) if cfg.causal else None
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("positions", torch.arange(n), persistent=False)

    def _pool_index(self, ids: Tensor) -> Tensor:
        if self.cfg.pool == "argmax":
            return ids.to(torch.int32).argmax(dim=-1)  # int32: ArgMax on int64 is not universal in ONNX runtimes
        if self.cfg.pool == "eos":
            return (ids == self.cfg.eos_id).to(torch.int32).argmax(dim=-1)
        return torch.full_like(ids[:, 0], ids.shape[1] - 1)

    def embed(self, input_ids: Tensor) -> Tensor:
        """Pooled (and projected) embedding, before L2 normalization — what parity tests compare."""
        x = self.token_embedding(input_ids) + self.pos_embed[: input_ids.shape[1]]
        mask = self.mask[: input_ids.shape[1], : input_ids.shape[1]] if self.mask is not None else None
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        idx = self._pool_index(input_ids)
        onehot = (self.positions[None, : input_ids.shape[1]] == idx[:, None].to(self.positions.dtype)).to(x.dtype)
        pooled = (onehot.unsqueeze(-1) * x).sum(dim=1)
        return self.proj(pooled) if self.proj is not None else pooled

    def forward(self, input_ids: Tensor) -> Tensor:
        e = self.embed(input_ids)
        return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def export_text_onnx(text: TextTower, path: Path, opset: int = 17) -> Dict[str, Union[str, int, List[str]]]:
    """Export the text tower: input ``input_ids`` int64 [B, ctx] (dynamic batch), output ``text_embedding``.

    Returns what the manifest's ``TextSpec`` needs: ``path``, ``context_length``, ``vocab_size``, ``pad_id``,
    ``tokenizer`` (kind) and ``tokenizer_files`` (absolute paths to copy beside the ONNX; may be empty, with a
    warning logged, when the checkpoint came without them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = text.eval()
    ids = torch.zeros(2, text.cfg.context_length, dtype=torch.long)
    ids[:, 0] = 1
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter: static shapes and a plain op set (the dynamo exporter deprecates it loudly)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            text,
            (ids,),
            str(path),
            input_names=[TEXT_INPUT],
            output_names=[TEXT_OUTPUT],
            dynamic_axes={TEXT_INPUT: {0: "batch"}, TEXT_OUTPUT: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    tok = text.tokenizer
    if tok is None:
        log.warning("text tower has no tokenizer information: the export ships no tokenizer files")
        kind: TokenizerKind = "open_clip_bpe" if text.cfg.pool == "argmax" else "hf_tokenizer_json"
        files: List[str] = []
    else:
        kind, files = tok.kind, [str(f) for f in tok.files]
        for note in tok.notes:
            log.warning("tokenizer: %s", note)
    return {
        "path": str(path),
        "context_length": text.cfg.context_length,
        "vocab_size": text.cfg.vocab_size,
        "pad_id": tok.pad_id if tok is not None else text.cfg.pad_id,
        "tokenizer": kind,
        "tokenizer_files": files,
    }
