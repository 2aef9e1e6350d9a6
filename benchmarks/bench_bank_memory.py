"""Benchmark: how much memory a loaded reference-set bank holds, per bank and for a plant's cameras.

    python benchmarks/bench_bank_memory.py                    # writes BENCHMARKS.md section bank_memory
    python benchmarks/bench_bank_memory.py --against 097433e  # also that commit's tokenline/anomaly.py, same files

Every scorer process (one beside each ingest worker) and every edge agent that scores locally keeps the bank of each
camera's reference set in memory (central.anomaly.scoring.Banks, tokenline.anomaly.Bank), so a plant with hundreds of
cameras multiplies it. This builds banks with the exports' token shapes (K=16, d=96: the default; K=48, d=64: the
export for flagging) at central's default `anomaly.max_bank_tokens` (10,000) and at 100,000 (the largest bank
searched exhaustively), in both metrics, through central's builder (synthetic tokens: the size depends on the
counts, not on what the tokens show), writes each bank's file and measures with tracemalloc what
``Bank.from_bytes`` of that file holds after it has scored 100 frames (what stays allocated: every array and cache
of the bank). With ``--against REF`` the same files are loaded by ``tokenline/anomaly.py`` as it was at git commit
REF, side by side.
"""

from __future__ import annotations

import argparse
import sys
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import write_section  # noqa: E402
from benchmarks.bench_refset_build import INFO, module_at, synthetic_frames  # noqa: E402
from benchmarks.bench_summary import md_table  # noqa: E402
from central.anomaly.bank import build_bank  # noqa: E402
from tokenline import anomaly  # noqa: E402

SECTION = "bank_memory"
SHAPES = (("default export", 16, 96), ("export for flagging", 48, 64))
CAMERAS = 100  # a plant's cameras with a reference set, for the per-scorer total


def held_bytes(module: Any, blob: bytes, queries: np.ndarray) -> int:
    """Bytes still allocated after ``module.Bank.from_bytes(blob)`` has scored ``queries`` (the bank kept alive)."""
    sizes = np.full(queries.shape[:2], 16.0, np.float32)
    tracemalloc.start()
    try:
        bank = module.Bank.from_bytes(blob)
        bank.score_arrays(queries, sizes)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del bank
    return held


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[10_000, 100_000], help="bank sizes in tokens")
    ap.add_argument("--against", metavar="REF", help="git commit whose tokenline/anomaly.py loads the same files")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    from rich.console import Console

    console = Console()
    old = module_at(args.against, "tokenline/anomaly.py") if args.against else None
    rows: List[dict] = []
    for label, k, d in SHAPES:
        for m in args.tokens:
            frames = synthetic_frames(-(-m // k), k, d)
            queries = synthetic_frames(100, k, d, seed=1).tokens
            for metric in anomaly.METRICS:
                bank = build_bank(frames, replace(INFO, metric=metric), m, 0.99, threshold=1.0).bank
                blob = bank.to_bytes()
                row = {"shape": f"{label} (K={k}, d={d})", "tokens": bank.size, "metric": bank.info.metric,
                       "file": len(blob) / 1e6, "held": held_bytes(anomaly, blob, queries) / 1e6}
                row["per_token"] = row["held"] * 1e6 / bank.size
                row["plant"] = row["held"] * CAMERAS / 1e3
                if old is not None:
                    row["old"] = held_bytes(old, blob, queries) / 1e6
                    row["ratio"] = row["old"] / row["held"]
                rows.append(row)
                console.print(f"{row['shape']} {row['tokens']:,} tokens {metric}: {row['held']:.1f} MB held"
                              + (f" ({row['old']:.1f} MB at {args.against})" if old is not None else ""))
    cols = [("shape", "tokens", ""), ("tokens", "bank tokens", ",d"), ("metric", "metric", ""),
            ("file", "bank file (MB)", ".1f"), ("held", "held in memory (MB)", ".1f"),
            ("per_token", "bytes per token", ",.0f"), ("plant", f"{CAMERAS} cameras' banks (GB)", ".2f")]
    if old is not None:
        cols += [("old", f"held at {args.against} (MB)", ".1f"), ("ratio", f"{args.against} / today", ".2f")]
    table = md_table(rows, cols)
    console.print(table)
    body = (__doc__.split("\n\n", 2)[2].strip() + "\n\n" + table + "\n\n"
            f"- {CAMERAS} cameras' banks: what each scorer process (one beside every ingest worker) holds for a "
            f"plant with {CAMERAS} cameras with a reference set; an edge agent holds its own camera's bank.\n")
    if args.write:
        write_section(SECTION, "Reference sets: a loaded bank's memory", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
