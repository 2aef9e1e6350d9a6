"""Benchmark: merged vs unmerged ViT-S/14 on a GPU with torch fp16 at batch 1, 8 and 32 (latency and throughput).

Batch-1 latency on a GPU is where token merging is known to help least (research notes, section 1), and it is
how a Jetson serves one camera. For every batch size the encoders run side by side in interleaved rounds
(CUDA-synchronized wall time, warm-up first); the table gives the median latency per batch, images/s and the
speed-up against the unmerged encoder measured in the same rounds. Without a CUDA device the script says so
and, with --write, records that the timings could not be taken (it never writes made-up numbers).

    python benchmarks/bench_gpu.py                                      # reference checkpoint, defaults
    python benchmarks/bench_gpu.py --specs unmerged "a=5;r=16" --batches 1,8,32 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import write_section  # noqa: E402
from benchmarks.embed_cache import Spec, apply_spec, load_model  # noqa: E402

SECTION, TITLE = "merge_gpu", "Token merging on a GPU: torch fp16, batch 1 / 8 / 32"
# The schedules `tokenline-export export --budget` picked at 224 px (BENCHMARKS.md, merge_budget), plus ToMe's
# constant r = 16 for reference; see Spec.parse for the syntax.
DEFAULT_SPECS = ["unmerged", "a=0;r=16"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--specs", nargs="+", default=DEFAULT_SPECS, help="schedules (Spec.parse syntax); first = base")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median reported)")
    ap.add_argument("--iters", type=int, default=10, help="forward passes per round")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        msg = ("not measured: no CUDA device on this machine (torch "
               f"{torch.__version__}, CUDA available: no). Run `python benchmarks/bench_gpu.py` where a GPU is.")
        print(msg)
        if args.write:
            write_section(SECTION, TITLE, msg + "\n")
        return 1

    vit = load_model(args.image_size)
    specs = [Spec.parse(s, vit.cfg.depth) for s in args.specs]
    batches = [int(b) for b in args.batches.split(",")]
    dev = torch.device("cuda")
    vit = vit.to(dev).half()
    results: Dict[tuple, List[float]] = {}
    for b in batches:
        x = torch.randn(b, 3, args.image_size, args.image_size, device=dev, dtype=torch.float16)
        for _ in range(3):  # warm-up, every schedule
            for s in specs:
                apply_spec(vit, s)
                with torch.inference_mode():
                    vit(x)
        for rnd in range(args.rounds):
            for s in specs:
                apply_spec(vit, s)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.inference_mode():
                    for _ in range(args.iters):
                        vit(x)
                torch.cuda.synchronize()
                results.setdefault((b, s.key), []).append((time.perf_counter() - t0) / args.iters)
            print(f"\rbatch {b}: round {rnd + 1}/{args.rounds}", end="", flush=True)
        print()
    cols = ["schedule", "batch", "latency (ms, median)", "img/s", "speed-up vs unmerged"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for b in batches:
        base = results[(b, specs[0].key)]
        for s in specs:
            t = results[(b, s.key)]
            ratio = statistics.median(bb / tt for bb, tt in zip(base, t))
            md.append(f"| {s.key} | {b} | {1000 * statistics.median(t):.2f} | {b / statistics.median(t):.1f} | "
                      f"{ratio:.2f}x |")
    print("\n".join(md))
    if args.write:
        body = (f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, fp16, {args.image_size} px, "
                f"{args.rounds} interleaved rounds of {args.iters} passes; speed-up = median of per-round ratios.\n\n"
                + "\n".join(md) + "\n")
        write_section(SECTION, TITLE, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
