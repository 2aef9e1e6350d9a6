"""Schema, migrations and the store on SQLite and PostgreSQL: models, frames (dedupe), tokens, counters."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from central import store
from sql.migrate import current, downgrade, upgrade
from sql.models import Frame
from sql.types import (pack_f32, pack_footprint, pack_tokens, token_bits, unpack_f32_rows, unpack_footprint,
                       unpack_footprints, unpack_token_rows, unpack_tokens)
from tests.central.conftest import make_message, tx, unit


def test_migration_creates_schema_and_downgrades(engine):
    assert current(engine) == "0007"
    names = set(inspect(engine).get_table_names())
    assert {"devices", "models", "frames", "originals", "dead_letters", "api_tokens", "counters", "reference_sets",
            "reference_frames", "frame_scores"} <= names
    if engine.dialect.name == "sqlite":
        with engine.connect() as c:
            assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    else:  # frames partitioned by segment: the kept segment 0 and the hot segment 1
        with engine.connect() as c:
            assert c.execute(text("SELECT id, state FROM frame_segments ORDER BY id")).all() == [(0, "kept"), (1, "hot")]
            parts = c.execute(text("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                   "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'frames'")).scalars()
            assert sorted(parts) == ["frames_s0", "frames_s1"]
    downgrade(engine, "base")
    assert "frames" not in set(inspect(engine).get_table_names())
    upgrade(engine)
    assert current(engine) == "0007"


def test_frame_metadata_migration_keeps_older_rows(engine, tiny_manifest):
    """0001 -> 0002 adds frames.source and frames.labels, 0005 frames.footprint and frames.geometry (NULL for the
    rows already there) and back."""
    downgrade(engine, "0001")
    model = tx(engine, store.register_model, tiny_manifest)
    row = store.frame_row(make_message(tiny_manifest, np.random.default_rng(0)), model.id, 1)
    row = {k: v for k, v in row.items() if k not in ("source", "labels", "footprint", "geometry")}
    with Session(engine) as s, s.begin():
        s.execute(Frame.__table__.insert().values(**row))  # what 0001's code stored
    upgrade(engine)
    assert {"source", "labels"} <= {c["name"] for c in inspect(engine).get_columns("frames")}
    with Session(engine) as s:
        fr = store.get_frame(s, row["frame_id"])
    assert fr.source is None and fr.labels is None and fr.summary.footprint is None and fr.geometry is None
    assert {"footprint", "geometry"} <= {c["name"] for c in inspect(engine).get_columns("frames")}
    downgrade(engine, "0001")
    assert "labels" not in {c["name"] for c in inspect(engine).get_columns("frames")}
    upgrade(engine)


def test_migration_0003_keeps_frames_both_ways(engine, tiny_manifest):
    """Frames stored before the segments (revision 0001) survive the upgrade (held ones into the kept segment)
    and the downgrade, with their ids."""
    downgrade(engine, "0001")
    model = tx(engine, store.register_model, tiny_manifest)
    rng = np.random.default_rng(4)
    rows = [store.frame_row(make_message(tiny_manifest, rng, seq=i), model.id, 0) for i in range(4)]
    rows = [{k: v for k, v in r.items() if k not in ("source", "labels", "footprint", "geometry")}
            for r in rows]  # 0001's columns
    rows[1]["legal_hold"] = True
    with Session(engine) as s, s.begin():
        s.execute(Frame.__table__.insert(), [{**r, "global_embedding": r["global_embedding"]} for r in rows])
    with engine.connect() as c:
        before = c.execute(text("SELECT id, frame_id FROM frames ORDER BY id")).all()
    upgrade(engine)
    with engine.connect() as c:
        assert c.execute(text("SELECT id, frame_id FROM frames ORDER BY id")).all() == before
        if engine.dialect.name == "postgresql":
            held = c.execute(text("SELECT frame_id FROM frames WHERE segment = 0")).scalars().all()
            assert held == [rows[1]["frame_id"]]
    with Session(engine) as s, s.begin():  # new frames after the old ones
        assert store.insert_frames(s, [store.frame_row(make_message(tiny_manifest, rng, seq=9), model.id, 0)]) == 1
    downgrade(engine, "0001")
    with engine.connect() as c:
        after = c.execute(text("SELECT id, frame_id FROM frames ORDER BY id")).all()
    assert after[:4] == before and len(after) == 5 and after[4][0] > before[-1][0]
    upgrade(engine)


def test_migration_0007_keeps_the_sets_banks_current(engine, tiny_manifest):
    """Sets made before 0007 had their bank built with each change: after it they are ready at their version."""
    downgrade(engine, "0006")
    model = tx(engine, store.register_model, tiny_manifest)
    with engine.begin() as c:
        c.execute(text("INSERT INTO reference_sets (name, model_id, site, line, camera, mode, threshold_mode, quantile, "
                       "threshold, version, frame_count, bank_tokens, bank, created_us, updated_us) VALUES "
                       "('old', :m, 's1', 'l1', 'c1', 'tokens', 'quantile', 0.99, 0.3, 4, 2, 32, :b, 0, 0)"),
                  {"m": model.id, "b": b"bank bytes"})
    upgrade(engine)
    with engine.connect() as c:
        assert c.execute(text("SELECT version, bank_version, build_error FROM reference_sets")).one() == (4, 4, None)
    downgrade(engine, "0006")
    assert "bank_version" not in {c["name"] for c in inspect(engine).get_columns("reference_sets")}
    upgrade(engine)


def test_register_model_is_idempotent(engine, tiny_manifest, tiny_model_dir):
    a = tx(engine, store.register_model, tiny_manifest)
    b = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    assert a.id == b.id and b.model_dir == str(tiny_model_dir.resolve())
    assert a.hash16 == tiny_manifest.hash_bytes().hex() and (a.embedding_dim, a.k) == (384, 16)


def test_frames_roundtrip_and_duplicates_dropped(engine, tiny_manifest):
    model = tx(engine, store.register_model, tiny_manifest)
    rng = np.random.default_rng(1)
    msgs = [make_message(tiny_manifest, rng, seq=i) for i in range(5)]
    rows = [store.frame_row(m, model.id, store.now_us()) for m in msgs]
    with Session(engine) as s, s.begin():
        assert store.insert_frames(s, rows + rows[:2]) == 5  # duplicates inside the batch
    with Session(engine) as s, s.begin():
        assert store.insert_frames(s, rows[3:]) == 0  # and across batches
    with Session(engine) as s:
        assert s.scalar(select(Frame.id).order_by(Frame.id.desc()).limit(1)) is not None
        assert len(s.scalars(select(Frame.frame_id)).all()) == 5
    fr = tx(engine, store.get_frame, msgs[2].frame_id.hex())
    tol = 2e-3 if engine.dialect.name == "postgresql" else 1e-6  # halfvec on PostgreSQL
    assert np.allclose(fr.summary.global_embedding, msgs[2].summary.global_embedding, atol=tol)
    cos = (fr.summary.tokens * msgs[2].summary.tokens).sum(1) / np.linalg.norm(fr.summary.tokens, axis=1)
    assert cos.min() > 0.999
    assert np.array_equal(fr.summary.centroids, msgs[2].summary.centroids) and fr.seq == 2


def test_token_packing_keeps_cosine():
    rng = np.random.default_rng(0)
    t = unit(rng, 16, 384)
    back = unpack_tokens(pack_tokens(t), 16, 384)
    cos = (t * back).sum(1) / np.linalg.norm(back, axis=1)
    assert cos.min() > 0.999
    with pytest.raises(ValueError):
        unpack_tokens(pack_tokens(t)[:-1], 16, 384)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("mode", ["int8", "int4", "fp16"])
def test_stored_tokens_are_exactly_the_decoded_ones(engine, tiny_manifest, mode, version):
    """An int8 or int4 message's token rows are stored as they arrived (no second rounding; int4 in its own,
    half-size layout): reading the frame back gives exactly the decoded tokens, so central scores what an edge
    scoring its own tokens scores. fp16 tokens are packed from the decoded floats as int8."""
    from tokenline import wire

    model = tx(engine, store.register_model, tiny_manifest)
    msg = wire.decode(wire.encode(make_message(tiny_manifest, np.random.default_rng(4)), mode, version=version))
    assert msg.version == version and (msg.raw_rows is not None) == (mode != "fp16")
    row = store.frame_row(msg, model.id, store.now_us())
    k, d = msg.summary.tokens.shape
    if mode != "fp16":
        assert row["tokens"] == msg.raw_rows
    assert len(row["tokens"]) == k * (4 + ((d + 1) // 2 if mode == "int4" else d))
    with Session(engine) as s, s.begin():
        assert store.insert_frames(s, [row]) == 1
    back = tx(engine, store.get_frame, msg.frame_id.hex()).summary.tokens
    if mode != "fp16":
        np.testing.assert_array_equal(back, msg.summary.tokens)
        np.testing.assert_array_equal(back, wire.as_decoded(msg.summary.tokens, mode))
    else:
        assert np.abs(back - msg.summary.tokens).max() < 0.01 * np.abs(msg.summary.tokens).max()
    # a summary replaced after decoding is stored as it is now, not as the rows that arrived
    other = replace(msg, frame_id=bytes(16), summary=replace(msg.summary, tokens=-msg.summary.tokens))
    assert other.token_rows() is None
    np.testing.assert_allclose(unpack_tokens(store.frame_row(other, model.id, 0)["tokens"], k, d),
                               -msg.summary.tokens, atol=0.01)


@pytest.mark.parametrize("d", [1, 2, 7, 64])
def test_token_blobs_of_both_layouts_decode_together(d):
    """Frames of one model may arrive as int8 and as int4 (edges configured differently): their blobs tell the
    layouts apart by length for every d (int4 rows of d = 1 are stored widened to int8) and decode in one call,
    in order, to exactly the decoded values; a blob of neither length is refused."""
    from tokenline import wire
    from tokenline.frame_id import new_frame_id
    from tokenline.summary import Summary

    rng, k, t0 = np.random.default_rng(d), 5, 1_700_000_000_000_000
    blobs, want = [], []
    for i in range(6):
        summ = Summary(unit(rng, 8), unit(rng, k, d) * rng.uniform(0.2, 1, (k, 1)).astype(np.float32),
                       np.ones(k, np.float32), rng.uniform(0, 1, (k, 2)).astype(np.float32))
        msg = wire.decode(wire.encode(wire.TokenMessage(new_frame_id(t0 + i), "d", "s", "l", "c", t0, i, bytes(16),
                                                        summ), ("int8", "int4", "fp16")[i % 3]))
        blobs.append(store.stored_tokens(msg))
        want.append(msg.summary.tokens)
    assert [token_bits(len(b), k, d) for b in blobs] == [8, 4 if d > 1 else 8, 8] * 2
    got = unpack_token_rows(blobs, k, d)
    assert got.shape == (6, k, d)
    for i in (0, 1, 3, 4):  # int8 and int4: exactly; fp16 was packed to int8
        np.testing.assert_array_equal(got[i], want[i])
    np.testing.assert_allclose(got[2], want[2], atol=0.01)
    with pytest.raises(ValueError, match="does not hold"):
        unpack_token_rows([blobs[0][:-1]], k, d)


@pytest.mark.parametrize("k", [16, 64])
def test_footprints_and_float_rows_decode_together(k):
    """The scorer's batch decoders give what the per-row ones give: footprints in nibbles (K <= 16) or bytes
    (K > 16), float32 rows of any shape; a footprint blob of another length is refused."""
    rng, grid = np.random.default_rng(k), (16, 16)
    fps = [rng.integers(0, k, grid).astype(np.uint8) for _ in range(5)]
    blobs = [pack_footprint(f) for f in fps]
    assert len(blobs[0]) == (128 if k <= 16 else 256)
    np.testing.assert_array_equal(unpack_footprints(blobs, grid), np.stack(fps))
    np.testing.assert_array_equal(unpack_footprints(blobs, grid)[3], unpack_footprint(blobs[3], grid))
    for bad in (blobs[:2] + [blobs[2][:-1]], [blobs[0][:-1], blobs[1] + b"\0"], [blobs[0] + b"\0"]):
        with pytest.raises(ValueError, match="do not fit"):
            unpack_footprints(bad, grid)
    cents = [rng.uniform(0, 1, (k, 2)).astype(np.float32) for _ in range(4)]
    np.testing.assert_array_equal(unpack_f32_rows([pack_f32(c) for c in cents], (k, 2)), np.stack(cents))


def test_api_tokens_hashed_with_roles(engine):
    tok = tx(engine, store.create_token, "qa-anna", "viewer")
    assert tx(engine, store.lookup_token, tok) == ("qa-anna", "viewer")
    assert tx(engine, store.lookup_token, tok + "x") is None
    with engine.connect() as c:
        stored = c.execute(text("SELECT token_sha256 FROM api_tokens")).scalar()
    assert tok not in stored and len(stored) == 64
    assert tx(engine, store.revoke_tokens, "qa-anna") == 1
    assert tx(engine, store.lookup_token, tok) is None
    with pytest.raises(ValueError):
        tx(engine, store.create_token, "x", "root")


def test_counters_accumulate(engine):
    with Session(engine) as s, s.begin():
        store.add_counters(s, "w1", {"stored": 3, "dead_letters": 1})
    with Session(engine) as s, s.begin():
        store.add_counters(s, "w1", {"stored": 2, "dead_letters": 0})
        store.add_counters(s, "w2", {"stored": 1})
        store.add_counters(s, "w2", {})
    assert tx(engine, store.counter_totals) == {"stored": 6, "dead_letters": 1}
    with engine.connect() as c:  # one row per (worker, name), none for a zero delta
        assert c.execute(text("SELECT worker, name, value FROM counters ORDER BY worker, name")).all() == [
            ("w1", "dead_letters", 1), ("w1", "stored", 5), ("w2", "stored", 1)]


def _race(engine, work) -> list:
    """Run ``work(session, reverse)`` for reverse False and True in two threads started together, each in a
    transaction of its own; returns the exceptions they raised."""
    import threading

    errors, barrier = [], threading.Barrier(2)

    def go(reverse: bool) -> None:
        barrier.wait(30)
        try:
            with Session(engine) as s, s.begin():
                work(s, reverse)
        except Exception as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(r,)) for r in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


def test_redelivered_batches_in_opposite_orders_do_not_deadlock(engine, tiny_manifest):
    """Two workers committing the same frames (a redelivery) in opposite arrival orders: rows are written in frame
    id order, so the second waits for the first and then finds its rows taken (a unique violation, which ingest
    resolves message by message), never a deadlock (PostgreSQL aborted one of the pair with "deadlock detected"
    when rows were copied in arrival order, every time at this size). Row ids follow frame id order."""
    from sqlalchemy.exc import IntegrityError

    model = tx(engine, store.register_model, tiny_manifest)
    rng = np.random.default_rng(3)
    for r in range(3):
        rows = [store.frame_row(make_message(tiny_manifest, rng, ts_us=1_700_000_000_000_000 + r * 10 ** 7 + i,
                                             seq=i), model.id, 1) for i in range(2000)]
        errors = _race(engine, lambda s, rev: store.insert_new_frames(s, rows[::-1] if rev else rows))
        assert all(isinstance(e, IntegrityError) for e in errors), errors
    with Session(engine) as s:
        fids = list(s.scalars(select(Frame.frame_id).order_by(Frame.id)))
    assert len(fids) == 6000 and fids == sorted(fids)


def test_device_rows_are_written_in_one_order(engine):
    """The devices a batch touches are upserted in device order: two batches naming the same devices in opposite
    orders do not deadlock."""
    for r in range(3):
        seen = {f"d{r}-{i:04d}": ("s1", 1000 + i) for i in range(3000)}
        errors = _race(engine, lambda s, rev: store.touch_devices(
            s, dict(reversed(list(seen.items()))) if rev else seen))
        assert not errors, errors
    assert len(tx(engine, store.list_devices)) == 9000
