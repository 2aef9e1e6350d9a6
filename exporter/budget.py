"""Choose the merge schedule by a fidelity budget: the schedule search (``exporter.search``) run on the model.

``export_encoder`` calls ``choose_schedule`` first when ``MergeConfig.budget`` is set: the unmerged encoder's
global embeddings of the calibration images are the reference, every candidate the search asks for (``grid``:
each schedule shape with ToMe's score and with the configured alpha) is run on the same images with torch, and
the chosen candidate becomes an ordinary ``MergeConfig`` (per-block r, pre_r, alpha), so the rest of the export
does not know a search happened. ``search_spec`` is what the manifest keeps.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import numpy as np
import torch

from exporter.options import MergeConfig
from exporter.search import MEASURE, Candidate, SearchResult, candidates, search
from exporter.vit import ViT
from tokenline import manifest as mf


def global_embeddings(vit: ViT, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """L2-normalized global embeddings of preprocessed images under ``vit``'s current schedule (no summary head)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            prefix, patches = vit.forward_tokens(torch.from_numpy(np.ascontiguousarray(x[i : i + batch])))
            out.append(vit.pooled(prefix, patches).float().numpy())
    g = np.concatenate(out)
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)


def config_of(c: Candidate, merge: MergeConfig) -> MergeConfig:
    """The merge settings of candidate ``c`` (K, floor and the summary head's settings from ``merge``)."""
    return MergeConfig(**{**merge.model_dump(), "r": None, "r_list": list(c.r_per_block), "target": None,
                          "pre_r": c.pre_r, "alpha": c.alpha, "budget": None})


def grid(vit: ViT, merge: MergeConfig) -> List[Candidate]:
    """The candidates a budget search tries: every shape of ``exporter.search`` with ToMe's score (alpha 0) and
    with ``merge.alpha`` (Turbo's, 5 unless given)."""
    return candidates(vit.cfg, merge.floor or merge.k, alphas=sorted({0.0, float(merge.alpha)}))


def choose_schedule(vit: ViT, merge: MergeConfig, calib: np.ndarray,
                    progress: Callable[[str], None] = lambda _m: None) -> Tuple[MergeConfig, SearchResult]:
    """Search the schedule grid for ``merge.budget`` on ``calib``; returns the chosen settings (unmerged when
    nothing fits) and the search, every evaluated point included."""
    if merge.budget is None:
        raise ValueError("choose_schedule needs merge.budget")
    unmerged = merge.unmerged()
    progress(f"schedule search: embedding {len(calib)} calibration images with the unmerged encoder")
    vit.configure_merging(unmerged)
    ref = global_embeddings(vit, calib)

    def embed(c: Candidate) -> np.ndarray:
        vit.configure_merging(config_of(c, merge))
        return global_embeddings(vit, calib)

    result = search(grid(vit, merge), embed, ref, merge.budget, progress=lambda m: progress(f"schedule search: {m}"))
    chosen = config_of(result.chosen.candidate, merge) if result.chosen else unmerged
    vit.configure_merging(chosen)
    return chosen, result


def search_spec(result: SearchResult) -> mf.SearchSpec:
    """The manifest's record of a search: the budget, the measure, and what the chosen schedule measured."""
    p = result.chosen
    common = dict(budget=result.budget, measure=MEASURE, candidates_evaluated=max(1, len(result.points)),
                  calibration_images=result.points[0].fidelity.images if result.points else 1)
    if p is None:
        return mf.SearchSpec(**common, loss=0.0, nn_agreement=1.0, cosine_mean=1.0, cosine_min=1.0,
                             schedule="unmerged (no candidate within the budget)", flop_speedup=1.0)
    f, c = p.fidelity, p.candidate
    return mf.SearchSpec(**common, loss=f.loss, nn_agreement=f.nn_agreement, cosine_mean=f.cosine_mean,
                         cosine_min=f.cosine_min, schedule=c.name, flop_speedup=c.speedup)
