"""Choose the merge schedule by a fidelity budget: the schedule search (``exporter.search``) run on the model.

``export_encoder`` calls ``choose_schedule`` first when ``MergeConfig.budget`` is set: the unmerged encoder's
global embeddings of the calibration images are the reference, every candidate the search asks for (``grid``:
each schedule shape with ToMe's score and with the configured alpha) is run on the same images with torch, and
the chosen candidate becomes an ordinary ``MergeConfig`` (per-block r, pre_r, alpha), so the rest of the export
does not know a search happened. ``search_spec`` is what the manifest keeps.

With ``int8`` (the export writes ``encoder_int8`` files) every candidate is measured in the INT8 arithmetic of
those files (``exporter.int8_cpu.simulate``; its activation ranges are per image, so at any batch), so the
budget bounds what a CPU edge runs: merging and INT8 together, the unmerged encoder's INT8 loss included. When INT8 alone already exceeds the
budget the search refuses (``SearchError``) rather than export a file the budget does not allow.

With ``MergeConfig.summary_budget`` the summary tokens are measured too (``exporter.search.fidelity``'s summary
loss): the head's projection is fitted on the unmerged encoder's calibration features first (the export refits
it for the chosen schedule afterwards), every candidate's summaries are compared with the unmerged ones, and a
candidate must stay within both budgets.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from exporter.int8_cpu import simulate
from exporter.options import MergeConfig
from exporter.search import (MEASURE, SUMMARY_MEASURE, Candidate, SearchError, SearchResult, candidates, fidelity_of,
                             search)
from exporter.summary_head import fit_head
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


def embeddings(vit: ViT, x: np.ndarray, batch: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """(L2-normalized global embeddings [B, D], summary tokens [B, K, d]) of preprocessed images under ``vit``'s
    current schedule and summary head."""
    gs, ts = [], []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            g, tokens, _, _ = vit(torch.from_numpy(np.ascontiguousarray(x[i : i + batch])))
            gs.append(g.float().numpy())
            ts.append(tokens.float().numpy())
    return np.concatenate(gs), np.concatenate(ts)


def config_of(c: Candidate, merge: MergeConfig) -> MergeConfig:
    """The merge settings of candidate ``c`` (K, floor and the summary head's settings from ``merge``)."""
    return MergeConfig(**{**merge.model_dump(), "r": None, "r_list": list(c.r_per_block), "target": None,
                          "pre_r": c.pre_r, "alpha": c.alpha, "budget": None, "summary_budget": None})


def grid(vit: ViT, merge: MergeConfig) -> List[Candidate]:
    """The candidates a budget search tries: every shape of ``exporter.search`` with ToMe's score (alpha 0) and
    with ``merge.alpha`` (Turbo's, 5 unless given)."""
    return candidates(vit.cfg, merge.floor or merge.k, alphas=sorted({0.0, float(merge.alpha)}))


def choose_schedule(vit: ViT, merge: MergeConfig, calib: np.ndarray,
                    progress: Callable[[str], None] = lambda _m: None,
                    int8: bool = False, weight_bits: int = 8) -> Tuple[MergeConfig, SearchResult]:
    """Search the schedule grid for ``merge.budget`` on ``calib``; returns the chosen settings (unmerged when
    nothing fits) and the search, every evaluated point included. ``int8``: measure every candidate as the
    ``encoder_int8`` file of ``weight_bits`` weights computes (see the module docstring)."""
    if merge.budget is None:
        raise ValueError("choose_schedule needs merge.budget")
    unmerged = merge.unmerged()
    summary = merge.summary_budget is not None
    progress(f"schedule search: embedding {len(calib)} calibration images with the unmerged encoder")
    vit.configure_merging(unmerged)
    ref_tokens = None
    if summary:
        fit_head(vit, calib)  # the summaries of every candidate in the unmerged encoder's projection
        ref, ref_tokens = embeddings(vit, calib)
    else:
        ref = global_embeddings(vit, calib)

    def embed_now():
        with simulate(vit, weight_bits) if int8 else contextlib.nullcontext():
            return embeddings(vit, calib) if summary else global_embeddings(vit, calib)

    base = None
    if int8:
        if len(calib) < 2:
            raise SearchError("the schedule search needs calibration images")
        base = fidelity_of(ref, embed_now(), ref_tokens)
        progress(f"schedule search: unmerged INT8: loss {base.loss:.2f} points"
                 + ("" if base.summary_loss is None else f", summary {base.summary_loss:.2f}"))
        if base.loss > merge.budget:
            raise SearchError(f"INT8 alone loses {base.loss:.2f} points on the calibration images, over the budget "
                              f"of {merge.budget:g}: give a larger budget, or export without cpu_int8")
        if summary and base.summary_loss > merge.summary_budget:
            raise SearchError(f"INT8 alone loses {base.summary_loss:.2f} points of the summary on the calibration "
                              f"images, over the summary budget of {merge.summary_budget:g}: give a larger one, or "
                              "export without cpu_int8")

    def embed(c: Candidate):  # global embeddings, or (them, summary tokens) with a summary budget
        vit.configure_merging(config_of(c, merge))
        return embed_now()

    result = search(grid(vit, merge), embed, ref, merge.budget, progress=lambda m: progress(f"schedule search: {m}"),
                    precision="int8" if int8 else "fp32", base=base, summary_budget=merge.summary_budget,
                    ref_tokens=ref_tokens)
    chosen = config_of(result.chosen.candidate, merge) if result.chosen else unmerged
    vit.configure_merging(chosen)
    return chosen, result


def search_spec(result: SearchResult, file_loss: Optional[float] = None) -> mf.SearchSpec:
    """The manifest's record of a search: the budget, the measure, and what the chosen schedule measured
    (``file_loss``: the same loss measured on the written INT8 file)."""
    p = result.chosen
    common = dict(budget=result.budget, measure=MEASURE, candidates_evaluated=max(1, len(result.points)),
                  calibration_images=result.points[0].fidelity.images if result.points else
                  (result.base.images if result.base else 1),
                  precision="int8" if result.precision == "int8" else None, file_loss=file_loss)
    f = p.fidelity if p is not None else result.base
    if result.summary_budget is not None:
        common.update(summary_budget=result.summary_budget, summary_measure=SUMMARY_MEASURE,
                      summary_loss=f.summary_loss if f else 0.0, summary_agreement=f.summary_agreement if f else 1.0)
    if p is None:
        return mf.SearchSpec(**common, loss=f.loss if f else 0.0, nn_agreement=f.nn_agreement if f else 1.0,
                             cosine_mean=f.cosine_mean if f else 1.0, cosine_min=f.cosine_min if f else 1.0,
                             schedule="unmerged (no candidate within the budget)", flop_speedup=1.0)
    c = p.candidate
    return mf.SearchSpec(**common, loss=f.loss, nn_agreement=f.nn_agreement, cosine_mean=f.cosine_mean,
                         cosine_min=f.cosine_min, schedule=c.name, flop_speedup=c.speedup)
