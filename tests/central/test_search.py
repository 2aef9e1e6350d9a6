"""Search on SQLite (equals exact brute force) and pgvector (recall@10 >= 0.95), MaxSim re-rank, filters,
never mixing models, and search by example image through the registered ONNX encoder."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from sqlalchemy.orm import Session

from central import store
from central.config import SearchConfig
from central.api.errors import http_status
from central.encoder import Encoder
from central.errors import Internal, Invalid
from central.search import Filters, Query, Searcher, maxsim_scores
from tests.central.conftest import make_message, tx, unit
from tests.support.tiny_model import build_tiny_model
from tokenline.manifest import Manifest
from tokenline.preprocess import preprocess

N = 1500
T0 = 1_700_000_000_000_000


def _populate(engine, manifest, n=N, seed=0):
    model = tx(engine, store.register_model, manifest)
    rng = np.random.default_rng(seed)
    centers = unit(rng, 20, manifest.embedding_dim)
    msgs = []
    for i in range(n):
        msgs.append(make_message(manifest, rng, site=f"s{i % 2}", line=f"l{i % 3}", camera=f"c{i % 4}",
                                 ts_us=T0 + i * 1_000_000, seq=i, center=centers[i % 20], noise=0.8))
    with Session(engine) as s, s.begin():
        for i in range(0, n, 500):
            store.insert_frames(s, [store.frame_row(m, model.id, T0) for m in msgs[i:i + 500]])
    return model, msgs, rng, centers


def _load_all(engine):
    from sqlalchemy import select

    from sql.models import Frame

    with Session(engine) as s:
        specs = {m.id: m.manifest.summary for m in store.list_models(s)}
        return [store.decode_frame(f, specs[f.model_id]) for f in s.scalars(select(Frame))]


def _brute(frames, model, q, flt, k):
    """Exact reference: cosine over every stored frame of the model that passes the filters."""
    ok = [f for f in frames if f.model_id == model.id
          and (flt.site is None or f.site == flt.site) and (flt.line is None or f.line == flt.line)
          and (flt.camera is None or f.camera == flt.camera)
          and (flt.since_us is None or f.capture_us >= flt.since_us)
          and (flt.until_us is None or f.capture_us < flt.until_us)]
    sims = np.array([float(f.summary.global_embedding @ q) for f in ok])
    order = sorted(range(len(ok)), key=lambda i: (-sims[i], ok[i].frame_id))[:k]
    return [ok[i] for i in order], sims[order]


FILTERS = [Filters(), Filters(site="s1"), Filters(line="l2", camera="c1"),
           Filters(since_us=T0 + 300_000_000, until_us=T0 + 900_000_000), Filters(site="nowhere")]


def test_global_knn_matches_brute_force(engine, tiny_manifest):
    model, msgs, rng, centers = _populate(engine, tiny_manifest)
    searcher = Searcher(engine, SearchConfig(rerank=False))
    pg = engine.dialect.name == "postgresql"
    recalls = []
    frames = _load_all(engine)
    for qi in range(10):
        q = unit(rng, 384) if qi % 2 else msgs[qi * 37].summary.global_embedding
        for flt in FILTERS:
            ref, ref_sims = _brute(frames, model, q, flt, 10)
            hits = searcher.search(model, Query(model.id, q), 10, flt)
            got = [h.frame_id for h in hits]
            want = [f.frame_id for f in ref]
            if not pg:  # SQLite: exact, same order, same scores
                assert got == want, flt
                assert np.allclose([h.global_score for h in hits], ref_sims, atol=1e-5)
            elif want:
                recalls.append(len(set(got) & set(want)) / len(want))
            for h in hits:  # filters are honoured either way
                assert flt.site in (None, h.frame.site) and flt.line in (None, h.frame.line)
    if pg:
        assert np.mean(recalls) >= 0.95, np.mean(recalls)


def test_maxsim_rerank_matches_reference(engine, tiny_manifest):
    model, msgs, rng, centers = _populate(engine, tiny_manifest, n=600)
    cfg = SearchConfig(candidates=50, rerank=True, rerank_weight=0.5)
    searcher = Searcher(engine, cfg)
    probe = msgs[5]
    q = Query(model.id, probe.summary.global_embedding, probe.summary.tokens, probe.summary.sizes,
              exclude_frame_id=probe.frame_id.hex())
    hits = searcher.search(model, q, 10)
    assert probe.frame_id.hex() not in [h.frame_id for h in hits]
    # reference: the same candidates (exact on SQLite), scored naively one by one
    cands = searcher.knn(model, probe.summary.global_embedding, 51, Filters())
    ref = []
    for row_id, g in cands:
        f = tx(engine, store.get_frames, [row_id], model)[row_id]
        if f.frame_id == probe.frame_id.hex():
            continue
        ms = np.mean([max(float(t @ d) for d in f.summary.tokens) for t in probe.summary.tokens / np.linalg.norm(probe.summary.tokens, axis=1, keepdims=True)])
        ref.append((0.5 * g + 0.5 * ms, f.frame_id))
    ref.sort(key=lambda t: -t[0])
    assert [h.frame_id for h in hits] == [fid for _, fid in ref[:10]]
    assert np.allclose([h.score for h in hits], [s for s, _ in ref[:10]], atol=1e-4)
    assert all(len(h.matches) == 3 and 0 <= h.matches[0]["x"] <= 1 for h in hits)
    # the cluster of the probe dominates the results
    assert sum(m.seq % 20 == 5 for m in msgs if m.frame_id.hex() in {h.frame_id for h in hits}) >= 8


def test_maxsim_scores_weighted_mean_of_best_matches():
    q = np.eye(3, 4, dtype=np.float32)
    docs = np.stack([np.eye(3, 4, dtype=np.float32), np.eye(3, 4, k=1, dtype=np.float32)])
    scores, best = maxsim_scores(q, np.array([1, 1, 2], np.float32), docs)
    assert np.allclose(scores, [1.0, 0.75])  # doc 2 misses query token 0 (weight 1/4) and best.shape == (2, 3)


def test_never_mixes_models(engine, tiny_manifest, tmp_path):
    model, msgs, rng, _ = _populate(engine, tiny_manifest, n=200)
    other_dir = build_tiny_model(tmp_path / "m2", size=32, patch=8, dim=384, seed=7, name="other-encoder")
    other = tx(engine, store.register_model, Manifest.from_file(other_dir))
    assert other.id != model.id
    om = [make_message(Manifest.from_file(other_dir), rng, seq=i) for i in range(50)]
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, other.id, T0) for m in om])
    searcher = Searcher(engine, SearchConfig())
    hits = searcher.search(other, Query(other.id, om[0].summary.global_embedding, om[0].summary.tokens,
                                        om[0].summary.sizes), 100)
    assert len(hits) == 50 and {h.frame.model_id for h in hits} == {other.id}
    small = build_tiny_model(tmp_path / "m3", size=32, patch=8, dim=64, seed=1, name="narrow")
    narrow = tx(engine, store.register_model, Manifest.from_file(small))
    with pytest.raises(Invalid):
        searcher.search(narrow, Query(narrow.id, om[0].summary.global_embedding), 5)


def test_search_by_example_image_finds_the_frame(engine, tiny_manifest, tiny_model_dir):
    """Frames encoded by the real ONNX encoder; a query image (re-encoded) finds its own frame first."""
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    enc = Encoder(model, ["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(40)]
    rows = []
    for i, img in enumerate(images):
        out = enc.encode_frame(img)
        m = make_message(tiny_manifest, rng, seq=i, ts_us=T0 + i)
        m = replace(m, summary=out)
        rows.append(store.frame_row(m, model.id, T0))
    with Session(engine) as s, s.begin():
        store.insert_frames(s, rows)
    import cv2

    ok, png = cv2.imencode(".png", images[17])
    q = enc.encode_image_bytes(png.tobytes())
    ref = enc.encode_pixels(preprocess(images[17], tiny_manifest.input))
    assert np.allclose(q.global_embedding, ref.global_embedding, atol=1e-6)
    hits = Searcher(engine, SearchConfig()).search(model, Query(model.id, q.global_embedding, q.tokens, q.sizes), 5)
    assert hits[0].frame_id == rows[17]["frame_id"] and hits[0].score > 0.99
    with pytest.raises(Invalid) as ei:
        enc.encode_image_bytes(b"\x00garbage")
    assert http_status(ei.value) == 400
    with pytest.raises(Invalid) as ei:
        enc.encode_text("scratch")
    assert ei.value.reason == "no_text_tower"


def test_index_follows_appends_and_sweeper_deletions(engine, tiny_manifest, tmp_path):
    from central.blobs import BlobStore
    from central.config import parse_config
    from central.retention import sweep

    model, msgs, rng, _ = _populate(engine, tiny_manifest, n=300)  # capture times T0 .. T0+299 s
    searcher = Searcher(engine, SearchConfig(rerank=False, max_results=1000))
    q = Query(model.id, msgs[0].summary.global_embedding)
    assert len(searcher.search(model, q, 1000)) == 300
    extra = [make_message(tiny_manifest, rng, seq=1000 + i, ts_us=T0 + 10**9) for i in range(5)]
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, model.id, T0) for m in extra])
    assert len(searcher.search(model, q, 1000)) == 305  # appended rows are seen at once
    now = T0 + 150 * 1_000_000 + 10 * 86_400_000_000  # frames older than T0+150 s are past 10 days
    rep = sweep(engine, BlobStore(tmp_path / "o"), parse_config(
        {"retention": {"originals_days": 1, "tokens_days": 10}}).retention, now=now)
    assert rep.tokens_deleted == 150
    hits = searcher.search(model, q, 1000)
    assert len(hits) == 155 and min(h.frame.capture_us for h in hits) >= T0 + 150 * 1_000_000
    assert tx(engine, store.counter_totals)["frames_deleted"] == 150


def _sqlite_engine(tmp_path):
    from sql.db import make_engine
    from sql.migrate import upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'central.db'}")  # the vector files are SQLite's
    upgrade(engine)
    return engine


def test_vector_index_loads_in_chunks_and_refuses_a_wrong_width_embedding(tmp_path, tiny_manifest):
    from sqlalchemy import text

    from central.search import VectorIndex

    engine = _sqlite_engine(tmp_path)
    model, msgs, _, _ = _populate(engine, tiny_manifest, n=50)
    whole = VectorIndex(engine, model.id, model.embedding_dim, tmp_path / "a")
    whole.sync()
    chunked = VectorIndex(engine, model.id, model.embedding_dim, tmp_path / "b")
    chunked._truncate_files()
    chunked._load_rows(chunk=7)  # 7 full chunks and a partial one
    assert whole.n == chunked.n == 50 and whole.last_id == chunked.last_id == int(whole.cols["ids"][-1])
    np.testing.assert_array_equal(whole.cols["ids"], chunked.cols["ids"])
    np.testing.assert_array_equal(np.asarray(whole.emb), np.asarray(chunked.emb))
    np.testing.assert_array_equal(whole.bits_t, chunked.bits_t)
    stored = {m.frame_id_hex: m.summary.global_embedding for m in msgs}
    with Session(engine) as s:
        rows = s.execute(text("SELECT id, frame_id FROM frames ORDER BY id")).all()
    for (rid, fid), e in zip(rows, np.asarray(whole.emb)):
        assert np.allclose(e, stored[fid], atol=1e-6)  # the raw float32 bytes are the stored embedding
    with engine.begin() as c:
        c.execute(text("UPDATE frames SET global_embedding = zeroblob(12) WHERE id = :i"), {"i": rows[3][0]})
    with pytest.raises(Internal) as ei:
        VectorIndex(engine, model.id, model.embedding_dim, tmp_path / "c").sync()
    assert http_status(ei.value) == 500 and f"frame row {rows[3][0]} has a 12-byte embedding" in str(ei.value)


def test_vector_files_survive_a_restart_and_follow_the_database(tmp_path, tiny_manifest):
    """A new process maps the files instead of reading the rows; appends and deletions made meanwhile are
    caught up; files written for another database are rebuilt, not trusted."""
    from central.search import binary_codes, hamming

    engine = _sqlite_engine(tmp_path)
    model, msgs, rng, _ = _populate(engine, tiny_manifest, n=400)
    cfg = SearchConfig(rerank=False, exact_max_rows=10, binary_candidates=400, ivf_rows=None)  # Hamming, all
    first = Searcher(engine, cfg)
    q = Query(model.id, msgs[7].summary.global_embedding)
    want = [h.frame_id for h in first.search(model, q, 20)]
    assert want[0] == msgs[7].frame_id_hex
    files = sorted(p.name for p in (tmp_path / "central.db.vectors" / f"m{model.id}").iterdir())
    assert {"emb", "bits", "ids", "ts", "alive", "meta.json"} <= set(files)
    extra = [make_message(tiny_manifest, rng, seq=900 + i, ts_us=T0 + 10**9) for i in range(3)]
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, model.id, T0) for m in extra])
    second = Searcher(engine, cfg)  # a restart: maps 400 rows, reads only the 3 new ones
    idx = second._vindex(model)
    loaded = []
    orig = idx._load_rows
    idx._load_rows = lambda *a, **kw: loaded.append(orig(*a, **kw)) or loaded[-1]
    assert [h.frame_id for h in second.search(model, q, 20)] == want
    assert loaded == [3] and idx.n == 403
    # 1-bit codes: Hamming distance is the number of differing signs
    e = np.stack([msgs[0].summary.global_embedding, -msgs[0].summary.global_embedding])
    c = binary_codes(e)
    assert hamming(np.ascontiguousarray(c.T), c[0]).tolist() == [0, 384]
    # another database under the same file name: the files do not match its rows and are rebuilt
    engine.dispose()
    (tmp_path / "central.db").unlink()
    for p in tmp_path.glob("central.db-*"):
        p.unlink()
    engine = _sqlite_engine(tmp_path)
    model2, msgs2, _, _ = _populate(engine, tiny_manifest, n=30, seed=5)
    hits = Searcher(engine, cfg).search(model2, Query(model2.id, msgs2[0].summary.global_embedding), 50)
    assert len(hits) == 30 and hits[0].frame_id == msgs2[0].frame_id_hex


def test_binary_prefilter_with_filters_matches_brute_force_when_candidates_cover(tmp_path, tiny_manifest):
    """SQLite above ``exact_max_rows``: Hamming candidates then exact scores. Filters are applied before the
    codes are compared, so a filter that leaves at most ``binary_candidates`` frames is answered exactly."""
    engine = _sqlite_engine(tmp_path)
    model, msgs, rng, _ = _populate(engine, tiny_manifest, n=N)
    frames = _load_all(engine)
    searcher = Searcher(engine, SearchConfig(rerank=False, exact_max_rows=100, binary_candidates=300, ivf_rows=None))
    for flt in [Filters(line="l2", camera="c1"), Filters(site="s1", since_us=T0 + 500_000_000, until_us=T0 + 900_000_000)]:
        for qi in range(5):
            q = unit(rng, 384)
            ref, ref_sims = _brute(frames, model, q, flt, 10)
            hits = searcher.search(model, Query(model.id, q), 10, flt)
            assert [h.frame_id for h in hits] == [f.frame_id for f in ref]
            assert np.allclose([h.global_score for h in hits], ref_sims, atol=1e-5)
    recalls = []  # unfiltered: 1,500 frames, 300 Hamming candidates
    for qi in range(10):
        q = msgs[qi * 97].summary.global_embedding
        ref, _ = _brute(frames, model, q, Filters(), 10)
        got = {h.frame_id for h in searcher.search(model, Query(model.id, q), 10)}
        recalls.append(len(got & {f.frame_id for f in ref}) / 10)
    assert np.mean(recalls) >= 0.9, recalls


def test_inverted_lists_above_exact_max_rows(tmp_path, tiny_manifest):
    """SQLite above ``exact_max_rows``: the files get inverted lists and a query scores exactly the rows of its
    nearest lists (recall against brute force), filters first; appended rows join their list; a restart reads the
    lists instead of training them; fourfold growth retrains; the sweeper's compaction keeps them aligned."""
    from central.blobs import BlobStore
    from central.config import parse_config
    from central.retention import sweep
    from central.search import LISTS_MIN, VectorIndex

    engine = _sqlite_engine(tmp_path)
    model, msgs, rng, centers = _populate(engine, tiny_manifest, n=N)
    frames = _load_all(engine)
    cfg = SearchConfig(rerank=False, exact_max_rows=100, ivf_rows=300)
    searcher = Searcher(engine, cfg)
    searcher.warm(model)
    idx = searcher._vindex(model)
    assert idx.centroids is not None and len(idx.centroids) == LISTS_MIN and idx.trained_rows == N
    lists = idx.cols["lists"]
    np.testing.assert_array_equal(lists, np.argmax(np.asarray(idx.emb) @ idx.centroids.T, axis=1))
    recalls = []
    for qi in range(0, N, 150):
        q = msgs[qi].summary.global_embedding
        ref, ref_sims = _brute(frames, model, q, Filters(), 10)
        hits = searcher.search(model, Query(model.id, q), 10)
        assert hits[0].frame_id == msgs[qi].frame_id_hex
        recalls.append(len({h.frame_id for h in hits} & {f.frame_id for f in ref}) / 10)
        got = {h.frame_id: h.global_score for h in hits}
        for f, sim in zip(ref, ref_sims):  # a frame found is scored exactly
            assert f.frame_id not in got or abs(got[f.frame_id] - sim) < 1e-5
    assert np.mean(recalls) >= 0.9, recalls
    flt = Filters(line="l2", camera="c1")  # 125 frames: above exact_max_rows, so through the lists
    for qi in range(5):
        q = centers[qi]
        ref, _ = _brute(frames, model, q, flt, 10)
        hits = searcher.search(model, Query(model.id, q), 10, flt)
        assert len(hits) == 10 and all(h.frame.line == "l2" and h.frame.camera == "c1" for h in hits)
        assert len({h.frame_id for h in hits} & {f.frame_id for f in ref}) >= 8
    # a filter that leaves few rows in the nearest lists: lists are added until k rows pass
    narrow = Searcher(engine, cfg.model_copy(update={"ivf_rows": 1}))
    assert len(narrow.search(model, Query(model.id, centers[0]), 10, flt)) == 10
    # appended rows join their nearest list and are found at once
    extra = [make_message(tiny_manifest, rng, seq=5000 + i, ts_us=T0 + 10**10 + i, center=centers[i])
             for i in range(5)]
    tx(engine, lambda s: store.insert_frames(s, [store.frame_row(m, model.id, T0) for m in extra]))
    hits = searcher.search(model, Query(model.id, extra[3].summary.global_embedding), 5)
    assert hits[0].frame_id == extra[3].frame_id_hex and idx.n == N + 5 and (idx.cols["lists"] >= 0).all()
    # a restart reads the centroids and lists: nothing is trained again
    again = VectorIndex(engine, model.id, model.embedding_dim, idx.dir, train_above=100)
    again._train = lambda: pytest.fail("a restart must not train the lists again")
    again.sync()
    np.testing.assert_array_equal(again.centroids, idx.centroids)
    np.testing.assert_array_equal(again.cols["lists"], idx.cols["lists"])
    # fourfold growth: trained again, with more lists
    more = [make_message(tiny_manifest, rng, seq=6000 + i, ts_us=T0 + 2 * 10**10 + i * 1_000_000,
                         center=centers[i % 20], noise=0.8) for i in range(3 * N - 5)]  # 4 x N rows in all
    for i in range(0, len(more), 1000):
        tx(engine, lambda s, part=more[i:i + 1000]: store.insert_frames(
            s, [store.frame_row(m, model.id, T0) for m in part]))
    hits = searcher.search(model, Query(model.id, more[77].summary.global_embedding), 5)
    assert hits[0].frame_id == more[77].frame_id_hex
    assert idx.trained_rows == 4 * N and len(idx.centroids) == round(np.sqrt(4 * N))
    # the sweeper deletes the first 1,500 frames (over a quarter): the files are compacted, lists follow
    now = T0 + N * 1_000_000 + 10 * 86_400_000_000
    rep = sweep(engine, BlobStore(tmp_path / "o"), parse_config(
        {"retention": {"originals_days": 1, "tokens_days": 10}}).retention, now=now)
    assert rep.tokens_deleted == N
    hits = searcher.search(model, Query(model.id, more[5].summary.global_embedding), 10)
    assert hits[0].frame_id == more[5].frame_id_hex and all(h.frame.capture_us >= T0 + 10**10 for h in hits)
    assert idx.n == 3 * N and len(idx.cols["lists"]) == idx.n  # compacted: a quarter were dead
    np.testing.assert_array_equal(idx.cols["lists"], np.argmax(np.asarray(idx.emb) @ idx.centroids.T, axis=1))
