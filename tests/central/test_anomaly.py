"""Anomaly scoring at central on SQLite and PostgreSQL: a reference set built through the API, frames scored by a
real ingest worker through a real Mosquitto, alerts for odd frames only, the reads for the page, backfill, the
reference-set lifecycle, retention of scores, the webhook."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from central import store
from central.anomaly import refsets
from central.anomaly.alerts import AlertPublisher, Webhook
from central.anomaly.scoring import Scorer
from central.anomaly.bank import (WHITEN_MIN_TOKENS_PER_DIM, SetFrames, build_bank, fit_whitening, greedy_coreset,
                                  rounding_floor)
from central.api import create_app
from central.blobs import BlobStore
from central.config import AnomalyConfig, IngestConfig, WebhookConfig
from central.ingest import Incoming, Ingestor
from central.retention import sweep
from sql.db import is_postgres, make_engine
from sql.models import Frame, FrameScore, ScoreQueue
from tests.central.conftest import built_set, config_for, tx
from tests.central.test_ingest import LogTail, _publish_all, _publisher, _wait_for
from tests.support.anomaly_frames import frame_message, unit
from tests.support.mqtt_sub import Collector
from tokenline import anomaly as anomaly_contract
from tokenline import topics
from tokenline.anomaly import Bank, BankInfo
from tokenline.wire import encode

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_000_000


def _store(engine, model_id: int, msgs) -> None:
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, model_id, store.now_us()) for m in msgs])


def _api(engine, db_url, tmp_path, **sections):
    client = TestClient(create_app(config_for(tmp_path, db_url, **sections), engine))
    toks = {r: {"Authorization": "Bearer " + tx(engine, store.create_token, r, r)} for r in ("viewer", "admin")}
    return client, toks


def _ingest_worker(tmp_path: Path, db_url: str, broker) -> subprocess.Popen:
    cfg = tmp_path / "ingest.yaml"
    cfg.write_text(json.dumps({
        "database": {"url": db_url},
        "mqtt": {"host": broker.host, "port": broker.port, "client_id": "central-anomaly", "group": "g1"},
        "ingest": {"batch_max": 100, "batch_linger_ms": 100},
        "originals": {"root": str(tmp_path / "originals")}}))
    return subprocess.Popen([sys.executable, "-m", "central.cli", "--config", str(cfg), "--log-level", "DEBUG",
                             "ingest", "--no-migrate"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def test_reference_set_from_the_api_then_ingest_scores_alerts_odd_frames_only_and_backfill(
        engine, db_url, mosquitto, tmp_path, tiny_manifest, tiny_model_dir):
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    rng = np.random.default_rng(0)
    history = [frame_message(tiny_manifest, rng, T0 + i * 1000, seq=i) for i in range(40)]
    _store(engine, model.id, history)  # stored before any reference set: unscored
    client, toks = _api(engine, db_url, tmp_path)

    body = {"name": "good plates", "frame_ids": [m.frame_id.hex() for m in history[:30]], "quantile": 1.0}
    assert client.post("/v1/reference-sets", json=body, headers=toks["viewer"]).status_code == 403
    r = client.post("/v1/reference-sets", json=body, headers=toks["admin"], params={"wait": True})
    assert r.status_code == 201, r.text
    rs = r.json()
    assert (rs["site"], rs["line"], rs["camera"], rs["model_id"], rs["frame_count"], rs["version"]) == \
        ("s1", "l1", "c1", model.id, 30, 1)
    assert rs["bank_tokens"] == 30 * 16 and rs["threshold_mode"] == "quantile" and rs["threshold"] > 0
    assert rs["metric"] == "cosine"  # 480 tokens of 384 dims: too few to whiten by (WHITEN_MIN_TOKENS_PER_DIM)

    worker = _ingest_worker(tmp_path, db_url, mosquitto)
    log = LogTail(worker)
    alerts = Collector(mosquitto.host, mosquitto.port, topic=topics.ALERTS_FILTER)
    pub = _publisher(mosquitto)
    try:
        log.wait("subscribed as group", 1, timeout=120)  # a loaded machine starts it slowly
        normal = [frame_message(tiny_manifest, rng, T0 + 10**9 + i, seq=100 + i) for i in range(8)]
        odd = [frame_message(tiny_manifest, rng, T0 + 2 * 10**9 + i, seq=200 + i, odd=j) for i, j in ((0, 5), (1, 11))]
        live = normal[:4] + odd[:1] + normal[4:] + odd[1:]
        _publish_all(pub, [(topics.tokens_topic("s1", "d1", "l1", "c1"), encode(m, "int8"), False) for m in live])
        assert _wait_for(lambda: tx(engine, lambda s: s.scalar(select(func.count()).select_from(FrameScore))) == 10,
                         30), "".join(log.lines[-30:])
        with Session(engine) as s:
            rows = {r.frame_id: r for r in s.scalars(select(FrameScore))}
        for m in normal:
            r = rows[m.frame_id.hex()]
            assert not r.flagged and r.score <= r.threshold and (r.set_id, r.set_version) == (rs["id"], 1)
        for m, j in zip(odd, (5, 11)):
            r = rows[m.frame_id.hex()]
            assert r.flagged and r.score > r.threshold and r.token == j
            cx, cy = m.summary.centroids[j]
            assert (r.x0, r.y0, r.x1, r.y1) == pytest.approx((cx - 0.125, cy - 0.125, cx + 0.125, cy + 0.125),
                                                          abs=1e-4)  # centroids travel quantised
        assert alerts.wait_for(lambda c: len(c.raw) >= 2, 10)
        time.sleep(0.5)
        got = [topics.parse_alert(p) for t, p, _ in alerts.raw]
        assert [a.frame_id for a in got] == [m.frame_id.hex() for m in odd]  # odd frames only, once each
        assert all(t == topics.alert_topic("s1", "d1", "l1", "c1") for t, _, _ in alerts.raw)
        assert {(a.source, a.reference_set, a.set_version, a.model) for a in got} == \
            {("central", rs["id"], 1, model.hash16)}
        assert [a.token for a in got] == [5, 11]
        late = Collector(mosquitto.host, mosquitto.port, topic=topics.ALERTS_FILTER)  # retained: the latest one
        assert late.wait_for(lambda c: len(c.raw) == 1, 10)
        assert late.raw[0][2] and topics.parse_alert(late.raw[0][1]).frame_id == odd[1].frame_id.hex()
        late.close()
        # a redelivered odd frame is a duplicate: no second score, no second alert
        _publish_all(pub, [(topics.tokens_topic("s1", "d1", "l1", "c1"), encode(odd[0], "int8"), False)])
        assert _wait_for(lambda: tx(engine, store.counter_totals).get("duplicates", 0) == 1)
        time.sleep(0.5)
        assert len(alerts.raw) == 2
    finally:
        worker.terminate()
        worker.wait(10)
        alerts.close()
        pub.loop_stop()
        pub.disconnect()
    totals = tx(engine, store.counter_totals)
    assert totals["frames_scored"] == 10 and totals["anomaly_alerts"] == 2
    m = client.get("/metrics").text
    assert "tokenline_anomaly_alerts_total 2" in m and "tokenline_frames_scored_total 10" in m

    # the reads the page builds on
    v = toks["viewer"]
    top = client.get("/v1/anomalies", params={"sort": "-score", "limit": 3}, headers=v).json()["results"]
    assert [x["frame_id"] for x in top[:2]] == sorted((m.frame_id.hex() for m in odd),
                                                      key=lambda f: -rows[f].score)
    assert top[0]["region"]["box"] == pytest.approx([rows[top[0]["frame_id"]].x0, rows[top[0]["frame_id"]].y0,
                                                     rows[top[0]["frame_id"]].x1, rows[top[0]["frame_id"]].y1],
                                                    abs=1e-4)
    flagged = client.get("/v1/anomalies", params={"flagged": True, "sort": "time"}, headers=v).json()["results"]
    assert [x["frame_id"] for x in flagged] == [m.frame_id.hex() for m in odd]
    cut = (max(rows[m.frame_id.hex()].score for m in normal) + min(rows[m.frame_id.hex()].score for m in odd)) / 2
    assert len(client.get("/v1/anomalies", params={"min_score": cut}, headers=v).json()["results"]) == 2
    assert client.get("/v1/anomalies", params={"camera": "other"}, headers=v).json()["results"] == []
    some = [odd[1].frame_id.hex(), normal[0].frame_id.hex(), history[0].frame_id.hex()]  # history: unscored yet
    got = client.get("/v1/anomalies", params={"frame_id": some, "sort": "time"}, headers=v).json()["results"]
    assert [(x["frame_id"], x["flagged"]) for x in got] == [(some[1], False), (some[0], True)]
    bad = client.get("/v1/anomalies", params={"frame_id": "nope"}, headers=v)
    assert bad.status_code == 400 and bad.json()["error"] == "bad_frame_id"
    latest = client.get("/v1/anomalies/latest", params={"per_camera": 1}, headers=v).json()["cameras"]
    assert len(latest) == 1 and latest[0]["reference_set"] == rs["id"]
    assert [f["frame_id"] for f in latest[0]["frames"]] == [odd[1].frame_id.hex()]
    one = client.get(f"/v1/frames/{odd[0].frame_id.hex()}/anomaly", headers=v).json()
    assert one["token"] == 5 and one["flagged"] and "mask" not in one["region"] or one["region"]["mask"] is None
    nf = client.get(f"/v1/frames/{history[35].frame_id.hex()}/anomaly", headers=v)
    assert nf.status_code == 404 and nf.json()["error"] == "not_scored"
    assert client.get(f"/v1/frames/{'f' * 32}/anomaly", headers=v).json()["error"] == "not_found"
    for path in ("/v1/anomalies", "/v1/anomalies/latest", f"/v1/frames/{odd[0].frame_id.hex()}/similar-region"):
        r = client.get(path, params={"since_us": 10, "until_us": 10}, headers=v)  # filters checked as in search
        assert r.status_code == 422 and r.json()["parameter"] == "until_us", (path, r.text)
        r = client.get(path, params={"camera": "../c1"}, headers=v)
        assert r.status_code == 422 and r.json()["parameter"] == "camera", (path, r.text)
    sim = client.get(f"/v1/frames/{odd[0].frame_id.hex()}/similar-region", params={"k": 5}, headers=v).json()
    assert sim["query"]["token"] == 5 and len(sim["results"]) == 5
    assert odd[0].frame_id.hex() not in {h["frame_id"] for h in sim["results"]}
    with Session(engine) as s:  # brute force over the stored (quantised) tokens of every other frame
        stored = {m.frame_id.hex(): store.get_frame(s, m.frame_id.hex()).summary for m in history + normal + odd}
    q = stored[odd[0].frame_id.hex()].tokens[5]
    q = q / np.linalg.norm(q)
    best = {f: float(np.max(np.where(sm.sizes > 0, sm.tokens @ q, -np.inf))) for f, sm in stored.items()
            if f != odd[0].frame_id.hex()}
    want = sorted(best, key=lambda f: -best[f])[:5]
    assert [h["frame_id"] for h in sim["results"]] == want
    assert [h["sim"] for h in sim["results"]] == pytest.approx([best[f] for f in want], abs=1e-5)

    # backfill: the 40 frames stored before the set, with a progress bar
    out = subprocess.run([sys.executable, "-m", "central.cli", "--db", db_url, "backfill"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "40/40" in out.stdout and "40 frame(s) scored" in out.stdout
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(FrameScore)) == 50
        hist = {r.frame_id: r for r in s.scalars(select(FrameScore).where(FrameScore.frame_id.in_(
            [m.frame_id.hex() for m in history])))}
    assert len(hist) == 40 and not any(r.flagged for r in hist.values())
    assert client.get(f"/v1/frames/{history[35].frame_id.hex()}/anomaly", headers=v).status_code == 200
    out = subprocess.run([sys.executable, "-m", "central.cli", "--db", db_url, "backfill"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert "0 frame(s) scored" in out.stdout  # nothing left


def test_reference_set_lifecycle_and_validation(engine, db_url, tmp_path, tiny_manifest, tiny_model_dir):
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    rng = np.random.default_rng(1)
    c1 = [frame_message(tiny_manifest, rng, T0 + i * 1000) for i in range(30)]
    c2 = [frame_message(tiny_manifest, rng, T0 + i * 1000, camera="c2") for i in range(5)]
    _store(engine, model.id, c1 + c2)
    client, toks = _api(engine, db_url, tmp_path)
    a, v = toks["admin"], toks["viewer"]
    post = lambda body: client.post("/v1/reference-sets", json=body, headers=a, params={"wait": True})  # noqa: E731

    assert post({"name": "x"}).status_code == 400  # neither frames nor a time range
    assert post({"name": "x", "since_us": 0}).json()["error"] == "bad_reference_set"  # a range needs the camera
    r = post({"name": "x", "frame_ids": [c1[0].frame_id.hex(), c2[0].frame_id.hex()]})
    assert r.status_code == 400 and "not from s1/l1/c1" in r.json()["detail"]
    assert post({"name": "x", "frame_ids": [c1[0].frame_id.hex(), "e" * 32]}).status_code == 404
    assert post({"name": "x", "frame_ids": [c1[0].frame_id.hex()]}).status_code == 400  # one frame: no LOO
    assert post({"name": "x", "frame_ids": ["../x"]}).status_code == 400
    assert post({"name": "x", "frame_ids": [c1[0].frame_id.hex()], "quantile": 0.9, "threshold": 1}).status_code == 422
    r = post({"name": "range", "site": "s1", "line": "l1", "camera": "c1", "since_us": T0, "until_us": T0 + 20_000})
    assert r.status_code == 201, r.text
    rs = r.json()
    assert rs["frame_count"] == 20 and rs["version"] == 1
    assert post({"name": "again", "site": "s1", "line": "l1", "camera": "c1", "since_us": T0}).status_code == 409

    sid = rs["id"]
    patch = lambda body, h=a: client.patch(f"/v1/reference-sets/{sid}", json=body, headers=h,  # noqa: E731
                                           params={"wait": True})
    assert patch({"threshold": 0.5}, v).status_code == 403
    r = patch({"add_frame_ids": [m.frame_id.hex() for m in c1[20:25]],
               "remove_frame_ids": [c1[0].frame_id.hex(), c1[1].frame_id.hex()]}).json()
    assert (r["frame_count"], r["version"], r["bank_tokens"]) == (23, 2, 23 * 16)
    assert patch({"add_frame_ids": [c2[0].frame_id.hex()]}).status_code == 400
    r = patch({"since_us": T0 + 25_000}).json()  # every later frame of the camera
    assert (r["frame_count"], r["version"]) == (28, 3)
    t99 = r["threshold"]  # the default quantile, 0.99, of the leave-one-out scores
    r = patch({"threshold": 0.25}).json()
    assert (r["threshold"], r["threshold_mode"], r["version"], r["frame_count"]) == (0.25, "manual", 4, 28)
    r = patch({"quantile": 0.5}).json()
    assert r["threshold_mode"] == "quantile" and r["quantile"] == 0.5 and 0 < r["threshold"] < t99
    r = client.get(f"/v1/reference-sets/{sid}", params={"frames": True}, headers=v).json()
    assert len(r["frame_ids"]) == 28 and c1[0].frame_id.hex() not in r["frame_ids"]
    raw = client.get(f"/v1/reference-sets/{sid}/bank", headers=v)
    bank = Bank.from_bytes(raw.content)
    assert (bank.info.set_id, bank.info.set_version, bank.info.threshold, bank.info.manifest_hash) == \
        (sid, r["version"], pytest.approx(r["threshold"]), model.hash16)
    assert raw.headers["x-tokenline-set-version"] == str(r["version"]) == str(r["bank_version"])
    listed = client.get("/v1/reference-sets", params={"camera": "c1"}, headers=v).json()["reference_sets"]
    assert [x["id"] for x in listed] == [sid]
    assert client.get("/v1/reference-sets", params={"camera": "c2"}, headers=v).json()["reference_sets"] == []

    # a set's scores go with it
    with Session(engine) as s, s.begin():
        s.add(FrameScore(frame_id=c1[3].frame_id.hex(), set_id=sid, set_version=5, model_id=model.id, site="s1",
                         line="l1", camera="c1", capture_us=T0, score=0.1, threshold=0.2, flagged=False, token=0,
                         x0=0, y0=0, x1=0.1, y1=0.1, scored_us=0))
    assert client.delete(f"/v1/reference-sets/{sid}", headers=v).status_code == 403
    assert client.delete(f"/v1/reference-sets/{sid}", headers=a).status_code == 204
    assert client.get(f"/v1/reference-sets/{sid}", headers=v).status_code == 404
    assert client.delete(f"/v1/reference-sets/{sid}", headers=a).status_code == 404
    assert tx(engine, lambda s: s.scalar(select(func.count()).select_from(FrameScore))) == 0
    spec = client.get("/openapi.json").json()
    assert {"/v1/reference-sets", "/v1/reference-sets/{set_id}", "/v1/reference-sets/{set_id}/bank",
            "/v1/reference-sets/{set_id}/build",
            "/v1/anomalies", "/v1/anomalies/latest", "/v1/frames/{frame_id}/anomaly",
            "/v1/frames/{frame_id}/similar-region"} <= set(spec["paths"])
    assert "ScoredFrameOut" in spec["components"]["schemas"]
    states = spec["components"]["schemas"]["ReferenceSetOut"]["properties"]["state"]
    assert set(states["enum"]) == {"ready", "building", "failed"}


def test_retention_drops_the_scores_of_deleted_frames(engine, db_url, tmp_path, tiny_manifest, tiny_model_dir):
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    rng = np.random.default_rng(2)
    old_ts, new_ts = store.now_us() - 20 * 86_400_000_000, store.now_us()
    msgs = [frame_message(tiny_manifest, rng, (old_ts if i < 5 else new_ts) + i) for i in range(10)]
    _store(engine, model.id, msgs)
    cfg = config_for(tmp_path, db_url, retention={"originals_days": 1, "tokens_days": 10})
    built_set(engine, cfg.anomaly, refsets.create_set, name="all", frame_ids=[m.frame_id.hex() for m in msgs])
    from central.anomaly.scoring import backfill

    assert backfill(engine).scored == 10
    rep = sweep(engine, BlobStore(cfg.originals.root), cfg.retention)
    assert rep.tokens_deleted == 5 and rep.scores_deleted == 5
    with Session(engine) as s:
        left = set(s.scalars(select(FrameScore.frame_id)))
        assert left == set(s.scalars(select(Frame.frame_id))) == {m.frame_id.hex() for m in msgs[5:]}
    # the set keeps its bank; rebuilding it skips the deleted frames
    info = built_set(engine, cfg.anomaly, refsets.update_set, 1, quantile=0.9)
    assert info.frame_count == 5 and info.state == "ready"


def _queue_count(engine) -> int:
    return tx(engine, lambda s: s.scalar(select(func.count()).select_from(ScoreQueue)))


def _scores(engine) -> dict:
    with Session(engine) as s:
        return {r.frame_id: r for r in s.scalars(select(FrameScore))}


def _ingest_in_process(engine, msgs) -> None:
    """Commit ``msgs`` as an ingest worker does, with no scorer running: the frames of a set's camera wait queued."""
    items = [Incoming(i, 1, topics.tokens_topic(m.site, "d1", m.line, m.camera), encode(m, "int8"))
             for i, m in enumerate(msgs)]
    res = Ingestor(engine, IngestConfig(), "w-test").process(items)
    assert res.stored == len(msgs) and res.dead == 0


