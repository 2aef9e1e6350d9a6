"""Shared pieces of the checkpoint converters: the error, options, result types, key bookkeeping, block mapping.

Defaults documented here, in one place (each family's preprocessing is registered with the family in
``exporter.checkpoints.registry``):

- Attention heads: from config.json where the family has one, else ``ConversionOptions.num_heads``, else
  ``embed_dim // 64`` (head width 64: every ViT-S/B/L, CLIP and DINOv2 model; ViT-H/14 in timm uses 80).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from pydantic import Field
from torch import Tensor

from exporter.text import TextConfig, TextTower, TokenizerInfo
from exporter.vit import Act, ViT, ViTConfig, grid_of, resample_pos_embed
from tokenline.documents import StrictModel

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



class Preprocess(NamedTuple):
    """The preprocessing a family's weights were trained with (as in ``tokenline.manifest.InputSpec``)."""

    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    interpolation: str
    resize: str


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or converted; the message says what to do, no traceback needed."""


class ConversionOptions(StrictModel):
    """What the weights cannot tell and no config.json says. ``None`` everywhere means: use the default."""

    num_heads: Optional[int] = Field(None, gt=0, description="image tower heads (default embed_dim // 64)")
    text_num_heads: Optional[int] = Field(None, gt=0, description="text tower heads (default width // 64)")
    act: Optional[Literal["gelu", "quick_gelu", "gelu_tanh"]] = Field(
        None, description="MLP activation; open_clip OpenAI weights need 'quick_gelu' (family default otherwise)"
    )
    ln_eps: Optional[float] = Field(None, gt=0, description="LayerNorm epsilon (family default otherwise)")


@dataclass
class LoadedEncoder:
    """A checkpoint converted into the exporter's ViT (and text tower when the family has one)."""

    vit: ViT
    family: str
    source: Path
    source_sha256: str
    text: Optional[TextTower] = None
    tokenizer: Optional[TokenizerInfo] = None
    notes: List[str] = field(default_factory=list)

    @property
    def mean(self) -> Tuple[float, float, float]:
        return self.vit.cfg.mean

    @property
    def std(self) -> Tuple[float, float, float]:
        return self.vit.cfg.std

    @property
    def interpolation(self) -> str:
        return self.vit.cfg.interpolation

    @property
    def resize(self) -> str:
        return self.vit.cfg.resize


@dataclass
class Converted:
    """What a family converter returns: the image tower (config + state dict), optionally the text tower."""

    cfg: ViTConfig
    state: Dict[str, Tensor]
    text_cfg: Optional[TextConfig] = None
    text_state: Optional[Dict[str, Tensor]] = None
    tokenizer: Optional[TokenizerInfo] = None
    notes: List[str] = field(default_factory=list)
    # what the checkpoint's own config says of its preprocessing ("mean", "std", "interpolation"); it
    # overrides the family's registered defaults (``apply_preprocess``)
    preprocessing: Dict[str, Any] = field(default_factory=dict)


class Weights:
    """A checkpoint's tensors with bookkeeping: every key a converter uses is ticked off, and ``finish`` rejects
    keys nobody used (an unsupported variant must fail loudly, not convert into a wrong model)."""

    def __init__(self, tensors: Dict[str, Tensor], family: str, where: str) -> None:
        self.tensors = tensors
        self.family = family
        self.where = where
        self.used: set = set()

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str) -> Tensor:
        if key not in self.tensors:
            raise CheckpointError(f"{self.where}: {self.family} checkpoint lacks the key '{key}'")
        self.used.add(key)
        return self.tensors[key].float()

    def optional(self, key: str) -> Optional[Tensor]:
        return self.take(key) if key in self.tensors else None

    def first(self, keys: Sequence[str]) -> Tuple[str, Tensor]:
        for k in keys:
            if k in self.tensors:
                return k, self.take(k)
        raise CheckpointError(f"{self.where}: {self.family} checkpoint lacks all of the keys {list(keys)}")

    def count(self, fmt: str) -> int:
        """Number of consecutive i for which ``fmt.format(i)`` is a key (blocks/layers)."""
        n = 0
        while fmt.format(n) in self.tensors:
            n += 1
        return n

    def ignore(self, prefixes: Iterable[str]) -> List[str]:
        """Tick off keys the image/text towers do not need (classifier heads, logit scale...). Returns them."""
        skipped = [k for k in self.tensors if k not in self.used and any(k.startswith(p) for p in prefixes)]
        self.used.update(skipped)
        return skipped

    def finish(self) -> None:
        left = sorted(set(self.tensors) - self.used)
        if left:
            shown = ", ".join(left[:12]) + (f" ... ({len(left)} in all)" if len(left) > 12 else "")
            raise CheckpointError(
                f"{self.where}: unsupported {self.family} variant: keys not understood by the converter: {shown}"
            )


@dataclass(frozen=True)
class BlockLayout:
    """Where one transformer block's tensors live in a source checkpoint (suffixes after the block prefix).

    ``qkv`` is one fused name (q;k;v rows, ``.weight``/``.bias`` appended unless it ends in ``_weight``-style
    pairs given as a tuple of two full suffixes) or three separate projection names.
    """

    norm1: str
    norm2: str
    qkv: Union[Tuple[str, str], Tuple[str, str, str]]  # fused: (weight, bias) suffixes; split: q, k, v names
    proj: str
    fc1: Tuple[str, ...]  # candidate names (plain MLP and SwiGLU variants)
    fc2: Tuple[str, ...]
    ls1: Optional[str] = None
    ls2: Optional[str] = None


