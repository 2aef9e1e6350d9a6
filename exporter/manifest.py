"""The manifest of an export: the ViT, its merge settings and the validation numbers as a ``tokenline.manifest``."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Dict, List, Optional

from exporter import __version__
from exporter.merge import SEMANTIC_SCALE
from exporter.options import ExportOptions, MergeConfig
from exporter.vit import ViT
from tokenline import manifest as mf


def input_spec(vit: ViT) -> mf.InputSpec:
    """How a frame becomes this ViT's input: size and the preprocessing its weights were trained with."""
    c = vit.cfg
    return mf.InputSpec(
        height=c.image_size[0], width=c.image_size[1], mean=tuple(c.mean), std=tuple(c.std),
        interpolation=c.interpolation, resize=c.resize, color_order="RGB",
    )


def summary_spec(vit: ViT, merge: MergeConfig, projection: mf.ProjectionSpec) -> mf.SummarySpec:
    """The slic summary head of ``vit`` as the manifest describes it."""
    head = vit.head
    assert head is not None
    return mf.SummarySpec(k=merge.k, dim=head.dim, method="slic", layer=vit.summary_layer, projection=projection,
                          footprint_grid=vit.footprint_grid, iterations=head.iters, spatial_weight=head.lam)


def build_manifest(vit: ViT, merge: MergeConfig, opts: ExportOptions, files: List[mf.FileSpec], stats: Dict[str, float],
                   table: Dict[str, object], text: Optional[mf.TextSpec], projection: mf.ProjectionSpec, *,
                   family: str, source_path: str, source_sha256: str,
                   search: Optional[mf.SearchSpec] = None) -> mf.Manifest:
    """The manifest of ``files``, written by ``export_encoder`` for ``vit`` configured with ``merge``.

    ``stats`` are the worst ``exporter.validate.compare`` numbers over the encoder files, ``table`` the
    measurements of the export (cosine vs unmerged, throughput, GFLOPs), ``projection`` the summary head's fitted
    centring and projection; ``files[0]`` is the main encoder, whose batch the outputs are listed for;
    ``search`` records how a fidelity budget chose the schedule.
    """
    cfg, schedule, k = vit.cfg, vit.schedule, merge.k
    d = cfg.out_dim
    summary = summary_spec(vit, merge, projection)
    return mf.Manifest(
        name=opts.name,
        family=family,
        source_checkpoint=Path(source_path).name,
        source_sha256=source_sha256,
        exporter_version=__version__,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        opset=opts.opset,
        precision=opts.precision,
        batch_sizes=list(opts.batch_sizes),
        input=input_spec(vit),
        encoder=mf.EncoderSpec(
            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, patch_size=cfg.patch_size,
            grid=cfg.grid, num_prefix_tokens=cfg.num_prefix, has_cls=cfg.class_token,
        ),
        merge=mf.MergeSpec(
            method=merge.method, alpha=merge.alpha, alpha_scale=SEMANTIC_SCALE, pre_r=schedule.pre_r,
            r_per_block=schedule.r_per_block, tokens_per_block=vit.tokens_per_block,
            final_tokens=schedule.final_patches + cfg.num_prefix, floor=merge.floor or k, search=search,
        ),
        summary=summary,
        outputs=mf.output_specs(summary.method, mf.Layout(k, d, summary.dim, summary.footprint_grid), files[0].batch),
        embedding_dim=d,
        files=files,
        text=text,
        validation=mf.ValidationSpec(
            max_abs_err_vs_torch=stats["max_abs_err"], max_rel_err_vs_torch=stats["max_rel_err"],
            tolerance=opts.max_abs_error, images_matching_torch=stats["matched_fraction"],
            images_torch_matches_itself=stats.get("self_matched_fraction"),
            global_cosine_min_vs_torch=stats["global_cos_min"],
            cosine_vs_unmerged_mean=table.get("cosine_vs_unmerged_mean"),
            cosine_vs_unmerged_min=table.get("cosine_vs_unmerged_min"),
            ort_images_per_s=table.get("ort_images_per_s"),
            ort_images_per_s_unmerged=table.get("ort_images_per_s_unmerged"),
            gflops=table.get("gflops"), gflops_unmerged=table.get("gflops_unmerged"),
            footprint_agreement_vs_torch=stats.get("footprint_agreement"),
            int8_cosine_vs_fp32_mean=table.get("int8_cosine_vs_fp32_mean"),
            int8_cosine_vs_fp32_min=table.get("int8_cosine_vs_fp32_min"),
            ort_images_per_s_int8=table.get("ort_images_per_s_int8"),
        ),
    )
