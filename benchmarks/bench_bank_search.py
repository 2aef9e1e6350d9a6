"""Benchmark: exact against inverted-list search of large real banks: speed, and the scores and alerts lists change.

    python benchmarks/bench_bank_search.py --product out/demo/model --product out/k48   # BENCHMARKS.md anomaly_search
    python benchmarks/bench_bank_search.py --product out/k48 --refs 500 --no-write

Central scores a frame by its farthest summary token's distance to the nearest token of the camera's bank. Up to
``tokenline.anomaly.EXHAUSTIVE_UP_TO`` bank tokens every bank token is searched (exact); a larger bank searches the
``anomaly.nprobe`` inverted lists nearest to each token, which may miss its nearest neighbour and then raise the
frame's score. This builds banks of every summary token of 500 and 1,000 NEU-DET images (central's builder,
whitened, no coreset: 8,000 / 16,000 tokens at K=16, 24,000 / 48,000 at K=48) from the exported models' own
summaries (ONNX Runtime, float tokens), scores the 200 images left out of both with each search, and reports per frame
the time (batches of 100, as the scorer takes its queue, and one frame per call), how many frames' scores differ
from the exact search's, by how much, and how many alerts (score over the set's threshold) appear or vanish.
Lists are searched by bound and refine like the exact search (tokenline.anomaly). Until 2026-12-04 the product
searched banks over 20,000 tokens by their lists (the `anomaly` section's latency tables were recorded then; their
rows name the search each measured); this study moved the limit to 100,000.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import write_section  # noqa: E402
from benchmarks.bench_anomaly import real_bank, real_tokens  # noqa: E402
from benchmarks.bench_summary import md_table  # noqa: E402
from tokenline import anomaly  # noqa: E402

SECTION = "anomaly_search"
NPROBES = (8, 16, 32, 64)


def per_frame_ms(bank: anomaly.Bank, q: np.ndarray, sizes: np.ndarray, runs: int) -> tuple:
    """(ms per frame in batches of 100, median over runs x batches; ms per frame one frame per call, median of 50)."""
    batched = []
    for _ in range(runs):
        for i in range(0, q.shape[0] - 99, 100):
            t = time.perf_counter()
            bank.score_arrays(q[i:i + 100], sizes[i:i + 100])
            batched.append((time.perf_counter() - t) * 10)
    one = []
    for i in range(50):
        t = time.perf_counter()
        bank.score_arrays(q[i:i + 1], sizes[i:i + 1])
        one.append((time.perf_counter() - t) * 1000)
    return statistics.median(batched), statistics.median(one)


def study(rt, name: str, n_ref: int, rest: np.ndarray, runs: int) -> List[dict]:
    ref = rt.split(n_ref)[0]
    s = rt.summary
    k = int(s.tokens.shape[1])
    bank = real_bank(rt, ref, max_tokens=len(ref) * k)  # every token of the set: no coreset
    q, sizes = np.asarray(s.tokens[rest], np.float32), np.asarray(s.sizes[rest], np.float32)
    exact = replace(bank, info=replace(bank.info, nprobe=bank.lists))  # nprobe covering every list: exhaustive
    want = exact.score_arrays(q, sizes).score
    thr = bank.info.threshold
    rows = []
    saved = anomaly.EXHAUSTIVE_UP_TO
    for label, nprobe in [("exhaustive", bank.lists)] + [(f"inverted lists, nprobe {p}", p) for p in NPROBES]:
        b = replace(bank, info=replace(bank.info, nprobe=nprobe))
        anomaly.EXHAUSTIVE_UP_TO = 0  # the bank's own rule aside: nprobe decides
        try:
            got = b.score_arrays(q, sizes).score
            batched, one = per_frame_ms(b, q, sizes, runs)
        finally:
            anomaly.EXHAUSTIVE_UP_TO = saved
        diff = got - want
        rows.append({"model": name, "frames": len(ref), "tokens": bank.size, "lists": bank.lists,
                     "threshold": f"{thr:.2f}", "median": f"{float(np.median(want)):.2f}", "search": label,
                     "batched": batched, "one": one, "differ": int((np.abs(diff) > 1e-3).sum()), "of": len(rest),
                     "largest": float(np.abs(diff).max()),
                     "alerts": f"{int((got > thr).sum())} ({int(((got > thr) & ~(want > thr)).sum())} new, "
                               f"{int((~(got > thr) & (want > thr)).sum())} lost)"})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--product", action="append", default=[], metavar="DIR", help="exported model directory")
    ap.add_argument("--refs", type=int, nargs="+", default=[500, 1000],
                    help="reference images per bank (NEU-DET's 1,200 images less the 200 scored)")
    ap.add_argument("--runs", type=int, default=5, help="timing rounds over the 200 scored images")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    products = args.product or ["out/demo/model", "out/k48"]

    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    rows: List[dict] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("banks", total=len(products) * len(args.refs))
        for p in products:
            rt = real_tokens(Path(p), progress)
            name = f"{rt.manifest.name} (K={rt.manifest.summary.k}, d={rt.manifest.summary.dim})"
            rest = rt.split(max(args.refs))[1]  # the scored images: in no bank (each bank the first n of one order)
            for n in args.refs:
                rows += study(rt, name, n, rest, args.runs)
                progress.advance(task)
    table = md_table(rows, [("model", "model", ""), ("frames", "set frames", ",d"), ("tokens", "bank tokens", ",d"),
                            ("lists", "lists", ",d"), ("threshold", "threshold", ""),
                            ("median", "median exact score", ""), ("search", "search", ""),
                            ("batched", "ms/frame, batches of 100", ".3f"), ("one", "ms/frame, one per call", ".3f"),
                            ("differ", "scores off by > 0.001", ",d"), ("of", "of frames", ",d"),
                            ("largest", "largest difference", ".3f"), ("alerts", "alerts (vs exhaustive)", "")])
    console.print(table)
    notes = []
    for r in rows:
        if r["search"] == "exhaustive":
            ex = r
        elif r["search"].endswith("nprobe 8"):
            notes.append(f"{r['model']}, {r['tokens']:,} tokens: nprobe 8 {ex['batched'] / r['batched']:.1f}x as fast "
                         f"as the exhaustive search ({r['batched']:.3f} against {ex['batched']:.3f} ms a frame in "
                         f"batches), {r['differ']} of {r['of']} scores off (largest {r['largest']:.2f}), alerts "
                         f"{r['alerts']} against {ex['alerts'].split(' ')[0]}")
    body = (__doc__.split("\n\n", 2)[2].strip() + "\n\n" + table + "\n\n" + "\n".join(f"- {n}." for n in notes)
            + f"\n- The product searches banks of up to {anomaly.EXHAUSTIVE_UP_TO:,} tokens exhaustively "
              "(tokenline.anomaly.EXHAUSTIVE_UP_TO), larger ones by `anomaly.nprobe` lists.\n")
    if args.write:
        write_section(SECTION, "Anomaly scoring: exact against inverted-list search of large real banks", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
