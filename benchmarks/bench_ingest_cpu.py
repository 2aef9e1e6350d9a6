"""Benchmark: where scoring's cost to ingest comes from: queueing the frames, or the scorer working beside ingest.

    python benchmarks/bench_ingest_cpu.py --product out/demo/model --product out/k48:int4   # BENCHMARKS.md ingest_cpu
    python benchmarks/bench_ingest_cpu.py --product out/k48:int4 --runs 2 --no-write

The `anomaly` section measures ingest with scoring off (no reference set) and on (a set: ingest queues each frame
in its transaction, the worker's scorer process scores the queue beside it). Ingest's own CPU time per message
rises with a set there, in its runs more with the export for flagging (K=48) than with the default export
(K=16), though the queueing code is the same. This takes the rise apart: ingest's process CPU time per message
(``Ingestor.process`` on SQLite, batches of 100, the NEU-DET images' real summaries through the exported model,
as `anomaly`'s in-process runs) in four modes, run in rounds with the order rotating, each mode's change taken
against the no-set run of its own round (median over rounds, sign-test 90% interval):

- ``no set``: the baseline;
- ``set, no scorer``: the set's 700 frames stored and its bank built, frames queued, nothing scoring them: the
  queueing alone (and the larger database);
- ``no set, busy neighbour``: no set, but a process on the other core searching a 10,000-token bank in a loop (the
  model's K and d): what a busy scorer's mere presence costs ingest on a 2-core machine;
- ``set and scorer``: `anomaly`'s scoring on.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import write_section  # noqa: E402
from benchmarks._timing import median_interval  # noqa: E402
from benchmarks.bench_anomaly import Stream, real_tokens  # noqa: E402
from benchmarks.bench_summary import md_table  # noqa: E402
from central.anomaly.process import one_blas_thread  # noqa: E402

SECTION = "ingest_cpu"
MODES = ("no set", "set, no scorer", "no set, busy neighbour", "set and scorer")


def neighbour(k: int, d: int, stop) -> None:  # noqa: ANN001 - a multiprocessing Event
    """A scorer-like load: batches of 100 frames of K tokens searched against 10,000 bank tokens, until stopped
    (started with one BLAS thread, as the scorer)."""
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((10_000, d)).astype(np.float32)
    q = rng.standard_normal((100 * k, d)).astype(np.float32)
    while not stop.is_set():
        (q @ bank.T).max(axis=1)


def ingest_cpu(mode: str, stream: Stream, tmp: Path, r: int, n: int) -> float:
    """Ingest's CPU µs per message over n messages in ``mode``."""
    from sqlalchemy.orm import Session

    from central import store
    from central.anomaly.alerts import AlertPublisher
    from central.anomaly.process import ScorerProcess
    from central.config import AnomalyConfig, IngestConfig
    from central.ingest import Incoming, Ingestor
    from sql.db import make_engine
    from sql.migrate import upgrade
    from tokenline import topics
    from tokenline.wire import encode

    engine = make_engine(f"sqlite:///{tmp / f'r{r}-{MODES.index(mode)}.db'}")
    upgrade(engine)
    with Session(engine) as s, s.begin():
        store.register_model(s, stream.manifest)
    cfg = AnomalyConfig(max_bank_tokens=10_000)
    if mode.startswith("set"):
        stream.create_set(engine, cfg)
    ctx = mp.get_context("spawn")
    stop, busy, scorer = ctx.Event(), None, None
    if mode == "no set, busy neighbour":
        busy = ctx.Process(target=neighbour, args=(stream.manifest.summary.k, stream.manifest.summary.dim, stop))
        with one_blas_thread():  # as the scorer
            busy.start()
        time.sleep(1.0)  # started and searching
    if mode == "set and scorer":
        scorer = ScorerProcess(engine, cfg, "bench-scorer", AlertPublisher(None))
        scorer.start()
    try:
        ing = Ingestor(engine, IngestConfig(), "bench")
        payloads = [Incoming(i, 1, topics.tokens_topic("s1", "dev1", "l1", "c1"), encode(m))
                    for i, m in enumerate(stream.msgs(n, 1_700_000_000_000_000 + r * n, False))]
        ing.process(payloads[:100])  # warm
        c0 = time.process_time()
        for i in range(100, n, 100):
            ing.process(payloads[i:i + 100])
        return (time.process_time() - c0) / (n - 100) * 1e6
    finally:
        stop.set()
        if busy is not None:
            busy.join()
        if scorer is not None:
            scorer.close()
        engine.dispose()


def study(product: str, dtype: str, runs: int, n: int, progress) -> List[dict]:
    rt = real_tokens(Path(product), progress)
    cpu: Dict[str, List[float]] = {m: [] for m in MODES}
    task = progress.add_task(f"{rt.manifest.name}: rounds", total=runs)
    with tempfile.TemporaryDirectory() as tmp:
        stream = Stream(Path(tmp), rt, dtype)
        for r in range(runs):
            order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
            for mode in order:
                cpu[mode].append(ingest_cpu(mode, stream, Path(tmp), r, n))
            progress.advance(task)
    name = f"{rt.manifest.name} (K={rt.manifest.summary.k}, d={rt.manifest.summary.dim}, {dtype})"
    rows = []
    for mode in MODES:
        row = {"model": name, "mode": mode, "us": statistics.median(cpu[mode]),
               "runs": ", ".join(f"{v:.0f}" for v in cpu[mode])}
        if mode != "no set":
            med, lo, hi = median_interval([b / a - 1 for a, b in zip(cpu["no set"], cpu[mode])])
            row["change"] = f"{100 * med:+.1f}% ({100 * lo:+.1f} to {100 * hi:+.1f})"
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--product", action="append", default=[], metavar="DIR[:DTYPE]",
                    help="exported model directory, optionally the wire's token dtype (int8 default, int4)")
    ap.add_argument("--runs", type=int, default=6, help="rounds of the four modes")
    ap.add_argument("--messages", type=int, default=4000, help="messages per run")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    products = args.product or ["out/demo/model", "out/k48:int4"]

    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    rows: List[dict] = []
    with Progress(console=console, transient=True) as progress:
        for p in products:
            path, _, dtype = p.partition(":")
            rows += study(path, dtype or "int8", args.runs, args.messages, progress)
    table = md_table(rows, [("model", "model", ""), ("mode", "mode", ""), ("us", "ingest CPU µs a message", ".0f"),
                            ("change", "against no set, same round (median, 90% interval)", ""),
                            ("runs", "each round", "")])
    console.print(table)
    body = (__doc__.split("\n\n", 2)[2].strip() + f"\n\n{args.runs} rounds of {args.messages:,} messages a run.\n\n"
            + table + "\n")
    if args.write:
        write_section(SECTION, "Central ingest: what scoring's cost is made of (queueing, a busy neighbour, both)",
                      body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