@pytest.mark.parametrize("mode", ["tokens", "both", "global"])
def test_the_scorer_reads_global_embeddings_for_the_sets_that_score_them(engine, tiny_manifest, tiny_model_dir, mode):
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    rng = np.random.default_rng(6)
    ref = [frame_message(tiny_manifest, rng, T0 + i * 1000, seq=i) for i in range(30)]
    _store(engine, model.id, ref)
    built_set(engine, AnomalyConfig(), refsets.create_set, name="ref", frame_ids=[m.frame_id.hex() for m in ref],
              mode=mode)
    live = [frame_message(tiny_manifest, rng, T0 + 10**9 + i, seq=100 + i, odd=3 if i == 2 else None)
            for i in range(6)]
    _ingest_in_process(engine, live)
    scorer = Scorer(engine, AnomalyConfig(), "scorer")
    assert scorer.drain() == 6
    assert scorer.banks.need_globals == (mode != "tokens")
    with Session(engine) as s:
        bank = refsets.load_bank(s, 1)
        stored = {r.frame_id: r for r in s.execute(select(Frame.frame_id, Frame.k, Frame.tokens, Frame.sizes,
                                                          Frame.centroids, Frame.footprint,
                                                          Frame.global_embedding))}
    rows = [stored[m.frame_id.hex()] for m in live]
    summ = refsets.frame_summaries(rows, tiny_manifest.summary, True)
    want = bank.score_arrays(summ.tokens, summ.sizes, summ.global_embedding).score
    got = _scores(engine)
    np.testing.assert_allclose([got[m.frame_id.hex()].score for m in live], want, rtol=1e-5, atol=1e-6)


