"""Benchmark: what token merging costs the summary tokens' anomaly scores, beside what the budget search sees.

    python benchmarks/bench_merge_summary.py            # writes BENCHMARKS.md (section merge_summary_224px) and a plot

The schedule search (``tokenline-export export --budget``) bounds a label-free estimate of the global embedding's
precision@10 drop; it does not look at the summary tokens, which anomaly flagging scores. This measures, for the
constant schedules of the search's grid and `make demo`'s r = 16 (alpha 5), at 224 px:

- the summary's anomaly quality (the reference head, benchmarks/summary_head_ref.py, on the merged block-8
  features with their source maps; PCA 96 fitted on the bank frames, int8 as on the wire; a frame's score is its
  largest distance from a token to the nearest bank token): ELPV mono AUROC averaged over the five bank draws of
  bench_elpv_gap.py, and NEU-DET 3x3 mosaics (anomaly AUROC and pointing, bench_summary.py's mosaics);
- beside it, label-free numbers on 150 images of NEU-DET's calibration half (benchmarks.neu_det.calibration_split,
  what a budget search sees): the search's own loss estimate (``exporter.search.fidelity`` of the global
  embeddings), the summary's top-10 neighbour disagreement by the summaries' Chamfer similarity (mean over one
  image's tokens of the best cosine to the other's; ``exporter.search.fidelity``'s summary loss divided by
  ``KAPPA_SUMMARY``: what ``--summary-budget`` bounds, its KAPPA set from this table), and the mean best cosine
  from each unmerged summary token to the merged image's tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import ROOT, save_figure, write_section  # noqa: E402
from benchmarks.bench_elpv_gap import bank_draws, elpv_aurocs  # noqa: E402
from benchmarks.bench_summary import (Extractor, FeatureSets, Mosaics, Variant, compress, head_rep,  # noqa: E402
                                      elpv_frame, elpv_selection, md_table, mosaic_anomaly, neu_data, project, render)
from benchmarks.neu_det import calibration_split  # noqa: E402
from exporter.int8_cpu import simulate  # noqa: E402
from exporter.search import KAPPA_SUMMARY, fidelity  # noqa: E402

HEAD = {"k": 16, "k_protect": 0, "lam": 0.5, "iters": 3}
WIRE = Variant("summary", "s", "int8", 96)
CONFIGS = [  # name, constant r, alpha, INT8 (exporter.int8_cpu.simulate: the --cpu-int8 file's arithmetic)
    ("unmerged", 0, 0.0, False), ("unmerged, INT8 (--budget 1 --cpu-int8's pick)", 0, 0.0, True),
    ("constant r = 4 (1.1x)", 4, 0.0, False), ("constant r = 8 (1.25x, --budget 1's pick)", 8, 0.0, False),
    ("constant r = 14 (1.5x)", 14, 0.0, False), ("constant r = 16, alpha 0", 16, 0.0, False),
    ("constant r = 16, alpha 5 (make demo)", 16, 5.0, False)]
INT8_BATCH = 8  # the batch the INT8 rows run at (the exporter's search uses 8 too)
PLOT = ROOT / "docs" / "img" / "merge_summary_224px.png"


def encode(ex: Extractor, frames: Sequence[np.ndarray], batch: int = 16) -> Dict[str, np.ndarray]:
    out: Dict[str, List[np.ndarray]] = {}
    for s in range(0, len(frames), batch):
        for k, v in ex(frames[s:s + batch]).items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def summary(feats: Dict[str, np.ndarray]):
    return head_rep(feats["L8"].astype(np.float32), (16, 16), src=feats.get("merged_src"), **HEAD)


def plot(rows: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    x = np.arange(len(rows))
    names = [r["schedule"].split(" (")[0] for r in rows]
    for key, label in (("elpv", "ELPV mono AUROC (5 draws)"), ("neu", "NEU 3x3 anomaly AUROC"),
                       ("apoint", "NEU anomaly pointing")):
        a1.plot(x, [r[key] for r in rows], marker="o", label=label)
    for key, label in (("p10_loss", "search's global loss estimate (pt)"),
                       ("chamfer_loss", "summary Chamfer top-10 disagreement (pt)")):
        a2.plot(x, [r[key] for r in rows], marker="o", label=label)
    for key, label in (("elpv", "ELPV AUROC drop (pt)"), ("neu", "NEU AUROC drop (pt)")):
        a2.plot(x, [100 * (rows[0][key] - r[key]) for r in rows], marker="x", ls="--", label=label)
    for ax, ylabel in ((a1, "summary tokens (PCA 96 int8)"), (a2, "points")):
        ax.set_xticks(x, names, rotation=25, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save_figure(fig, path, "Merging vs the summary tokens' anomaly scores, and what a search can see without labels (224 px)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib-per-class", type=int, default=25, help="NEU-DET calibration images per class")
    ap.add_argument("--draws", type=int, default=5, help="ELPV bank draws")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    from rich.console import Console
    from rich.progress import Progress

    from tokenline.preprocess import read_image

    console = Console()
    with Progress(console=console, transient=True) as progress:
        fs = FeatureSets(neu_data(), progress)
        e = fs.elpv(224)
        ms, _ = fs.mosaics(3, 224)
    if e is None:
        console.print("[red]ELPV data missing (pip install elpv-dataset)[/red]")
        return 1
    probs, _, _ = e
    images, _, keep = elpv_selection()  # the cells FeatureSets.elpv encodes, in its order
    cells = [elpv_frame(images[i]) for i in keep]
    mosaic_frames = [render(m, 3, fs.read) for m in ms]
    paths, _, calib, _ = calibration_split(args.calib_per_class)
    calib_frames = [read_image(paths[i]) for i in calib]
    masks = bank_draws(probs, args.draws)

    rows: List[dict] = []
    ref: Optional[dict] = None
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("schedules", total=len(CONFIGS))
        for name, r, alpha, int8 in CONFIGS:
            ex = Extractor(224, merge_r=r, alpha=alpha)
            with simulate(ex.vit) if int8 else contextlib.nullcontext():
                b = INT8_BATCH if int8 else 16
                ef, mf, cf = encode(ex, cells, b), encode(ex, mosaic_frames, b), encode(ex, calib_frames, b)
            elpv = elpv_aurocs(probs, masks, lambda m, rep=summary(ef): rep, WIRE)
            mos = Mosaics(3, (16, 16), ms, mf)
            nrep = summary(mf)
            neu = mosaic_anomaly(mos, compress(nrep, nrep.tokens[mos.calib], WIRE)[0])
            crep = summary(cf)
            if ref is None:  # the unmerged run: the reference of the label-free numbers, and their projection
                ref = {"global": cf["global"], "pca": compress(crep, crep.tokens, WIRE)[1]}
            t = project(crep.tokens, ref["pca"])
            t0 = ref.setdefault("tokens", t)
            f = fidelity(ref["global"], cf["global"], ref_tokens=t0, tokens=t)  # what --summary-budget bounds
            best = np.einsum("iad,ibd->iab", t0, t).max(-1).mean()
            rows.append({"schedule": name, "elpv": float(elpv.mean()), "neu": neu["auroc"], "apoint": neu["apoint"],
                         "p10_loss": f.p10_loss, "chamfer_loss": 100 * (1 - f.summary_agreement),
                         "token_cos": float(best)})
            progress.advance(task)
    table = md_table(rows, [("schedule", "schedule", ""), ("elpv", f"ELPV mono AUROC ({args.draws} draws)", ".3f"),
                            ("neu", "NEU 3x3 anomaly AUROC", ".3f"), ("apoint", "anomaly pointing", ".3f"),
                            ("p10_loss", "search's loss estimate (pt, global)", ".2f"),
                            ("chamfer_loss", "summary top-10 disagreement (pt)", ".1f"),
                            ("token_cos", "unmerged token's best cosine", ".3f")])
    console.print(table)
    u = rows[0]
    pick, int8 = rows[3], rows[1]
    within = "within" if pick["p10_loss"] <= 1.0 else "over"
    merged = rows[2:]
    drops = np.array([[u["elpv"] - r["elpv"], u["neu"] - r["neu"]] for r in merged])
    monotone = bool(np.all(np.diff([r["chamfer_loss"] for r in [u] + rows[2:6]]) >= 0))
    corr = [float(np.corrcoef([r["chamfer_loss"] for r in merged], drops[:, j])[0, 1]) for j in (0, 1)]
    verdict = (f"- `--budget 1`'s pick (r = 8) is {within} its 1-point estimate for the global embedding "
               f"({pick['p10_loss']:.2f}) and costs the summary {100 * (u['elpv'] - pick['elpv']):.1f} points of ELPV "
               f"AUROC, {100 * (u['neu'] - pick['neu']):.1f} of NEU mosaic AUROC and "
               f"{100 * (u['apoint'] - pick['apoint']):.1f} of pointing; `make demo`'s r = 16 (alpha 5) "
               f"{100 * (u['elpv'] - rows[-1]['elpv']):.1f} / {100 * (u['neu'] - rows[-1]['neu']):.1f} / "
               f"{100 * (u['apoint'] - rows[-1]['apoint']):.1f}. The unmerged INT8 file (`--budget 1 --cpu-int8`) "
               f"{'keeps' if all(u[k] - int8[k] <= 0.01 for k in ('elpv', 'neu', 'apoint')) else 'costs'} the "
               f"summary: {int8['elpv']:.3f} / {int8['neu']:.3f} / {int8['apoint']:.3f} against "
               f"{u['elpv']:.3f} / {u['neu']:.3f} / {u['apoint']:.3f} unmerged fp32 (summary top-10 disagreement "
               f"{int8['chamfer_loss']:.1f} points).\n"
               f"- The summaries' Chamfer top-10 disagreement on the calibration images (label-free) "
               f"{'grows with r' if monotone else 'does not grow monotonically with r'} (constant schedules) and "
               f"correlates with the AUROC drops over the merged schedules at {corr[0]:.2f} (ELPV) and {corr[1]:.2f} "
               "(NEU). `--summary-budget` bounds it (x KAPPA_SUMMARY = "
               f"{KAPPA_SUMMARY:g}: the largest ratio of AUROC drop to disagreement here is "
               f"{max(float(np.max(drops[i]) * 100 / r['chamfer_loss']) for i, r in enumerate(merged)):.2f}).\n")
    console.print(verdict)
    body = (__doc__.split("\n\n", 2)[2].strip() + "\n\n" + table + "\n\n" + verdict
            + f"\n![merging vs the summary]({PLOT.relative_to(ROOT).as_posix()})\n")
    if args.write:
        plot(rows, PLOT)
        write_section("merge_summary_224px", "Token merging vs the summary tokens' anomaly scores (224 px)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