@dataclass
class BlockInfo:
    mlp_hidden: int
    swiglu: bool
    qkv_bias: bool
    layer_scale: bool


def map_blocks(w: Weights, src: str, depth: int, layout: BlockLayout, dst: str = "blocks") -> Tuple[Dict, BlockInfo]:
    """Map ``depth`` blocks named ``src.format(i)`` (ending in '.') into ``{dst}.{i}.*`` ViT/TextTower names."""
    out: Dict[str, Tensor] = {}
    infos = []
    for i in range(depth):
        s, d = src.format(i), f"{dst}.{i}."
        for ours, theirs in (("norm1", layout.norm1), ("norm2", layout.norm2), ("attn.proj", layout.proj)):
            out[d + ours + ".weight"] = w.take(s + theirs + ".weight")
            out[d + ours + ".bias"] = w.take(s + theirs + ".bias")
        if len(layout.qkv) == 2:
            out[d + "attn.qkv.weight"] = w.take(s + layout.qkv[0])
            bias = w.optional(s + layout.qkv[1])
        else:
            out[d + "attn.qkv.weight"] = torch.cat([w.take(s + n + ".weight") for n in layout.qkv], dim=0)
            parts = [w.optional(s + n + ".bias") for n in layout.qkv]
            bias = None if all(p is None for p in parts) else torch.cat(
                [p if p is not None else torch.zeros(out[d + "attn.qkv.weight"].shape[1]) for p in parts]
            )
        if bias is not None:
            out[d + "attn.qkv.bias"] = bias
        name1, fc1 = w.first([s + n + ".weight" for n in layout.fc1])
        name2, fc2 = w.first([s + n + ".weight" for n in layout.fc2])
        out[d + "mlp.fc1.weight"], out[d + "mlp.fc2.weight"] = fc1, fc2
        out[d + "mlp.fc1.bias"] = w.take(name1[: -len("weight")] + "bias")
        out[d + "mlp.fc2.bias"] = w.take(name2[: -len("weight")] + "bias")
        ls = None
        if layout.ls1 and w.has(s + layout.ls1):
            out[d + "ls1"] = w.take(s + layout.ls1)
            out[d + "ls2"] = w.take(s + (layout.ls2 or ""))
            ls = True
        hidden = fc2.shape[1]
        if fc1.shape[0] not in (hidden, 2 * hidden):
            raise CheckpointError(f"{w.where}: block {i}: MLP shapes {tuple(fc1.shape)} / {tuple(fc2.shape)} disagree")
        infos.append(BlockInfo(hidden, fc1.shape[0] == 2 * hidden, bias is not None, bool(ls)))
    if not infos:
        raise CheckpointError(f"{w.where}: no transformer blocks found under '{src.format(0)}'")
    if any(i != infos[0] for i in infos):
        raise CheckpointError(f"{w.where}: blocks differ in shape or kind; not a uniform ViT")
    return out, infos[0]


def heads_for(dim: int, configured: Optional[int], override: Optional[int], where: str) -> int:
    heads = override or configured or (dim // 64 if dim % 64 == 0 else 0)
    if not heads or dim % heads:
        raise CheckpointError(
            f"{where}: cannot tell the number of attention heads for width {dim}; pass num_heads "
            f"(--num-heads / text_num_heads) so that it divides {dim}"
        )
    return heads


def to_size(image_size: Union[int, Sequence[int], None]) -> Optional[Tuple[int, int]]:
    if image_size is None:
        return None
    try:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        size = (int(h), int(w))
    except (TypeError, ValueError):
        raise CheckpointError(f"image size must be an int or (height, width), got {image_size!r}") from None
    if min(size) <= 0:
        raise CheckpointError(f"image size must be positive, got {image_size!r}")
    return size


def patch_pos(pos: Tensor, cfg: ViTConfig, where: str, antialias: bool = False) -> Tensor:
    """[1, N, C] patch position embeddings of a square grid, resampled to ``cfg.grid`` when it differs."""
    try:
        old = grid_of(pos.shape[1])
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if cfg.image_size[0] % cfg.patch_size or cfg.image_size[1] % cfg.patch_size:
        raise CheckpointError(f"{where}: image size {cfg.image_size} is not a multiple of the patch {cfg.patch_size}")
    return resample_pos_embed(pos, old, cfg.grid, antialias=antialias)


def apply_preprocess(cfg: ViTConfig, defaults: Preprocess, overrides: Dict[str, Any]) -> None:
    """Set ``cfg``'s preprocessing: the family's ``defaults``, with what the checkpoint's config says over them."""
    cfg.mean = tuple(overrides.get("mean", defaults.mean))  # type: ignore[assignment]
    cfg.std = tuple(overrides.get("std", defaults.std))  # type: ignore[assignment]
    cfg.interpolation = overrides.get("interpolation", defaults.interpolation)
    cfg.resize = defaults.resize


def build_vit(cfg: ViTConfig, state: Dict[str, Tensor], where: str) -> ViT:
    vit = ViT(cfg)
    try:
        vit.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: converted weights do not fit the ViT: {exc}") from None
    return vit.eval()


def build_text(cfg: TextConfig, state: Dict[str, Tensor], where: str,
               tokenizer: Optional[TokenizerInfo] = None) -> TextTower:
    text = TextTower(cfg, tokenizer)
    try:
        text.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: converted weights do not fit the text tower: {exc}") from None
    return text.eval()


ACTS: Dict[str, Act] = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}


def hf_act(name: str, where: str) -> Act:
    if name not in ACTS:
        raise CheckpointError(f"{where}: unsupported activation '{name}' (supported: {sorted(ACTS)})")
    return ACTS[name]