def test_scorers_share_the_queue_each_frame_scored_and_alerted_once(engine, tmp_path, tiny_manifest,
                                                                    tiny_model_dir):
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    rng = np.random.default_rng(5)
    ref = [frame_message(tiny_manifest, rng, T0 + i * 1000, seq=i) for i in range(30)]
    _store(engine, model.id, ref)
    info = built_set(engine, AnomalyConfig(metric="cosine"), refsets.create_set, name="ref",
                     frame_ids=[m.frame_id.hex() for m in ref],
                     threshold=0.5)  # cosine: odd tokens score over 0.5, normal ones far under
    odd_at = {3: 2, 17: 9, 29: 14, 38: 0}  # message index -> its odd token
    live = [frame_message(tiny_manifest, rng, T0 + 10**9 + i, seq=100 + i, odd=odd_at.get(i)) for i in range(40)]
    other = [frame_message(tiny_manifest, rng, T0 + 10**9 + i, seq=200 + i, camera="c2") for i in range(3)]
    _ingest_in_process(engine, live + other)
    assert _queue_count(engine) == 40 and _scores(engine) == {}  # c2 has no set: not queued; nobody scored yet

    cfg = AnomalyConfig(score_batch=7)
    got: list = []
    scorers = [Scorer(engine, cfg, f"scorer-{i}", alerts=got.extend) for i in range(2)]
    threads = [threading.Thread(target=sc.drain) for sc in scorers]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    rows = _scores(engine)
    assert set(rows) == {m.frame_id.hex() for m in live} and _queue_count(engine) == 0
    assert sum(sc.scored for sc in scorers) == 40  # no frame scored by both: whoever deleted its queue row
    assert {r.set_id for r in rows.values()} == {info.id}
    flagged = {m.frame_id.hex(): j for i, m in enumerate(live) if (j := odd_at.get(i)) is not None}
    assert {f for f, r in rows.items() if r.flagged} == set(flagged)
    assert sorted(a.frame_id for a in got) == sorted(flagged)  # each alert once, across both scorers
    assert all(rows[a.frame_id].token == flagged[a.frame_id] == a.token for a in got)
    totals = tx(engine, store.counter_totals)
    assert (totals["frames_scored"], totals["anomaly_alerts"]) == (40, 4)

    # a queued frame retention deleted meanwhile, and frames of a set deleted meanwhile, leave the queue unscored
    late = [frame_message(tiny_manifest, rng, T0 + 2 * 10**9 + i, seq=300 + i) for i in range(4)]
    _ingest_in_process(engine, late)
    with Session(engine) as s, s.begin():
        s.execute(delete(Frame).where(Frame.frame_id == late[0].frame_id.hex()))
    assert Scorer(engine, cfg, "scorer-2").drain() == 4
    rows = _scores(engine)
    assert late[0].frame_id.hex() not in rows and {m.frame_id.hex() for m in late[1:]} <= set(rows)
    _ingest_in_process(engine, [frame_message(tiny_manifest, rng, T0 + 3 * 10**9, seq=400)])
    lock = refsets._lock_file(engine, info.id)  # SQLite: the file its builds took
    assert (lock is None) == is_postgres(engine) and (lock is None or os.path.exists(lock))
    with Session(engine) as s, s.begin():
        assert refsets.delete_set(s, info.id)
    assert lock is None or not os.path.exists(lock)  # goes with the set
    assert _queue_count(engine) == 1
    assert Scorer(engine, cfg, "scorer-3").drain() == 1 and _queue_count(engine) == 0 and _scores(engine) == {}


def test_a_deleted_sets_lock_file_stays_while_a_build_holds_it(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'central.db'}")
    path = refsets._lock_file(engine, 7)
    with refsets.build_lock(engine, 7):
        refsets._remove_lock_file(engine, 7)
        assert os.path.exists(path)  # held: left to the build, which finds its set gone
    refsets._remove_lock_file(engine, 7)
    assert not os.path.exists(path)
    refsets._remove_lock_file(engine, 7)  # none left: nothing to do


def _scorer_pids(log: LogTail) -> list:
    return [int(re.search(r"started \(pid (\d+)\)", x).group(1)) for x in list(log.lines) if "scorer" in x
            and "started (pid" in x]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")  # a zombie is gone too
    except FileNotFoundError:
        return True


def test_scorer_process_sigkill_is_restarted_and_loses_no_score(engine, db_url, mosquitto, tmp_path, tiny_manifest,
                                                                tiny_model_dir):
    """Frames queued while no scorer ran (as after a crash) are scored when one starts; a scorer killed with
    SIGKILL is restarted by its worker and scores what came meanwhile; a killed worker takes its scorer along."""
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    rng = np.random.default_rng(6)
    ref = [frame_message(tiny_manifest, rng, T0 + i * 1000, seq=i) for i in range(30)]
    _store(engine, model.id, ref)
    built_set(engine, AnomalyConfig(metric="cosine"), refsets.create_set, name="ref",
              frame_ids=[m.frame_id.hex() for m in ref],
              threshold=0.5)  # cosine: odd tokens score over 0.5, normal ones far under
    backlog = [frame_message(tiny_manifest, rng, T0 + 10**9 + i, seq=100 + i) for i in range(10)]
    _ingest_in_process(engine, backlog)
    assert _queue_count(engine) == 10

    worker = _ingest_worker(tmp_path, db_url, mosquitto)
    log = LogTail(worker)
    alerts = Collector(mosquitto.host, mosquitto.port, topic=topics.ALERTS_FILTER)
    pub = _publisher(mosquitto)
    try:
        log.wait("subscribed as group", 1, timeout=120)
        assert _wait_for(lambda: len(_scores(engine)) == 10, 60), "".join(log.lines[-30:])
        first = _scorer_pids(log)
        assert len(first) == 1 and first[0] != worker.pid
        os.kill(first[0], signal.SIGKILL)
        live = [frame_message(tiny_manifest, rng, T0 + 2 * 10**9 + i, seq=200 + i, odd=5 if i in (2, 7) else None)
                for i in range(10)]
        _publish_all(pub, [(topics.tokens_topic("s1", "d1", "l1", "c1"), encode(m, "int8"), False) for m in live])
        assert _wait_for(lambda: len(_scores(engine)) == 20, 60), "".join(log.lines[-30:])
        assert any("scorer process" in x and "exited (code -9)" in x for x in log.lines)
        pids = _scorer_pids(log)
        assert len(pids) == 2 and pids[1] != first[0]
        assert alerts.wait_for(lambda c: len(c.raw) >= 2, 10)
        assert sorted(topics.parse_alert(p).frame_id for _, p, _ in alerts.raw) == \
            sorted(live[i].frame_id.hex() for i in (2, 7))
        assert _queue_count(engine) == 0
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        assert _wait_for(lambda: _gone(pids[1]), 10), "the scorer outlived its worker"
    finally:
        if worker.poll() is None:
            worker.kill()
        alerts.close()
        pub.loop_stop()
        pub.disconnect()


def test_bank_building_coreset_lists_and_leave_one_out_threshold(monkeypatch):
    monkeypatch.setattr(anomaly_contract, "EXHAUSTIVE_UP_TO", 2048)  # this 2,500-token bank gets lists
    rng = np.random.default_rng(3)
    vocab = unit(rng.standard_normal((40, 32)))
    f = 300
    tokens = unit(vocab[rng.integers(0, 40, (f, 16))] + 0.05 * rng.standard_normal((f, 16, 32)))
    sizes = np.ones((f, 16), np.float32)
    sizes[:, 0] = 0  # an empty token never enters the bank
    frames = SetFrames(tokens, sizes, unit(rng.standard_normal((f, 8))))
    info = BankInfo(1, 1, "x", "s", "l", "c", "0" * 32, nprobe=4)
    built = build_bank(frames, info, max_tokens=2500, quantile=0.9)
    bank = built.bank
    assert bank.size == 2500 and bank.info.pool_tokens == f * 15 and bank.lists == 50
    assert bank.offsets[0] == 0 and bank.offsets[-1] == 2500 and np.all(np.diff(bank.offsets) >= 0)
    # every token sits in the list of its nearest centroid (the k-means assignment)
    lists = np.repeat(np.arange(bank.lists), np.diff(bank.offsets))
    np.testing.assert_array_equal(np.argmax(bank.tokens @ bank.centroids.T, axis=1), lists)
    # the coreset covers the pool: every vocabulary pattern is in the bank
    assert (vocab @ bank.tokens.T).max(axis=1).min() > 0.95
    # threshold = the quantile of each frame's score against the bank without its own tokens
    loo = bank.score_arrays(tokens, sizes, exclude=np.arange(f)).score
    np.testing.assert_allclose(built.loo_scores, loo)
    assert bank.info.threshold == pytest.approx(float(np.quantile(loo, 0.9)))
    manual = build_bank(frames, info, max_tokens=2500, quantile=0.9, threshold=0.3).bank
    assert manual.info.threshold == 0.3
    # greedy k-center: each pick is the point farthest from the earlier picks
    x = unit(rng.standard_normal((200, 8)))
    picks = greedy_coreset(x, 20)
    for i in range(1, 20):
        d = ((x[:, None, :] - x[picks[:i]][None]) ** 2).sum(-1).min(1)
        assert d[picks[i]] == pytest.approx(d.max(), rel=1e-4)
    # on more rows, most of them updated lazily (only the farthest 1 % at every pick): still each pick the farthest
    x = rng.standard_normal((6000, 12)).astype(np.float32) * np.linspace(0.2, 1, 12, dtype=np.float32)
    picks = greedy_coreset(x, 600)
    assert len(set(picks.tolist())) == 600
    x64, mind = x.astype(np.float64), np.full(6000, np.inf)
    for i in range(600):
        assert mind[picks[i]] >= mind.max() * (1 - 1e-5), i
        mind = np.minimum(mind, ((x64 - x64[picks[i]]) ** 2).sum(1))
    with pytest.raises(ValueError, match="at least two"):
        build_bank(SetFrames(tokens[:1], sizes[:1], frames.globals[:1]), info, 100, 0.9)
    monkeypatch.undo()  # at the shipped size a bank this small has lists (for the bounds) but is searched exhaustively
    small_built = build_bank(frames, info, max_tokens=2500, quantile=0.9)
    small = small_built.bank
    assert small.lists == 50 and small.size == 2500
    assert build_bank(SetFrames(tokens[:50], sizes[:50], frames.globals[:50]), info, 2500, 0.9).bank.lists == 1
    sims = np.einsum("fkd,md->fkm", tokens[:, 1:], small.tokens)  # token 0 is empty
    own = np.broadcast_to(small.src[None, None, :] == np.arange(f)[:, None, None], sims.shape)
    sims[own] = -np.inf  # leave each frame's own tokens out
    np.testing.assert_allclose(small_built.loo_scores, (1.0 - sims.max(axis=2)).max(axis=1), atol=1e-5)


def test_whitened_banks_fit_their_whitening_on_the_set_and_group_it_by_euclidean_lists(monkeypatch):
    rng = np.random.default_rng(8)
    # the whitening: with many tokens the whitened pool has about unit covariance (the shrinkage is tiny)
    scales = np.linspace(0.3, 1.0, 12)
    x = rng.standard_normal((20_000, 12)) * scales + 0.3
    w = fit_whitening(x)
    z = (x - w[0]) @ w[1:]
    np.testing.assert_allclose(w[0], x.mean(0), atol=1e-6)
    np.testing.assert_allclose(np.cov(z.T), np.eye(12), atol=0.02)
    # fewer tokens than dimensions: shrunk towards a multiple of I, so finite and invertible
    few = fit_whitening(rng.standard_normal((5, 40)))
    assert np.all(np.isfinite(few)) and np.linalg.matrix_rank(few[1:]) == 40
    monkeypatch.setattr(anomaly_contract, "EXHAUSTIVE_UP_TO", 2048)
    vocab = unit(rng.standard_normal((40, 32)))
    f = 200
    tokens = unit(vocab[rng.integers(0, 40, (f, 16))] + 0.05 * rng.standard_normal((f, 16, 32)))
    frames = SetFrames(tokens, np.ones((f, 16), np.float32), np.zeros((f, 8), np.float32))
    bank = build_bank(frames, BankInfo(1, 1, "x", "s", "l", "c", "0" * 32, nprobe=4, metric="whitened"),
                      max_tokens=2500, quantile=0.9).bank
    assert bank.whitened and bank.size == 2500 and bank.lists == 50
    np.testing.assert_allclose(bank.whiten, fit_whitening(unit(tokens.reshape(-1, 32))), atol=1e-5)
    # the bank holds whitened tokens, each in the list of its nearest centroid (Euclidean)
    pool = (unit(tokens.reshape(-1, 32)) - bank.whiten[0]) @ bank.whiten[1:]
    assert np.abs(pool[:, None, :] - bank.tokens[None, :64]).sum(-1).min(0).max() < 0.05  # float16 tokens
    lists = np.repeat(np.arange(bank.lists), np.diff(bank.offsets))
    near = ((bank.tokens[:, None, :] - bank.centroids[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(near, lists)
    odd = tokens[:3].copy()
    odd[1, 6] = unit(rng.standard_normal(32))
    fs = bank.score_arrays(odd, np.ones((3, 16), np.float32))
    assert fs.token[1] == 6 and fs.score[1] > bank.info.threshold >= max(fs.score[0], fs.score[2])


def test_whitened_thresholds_measure_each_set_frame_with_a_whitening_fitted_without_it():
    rng = np.random.default_rng(10)
    # the last: about 1.6 tokens per dimension, strongly shrunk (what the tests' 384-dim model's small sets are)
    for f, k, d, max_tokens in ((12, 16, 24, 10_000), (40, 8, 16, 10_000), (300, 16, 32, 2000), (10, 16, 96, 10_000)):
        vocab = unit(rng.standard_normal((30, d)) * np.linspace(0.2, 1, d))
        tokens = unit(vocab[rng.integers(0, 30, (f, k))] + 0.2 * rng.standard_normal((f, k, d)))
        sizes = np.ones((f, k), np.float32)
        sizes[:, 0] = 0  # an empty token counts for nothing
        built = build_bank(SetFrames(tokens, sizes, np.zeros((f, 8), np.float32)),
                           BankInfo(1, 1, "x", "s", "l", "c", "0" * 32, metric="whitened"), max_tokens, 0.9)
        bank = built.bank
        assert bank.whitened and bank.size == min(max_tokens, f * (k - 1))
        # brute force: frame i's tokens against the bank's tokens of other frames, in the whitening of the pool
        # without frame i (the bank's tokens back in the tokens' own space)
        w = bank.whiten.astype(np.float64)
        raw = bank.tokens.astype(np.float64) @ np.linalg.inv(w[1:]) + w[0]
        pool, src = unit(tokens[:, 1:]).reshape(-1, d), np.repeat(np.arange(f), k - 1)
        want = []
        for i in range(f):
            wi = fit_whitening(pool[src != i]).astype(np.float64)
            zx, zb = (pool[src == i] - wi[0]) @ wi[1:], (raw[bank.src != i] - wi[0]) @ wi[1:]
            want.append(np.sqrt(((zx[:, None] - zb[None]) ** 2).sum(-1).min(1)).max())
        np.testing.assert_allclose(built.loo_scores, want, rtol=1e-5)
        assert bank.info.threshold == pytest.approx(float(np.quantile(want, 0.9)), rel=1e-5)
        assert bank.info.token_stats[0] == pytest.approx(float(np.mean(want)), rel=1e-5)


def test_whitened_thresholds_flag_about_the_quantiles_share_of_new_good_frames():
    # sets of 12 frames (16 tokens of 32 dims) from one anisotropic distribution; new frames from the same one. A
    # frame measured with the whitening its own tokens helped fit looks more typical than a new one: thresholds
    # from such scores flag about three times the 10 % the quantile says
    flagged, in_sample = [], []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        d, k, f = 32, 16, 12
        scales = np.geomspace(0.02, 1.0, d)

        def draw(n: int) -> np.ndarray:
            return unit(rng.standard_normal((n, k, d)) * scales + 3 * np.eye(d)[0])

        ref, new = draw(f), draw(2000)
        frames = SetFrames(ref, np.ones((f, k), np.float32), np.zeros((f, 8), np.float32))
        bank = build_bank(frames, BankInfo(1, 1, "x", "s", "l", "c", "0" * 32, metric="whitened"), 10_000, 0.9).bank
        scores = bank.score_arrays(new, np.ones((2000, k), np.float32)).score
        flagged.append(float((scores > bank.info.threshold).mean()))
        own = bank.score_arrays(ref, frames.sizes, exclude=np.arange(f)).score  # the set's own whitening
        in_sample.append(float((scores > np.quantile(own, 0.9)).mean()))
    assert 0.05 < np.mean(flagged) < 0.2, flagged
    assert np.mean(in_sample) > 1.8 * np.mean(flagged), (flagged, in_sample)


def test_a_static_scenes_whitened_threshold_is_not_below_its_own_rounding():
    # a set of three scenes seen eight times each: leave-one-out scores are float32 rounding (about 0.002 here),
    # and the same scenes arriving again round differently; the threshold stays above the rounding, an odd
    # token far above it
    for seed in range(5):
        rng = np.random.default_rng(seed)
        d, k = 16, 16
        scenes = unit(rng.standard_normal((3, k, d)) * np.geomspace(0.01, 1, d) + 2 * np.eye(d)[0])
        ref = scenes[np.arange(24) % 3]
        frames = SetFrames(ref, np.ones((24, k), np.float32), np.zeros((24, 8), np.float32))
        built = build_bank(frames, BankInfo(1, 1, "x", "s", "l", "c", "0" * 32, metric="whitened"), 10_000, 0.99)
        bank = built.bank
        assert bank.whitened and built.loo_scores.max() < 0.01 and bank.info.threshold == rounding_floor(bank)
        odd = scenes.copy()
        odd[0, 3] = unit(rng.standard_normal(d))
        scores = bank.score_arrays(odd, np.ones((3, k), np.float32)).score
        assert scores[1:].max() < 0.01 < bank.info.threshold < 1.0 < scores[0], (scores, bank.info.threshold)


def test_a_set_with_a_threshold_by_hand_keeps_its_banks_metric(engine, tiny_manifest, tiny_model_dir):
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    rng = np.random.default_rng(9)
    d = tiny_manifest.summary.dim
    n = int(np.ceil(WHITEN_MIN_TOKENS_PER_DIM * d / 16))  # frames of 16 tokens enough to whiten by
    msgs = [frame_message(tiny_manifest, rng, T0 + i * 1000) for i in range(n + 2)]
    _store(engine, model.id, msgs)
    ids = [m.frame_id.hex() for m in msgs]
    cosine, whitened = AnomalyConfig(metric="cosine"), AnomalyConfig()
    a = built_set(engine, cosine, refsets.create_set, name="a", frame_ids=ids[:n], threshold=0.3)
    assert a.metric == "cosine"
    # the deployment moves to whitened banks: the number 0.3 is a cosine distance, so this set stays cosine
    a = built_set(engine, whitened, refsets.update_set, a.id, add_frame_ids=ids[n:])
    assert (a.metric, a.threshold, a.frame_count) == ("cosine", 0.3, n + 2)
    assert tx(engine, refsets.load_bank, a.id).info.metric == "cosine"
    # back to a quantile: the threshold comes from the set again, in the configured metric
    a = built_set(engine, whitened, refsets.update_set, a.id, quantile=0.9)
    assert a.metric == "whitened" and tx(engine, refsets.load_bank, a.id).whitened
    # too few tokens to whiten by: a cosine bank whatever the configuration
    a = built_set(engine, whitened, refsets.update_set, a.id, remove_frame_ids=ids[n // 2:])
    assert (a.metric, a.frame_count) == ("cosine", n // 2)


def test_greedy_coreset_matches_a_direct_k_center_on_the_projected_tokens():
    rng = np.random.default_rng(5)
    x = unit(rng.standard_normal((300, 96)))
    picks = greedy_coreset(x, 40, proj_dim=64, seed=7)
    # reference: the same projection, then each pick the row whose nearest earlier pick is farthest (full distances)
    p = np.random.default_rng(7).standard_normal((96, 64)).astype(np.float32)
    z = (x @ (p / np.sqrt(64))).astype(np.float64)
    dist = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    want = [0]
    for _ in range(39):
        nearest = dist[:, want].min(axis=1)
        want.append(int(np.argmax(nearest)))
    np.testing.assert_array_equal(picks, want)


def test_webhook_retries_then_delivers_and_gives_up_after_its_retries(engine):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    got, script = [], [500, 503, 200, 500, 500, 502]  # then 200 for anything more

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(script.pop(0) if script else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/hook"
    alert = topics.Alert(frame_id="0" * 12 + "7" + "0" * 19, site="s1", device="d1", line="l1", camera="c1",
                         capture_us=1, score=0.9, threshold=0.5, reference_set=1, set_version=1, token=3,
                         box=(0, 0, 0.5, 0.5),
                         source="central", model="ab" * 16)
    try:
        hook = Webhook(WebhookConfig(url=url, retries=2, backoff_s=0.05, timeout_s=2), engine, "w1")
        published = []

        def broken_publish(*a):
            published.append(a)
            raise RuntimeError("broker gone")

        AlertPublisher(broken_publish, hook)([alert])  # a failing MQTT publish never raises into ingest
        assert _wait_for(lambda: hook.sent == 1, 10)
        assert len(got) == 3 and got[-1] == json.loads(alert.to_json()) and len(published) == 1
        hook.submit([alert])
        assert _wait_for(lambda: hook.failed == 1, 10)  # three failures; a 4th try would get 200: not made
        time.sleep(0.3)
        assert len(got) == 6 and hook.sent == 1
        hook.close()
    finally:
        srv.shutdown()
        srv.server_close()
    totals = tx(engine, store.counter_totals)
    assert totals["anomaly_webhook_sent"] == 1 and totals["anomaly_webhook_failed"] == 1


def test_cli_reference_sets_and_export(tmp_path, tiny_model_dir, tiny_manifest, capsys):
    from central.cli import main
    from tokenline.anomaly import bank_path

    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert main(["--db", url, "migrate"]) == 0
    assert main(["--db", url, "register-model", str(tiny_model_dir)]) == 0
    engine = make_engine(url)
    rng = np.random.default_rng(4)
    msgs = [frame_message(tiny_manifest, rng, T0 + i) for i in range(12)]
    _store(engine, 1, msgs)
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(m.frame_id.hex() for m in msgs[:10]))
    capsys.readouterr()
    assert main(["--db", url, "reference-set", "create", "plates", "--frames-file", str(ids), "--quantile", "1"]) == 0
    out = capsys.readouterr().out
    assert "created set 1 'plates' s1/l1/c1" in out and "10 frames" in out
    assert main(["--db", url, "reference-set", "create", "dup", "--frame", msgs[0].frame_id.hex(),
                 "--frame", msgs[1].frame_id.hex()]) == 2
    assert "already has a reference set" in capsys.readouterr().err  # errors: one line on stderr (runtime.cli)
    assert main(["--db", url, "reference-set", "update", "1", "--add", msgs[10].frame_id.hex(), "--threshold",
                 "0.4"]) == 0
    assert "v2: 11 frames" in capsys.readouterr().out
    assert main(["--db", url, "reference-set", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(x["id"], x["frame_count"], x["threshold"]) for x in listed] == [(1, 11, 0.4)]
    assert main(["--db", url, "reference-set", "show", "1", "--frames"]) == 0
    assert msgs[10].frame_id.hex() in capsys.readouterr().out
    edge_dir = tmp_path / "edge-model"
    assert main(["--db", url, "reference-set", "export", "1", "--model-dir", str(edge_dir)]) == 0
    bank = Bank.load(bank_path(edge_dir, "s1", "l1", "c1"), tiny_manifest.hash_bytes().hex(), ("s1", "l1", "c1"))
    assert (bank.info.set_version, bank.info.threshold, bank.size) == (2, 0.4, 11 * 16)
    assert main(["--db", url, "reference-set", "delete", "1"]) == 0
    assert main(["--db", url, "reference-set", "show", "1"]) == 2


def test_the_api_builds_banks_off_the_request_and_keeps_the_last_bank_meanwhile(engine, db_url, tmp_path,
                                                                                 tiny_manifest, tiny_model_dir):
    """A change answers 202 at once with state building; the builder thread builds the bank; until then the set
    has no bank (409 for the edge's file, nothing for the scorer) or keeps its last one (the scorer's version and
    the file stay the older version's); a build that cannot make a bank leaves the set failed with the reason, and
    building again after a fix (frames added) makes it ready."""
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    rng = np.random.default_rng(11)
    msgs = [frame_message(tiny_manifest, rng, T0 + i * 1000) for i in range(30)]
    _store(engine, model.id, msgs)
    ids = [m.frame_id.hex() for m in msgs]
    client, toks = _api(engine, db_url, tmp_path)
    a, v = toks["admin"], toks["viewer"]
    builder = client.app.state.services.builder
    place = (model.id, "s1", "l1", "c1")

    r = client.post("/v1/reference-sets", json={"name": "x", "frame_ids": ids[:20]}, headers=a)
    assert r.status_code == 202, r.text
    rs = r.json()
    assert (rs["state"], rs["version"], rs["bank_version"], rs["frame_count"], rs["metric"]) == \
        ("building", 1, 0, 20, None)
    sid = rs["id"]
    builder.join()
    rs = client.get(f"/v1/reference-sets/{sid}", headers=v).json()
    assert (rs["state"], rs["version"], rs["bank_version"], rs["bank_tokens"]) == ("ready", 1, 1, 20 * 16)
    assert tx(engine, refsets.active_versions) == {place: (sid, 1)}

    # a change keeps the last bank until its own is built
    with Session(engine) as s, s.begin():
        info = refsets.update_set(s, AnomalyConfig(), sid, add_frame_ids=ids[20:25])
    assert (info.state, info.version, info.bank_version, info.bank_tokens) == ("building", 2, 1, 20 * 16)
    assert tx(engine, refsets.active_versions) == {place: (sid, 1)}
    raw = client.get(f"/v1/reference-sets/{sid}/bank", headers=v)
    assert raw.headers["x-tokenline-set-version"] == "1" and Bank.from_bytes(raw.content).info.set_version == 1
    cam, = client.get("/v1/anomalies/latest", headers=v).json()["cameras"]
    assert (cam["reference_set"], cam["set_version"]) == (sid, 1)  # the version of the bank and its threshold
    r = client.post(f"/v1/reference-sets/{sid}/build", headers=a)  # what central's start does for such a set
    assert r.status_code == 202 and r.json()["state"] == "building"
    builder.join()
    rs = client.get(f"/v1/reference-sets/{sid}", headers=v).json()
    assert (rs["state"], rs["bank_version"], rs["frame_count"], rs["bank_tokens"]) == ("ready", 2, 25, 25 * 16)
    assert tx(engine, refsets.active_versions) == {place: (sid, 2)}

    # a build that cannot make a bank: its frames are gone (retention) -> failed, with the reason; the scorer
    # keeps the last bank
    with Session(engine) as s, s.begin():
        refsets.update_set(s, AnomalyConfig(), sid, name="renamed", quantile=0.9)
        s.execute(delete(Frame).where(Frame.frame_id.in_(ids[1:25])))
    r = client.post(f"/v1/reference-sets/{sid}/build", headers=a, params={"wait": True})
    assert r.status_code == 400 and "at least two stored frames, 1 found" in r.json()["detail"]
    rs = client.get(f"/v1/reference-sets/{sid}", headers=v).json()
    assert (rs["state"], rs["version"], rs["bank_version"]) == ("failed", 3, 2)
    assert "at least two stored frames" in rs["build_error"]
    assert tx(engine, refsets.active_versions) == {place: (sid, 2)}
    assert tx(engine, refsets.pending_sets) == []  # a failed set is not retried by itself
    r = client.patch(f"/v1/reference-sets/{sid}", json={"add_frame_ids": ids[25:30]}, headers=a,
                     params={"wait": True})  # good frames again: the change builds
    assert r.status_code == 200 and (r.json()["state"], r.json()["bank_version"], r.json()["frame_count"]) == \
        ("ready", 4, 6)

    # no bank yet: nothing to export, nothing to score with
    tx(engine, refsets.delete_set, sid)
    with Session(engine) as s, s.begin():
        sid = refsets.create_set(s, AnomalyConfig(), name="new", frame_ids=ids[25:30]).id
    assert client.get(f"/v1/reference-sets/{sid}/bank", headers=v).json()["error"] == "bank_not_built"
    assert tx(engine, refsets.active_versions) == {}


def test_a_build_is_stored_only_if_the_set_did_not_change_meanwhile_and_holds_no_write_lock(
        engine, tiny_manifest, tiny_model_dir, monkeypatch):
    """build_set reads the set, builds with no transaction open (another writer commits meanwhile: a frame, and a
    change of the set), and does not store a bank for a version the set has left; the next build does."""
    from central.anomaly import bank as bank_module

    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    rng = np.random.default_rng(12)
    msgs = [frame_message(tiny_manifest, rng, T0 + i * 1000) for i in range(12)]
    _store(engine, model.id, msgs[:10])
    cfg = AnomalyConfig()
    sid = tx(engine, refsets.create_set, cfg, name="x", frame_ids=[m.frame_id.hex() for m in msgs[:8]]).id
    real = bank_module.build_bank

    def changing(*args, **kwargs):
        _store(engine, model.id, msgs[10:])  # ingest writes during the build
        tx(engine, refsets.update_set, cfg, sid, add_frame_ids=[m.frame_id.hex() for m in msgs[8:12]])
        return real(*args, **kwargs)

    monkeypatch.setattr(refsets, "build_bank", changing)
    info = refsets.build_set(engine, cfg, sid)
    assert (info.state, info.version, info.bank_version, info.frame_count) == ("building", 2, 0, 12)
    assert tx(engine, refsets.load_bank, sid) is None  # version 1's bank was not stored
    monkeypatch.setattr(refsets, "build_bank", real)
    info = refsets.build_set(engine, cfg, sid)
    assert (info.state, info.bank_version, info.bank_tokens) == ("ready", 2, 12 * 16)
    assert tx(engine, refsets.load_bank, sid).info.set_version == 2


def test_central_builds_the_sets_left_without_a_bank_when_it_starts(engine, db_url, tmp_path, tiny_manifest,
                                                                      tiny_model_dir):
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    rng = np.random.default_rng(13)
    msgs = [frame_message(tiny_manifest, rng, T0 + i * 1000) for i in range(10)]
    _store(engine, model.id, msgs)
    sid = tx(engine, refsets.create_set, AnomalyConfig(), name="x", frame_ids=[m.frame_id.hex() for m in msgs]).id
    client, toks = _api(engine, db_url, tmp_path)
    with client:  # the app's start: its builder takes up the set
        client.app.state.services.builder.join()
        rs = client.get(f"/v1/reference-sets/{sid}", headers=toks["viewer"]).json()
    assert (rs["state"], rs["bank_version"], rs["bank_tokens"]) == ("ready", 1, 10 * 16)


def test_a_defect_in_one_build_is_recorded_on_its_set_and_the_builder_goes_on(engine, db_url, tmp_path, tiny_manifest,
                                                                                 tiny_model_dir, monkeypatch):
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    rng = np.random.default_rng(14)
    msgs = [frame_message(tiny_manifest, rng, T0 + i * 1000) for i in range(6)]
    msgs += [frame_message(tiny_manifest, rng, T0 + i * 1000, camera="c2") for i in range(6)]
    _store(engine, model.id, msgs)
    client, toks = _api(engine, db_url, tmp_path)
    real = refsets.build_bank

    def broken(frames, info, *a, **kw):
        if info.camera == "c1":
            raise RuntimeError("boom")
        return real(frames, info, *a, **kw)

    monkeypatch.setattr(refsets, "build_bank", broken)
    ids = [client.post("/v1/reference-sets", json={"name": c, "frame_ids": [m.frame_id.hex() for m in part]},
                       headers=toks["admin"]).json()["id"] for c, part in (("c1", msgs[:6]), ("c2", msgs[6:]))]
    client.app.state.services.builder.join()
    got = [client.get(f"/v1/reference-sets/{i}", headers=toks["viewer"]).json() for i in ids]
    assert (got[0]["state"], got[0]["build_error"]) == ("failed", "internal error: RuntimeError: boom")
    assert (got[1]["state"], got[1]["bank_tokens"]) == ("ready", 6 * 16)


HOLD_BUILD_LOCK = """
import sys, time
from central.anomaly import refsets
from sql.db import make_engine
with refsets.build_lock(make_engine(sys.argv[1]), int(sys.argv[2])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_one_central_process_at_a_time_builds_a_set(engine, db_url, tiny_manifest, tiny_model_dir, monkeypatch,
                                                    caplog, capsys):
    """Several central processes on one database: a set another process is building (a real second process
    holding ``build_lock``) is not built again but looked at again (the CLI waits, saying on whom), and built once
    that process is gone (SIGKILL: the server or the kernel releases its lock) when its build's version has since
    changed; two builders starting together (two engines, each with its own connections and lock files) build
    every pending set once. On PostgreSQL a read-only database (a search replica) builds nothing."""
    from central.anomaly import builder as builder_module
    from central.cli import main as cli_main

    other = make_engine(db_url)
    cli_rc: list = []
    try:
        model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
        rng = np.random.default_rng(15)
        cams = ("c1", "c2", "c3", "c4")
        msgs = {c: [frame_message(tiny_manifest, rng, T0 + i * 1000, camera=c) for i in range(8)] for c in cams}
        _store(engine, model.id, [m for c in cams for m in msgs[c]])
        cfg = AnomalyConfig()

        def create(c: str) -> int:
            return tx(engine, refsets.create_set, cfg, name=c, frame_ids=[m.frame_id.hex() for m in msgs[c][:6]]).id

        ids = {"c1": create("c1")}
        builds = []
        real = refsets.build_bank

        def counting(frames, info, *a, **kw):
            builds.append((info.set_id, info.set_version))
            return real(frames, info, *a, **kw)

        monkeypatch.setattr(refsets, "build_bank", counting)
        monkeypatch.setattr(builder_module, "BUSY_RETRY_S", 0.2)
        sid = ids["c1"]
        holder = subprocess.Popen([sys.executable, "-c", HOLD_BUILD_LOCK, db_url, str(sid)], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True)
        try:  # the other process is building set c1 (version 1)
            assert holder.stdout.readline().strip() == "held"
            with pytest.raises(refsets.Busy, match="another central process") as busy:
                refsets.build_set(engine, cfg, sid, wait=False)
            # it names the holder: its pid and host (SQLite), its database session (PostgreSQL)
            named = (r"\(database session pid \d+" if is_postgres(engine)
                     else rf"\(pid {holder.pid} on \S+ since 20\d\d-")
            assert re.search(named, str(busy.value)), busy.value
            here = builder_module.BankBuilder(engine, cfg)
            with caplog.at_level("INFO", logger=builder_module.__name__):
                here.submit(sid)
                time.sleep(1.0)  # several looks, no build, said once
            assert builds == [] and tx(engine, refsets.get_set, sid).state == "building"
            assert caplog.text.count(f"reference set {sid} is being built by another central process") == 1
            tx(engine, refsets.update_set, cfg, sid, add_frame_ids=[m.frame_id.hex() for m in msgs["c1"][6:]])
            capsys.readouterr()
            cli = threading.Thread(target=lambda: cli_rc.append(cli_main(["--db", db_url, "reference-set", "build",
                                                                          str(sid)])))
            cli.start()  # the CLI says on whom it waits, and waits
            assert _wait_for(lambda: "waiting for it" in capsys.readouterr().out, 10) and cli.is_alive()
        finally:
            holder.kill()  # dies mid-build: its version-1 build stored nothing
            holder.wait()
        here.join()
        cli.join(30)
        assert cli_rc == [0]
        info = tx(engine, refsets.get_set, sid)
        assert builds == [(sid, 2)] and (info.state, info.bank_version, info.frame_count) == ("ready", 2, 8)
        here.close()

        # two processes start together with three sets pending: each set built once
        ids.update({c: create(c) for c in cams[1:]})
        builds.clear()
        first, second = builder_module.BankBuilder(engine, cfg), builder_module.BankBuilder(other, cfg)
        starts = [threading.Thread(target=b.start) for b in (first, second)]
        for t in starts:
            t.start()
        for t in starts:
            t.join()
        first.join()
        second.join()
        assert sorted(builds) == sorted((ids[c], 1) for c in cams[1:])
        assert {tx(engine, refsets.get_set, ids[c]).state for c in cams} == {"ready"}
        first.close()
        second.close()
        if not is_postgres(engine):
            return

        # a search replica: nothing built, and it says why
        read_only = make_engine(db_url, connect_args={"options": "-c default_transaction_read_only=on"})
        tx(engine, refsets.update_set, cfg, ids["c2"], add_frame_ids=[m.frame_id.hex() for m in msgs["c2"][6:]])
        builds.clear()
        replica = builder_module.BankBuilder(read_only, cfg)
        with caplog.at_level("INFO", logger=builder_module.__name__):
            replica.start()
            replica.submit(ids["c2"])
        replica.join()
        assert replica.read_only and builds == [] and tx(engine, refsets.get_set, ids["c2"]).state == "building"
        assert "built by the primary" in caplog.text
        replica.close()
        read_only.dispose()
    finally:
        other.dispose()
