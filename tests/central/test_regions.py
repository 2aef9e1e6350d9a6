"""Region search at central (central/regions.py, POST /v1/search/region) on SQLite and PostgreSQL: equal to brute
force, filters, a crop and a box on a stored frame finding a region at a known place, answered in the original
frame's coordinates (ROI and letterbox), old models refused with a clear error."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from central import store
from central.api import create_app
from central.config import SearchConfig
from central.errors import Invalid
from central.regions import RegionQuery, box_weights, region_search
from central.search import Filters, Query, Searcher, frame_conditions
from runtime.runners import OnnxRuntimeRunner
from sql.models import Frame
from tests.central.conftest import config_for, make_message, make_slic_message, tx, unit
from tests.support.tiny_model import build_tiny_model
from tokenline.frame_id import new_frame_id
from tokenline.manifest import Manifest
from tokenline.preprocess import frame_geometry, preprocess
from tokenline.wire import TokenMessage, decode, encode

T0 = 1_700_000_000_000_000


def _store(engine, model, msgs) -> None:
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, model.id, T0) for m in msgs])


def _brute(engine, model, q, flt: Filters, k: int, exclude=None):
    """Every stored frame of the model decoded one by one: best cosine over tokens that stand for a cell."""
    with Session(engine) as s:
        ids = s.scalars(select(Frame.frame_id).where(Frame.model_id == model.id)).all()
        frames = [store.get_frame(s, fid) for fid in ids]
    rows = []
    for f in frames:
        if f.frame_id == exclude or not all(getattr(flt, a) in (None, getattr(f, a)) for a in ("site", "line", "camera")):
            continue
        labels = f.labels or {}
        if not all(n in labels and v in (None, labels[n]) for n, v in flt.labels):
            continue
        if (flt.since_us is not None and f.capture_us < flt.since_us) or (flt.until_us is not None and f.capture_us >= flt.until_us):
            continue
        live = np.flatnonzero(f.summary.sizes > 0)
        sims = f.summary.tokens[live] @ q
        rows.append((float(sims.max()), f.frame_id, int(live[sims.argmax()])))
    rows.sort(key=lambda r: -r[0])
    return rows[:k]


@pytest.mark.parametrize("shape", ["default", "flagging"])
def test_region_search_equals_brute_force(engine, slic_manifest, tmp_path, shape) -> None:
    """``flagging``: the export for flagging's shape (docs/anomaly.md): K=64 tokens (8-bit footprint cells) of 64
    dims that arrived as int4 (stored exactly as they arrived)."""
    if shape == "flagging":
        slic_manifest = Manifest.from_file(build_tiny_model(tmp_path / "k64", size=64, patch=8, dim=384, head="slic",
                                                            token_dim=64))
        assert (slic_manifest.summary.k, slic_manifest.summary.dim) == (64, 64)
    model = tx(engine, store.register_model, slic_manifest)
    rng = np.random.default_rng(0)
    msgs = [make_slic_message(slic_manifest, rng, site=f"s{i % 2}", line=f"l{i % 3}", ts_us=T0 + i, seq=i)
            for i in range(700)]
    msgs = [replace(m, metadata={"labels": {"lot": str(i % 4), **({"rework": "y"} if i % 5 == 0 else {})}})
            if i % 7 else m for i, m in enumerate(msgs)]
    if shape == "flagging":  # through the wire, as central receives them
        msgs = [decode(encode(m, "int4")) for m in msgs]
    _store(engine, model, msgs)
    for qi, flt in enumerate([Filters(), Filters(site="s1"), Filters(line="l2", since_us=T0 + 100, until_us=T0 + 600),
                              Filters(labels=(("lot", "1"), ("rework", None)))]):
        q = unit(rng, slic_manifest.summary.dim)
        exclude = msgs[qi * 7].frame_id.hex() if qi == 1 else None
        hits = region_search(engine, model, RegionQuery(model.id, q, "crop", frame_id=exclude), 15,
                             frame_conditions(model.id, flt, engine.dialect.name == "postgresql"), 200)
        ref = _brute(engine, model, q, flt, 15, exclude)
        assert [h.frame.frame_id for h in hits] == [r[1] for r in ref]
        np.testing.assert_allclose([h.score for h in hits], [r[0] for r in ref], atol=1e-5)
        assert [h.token for h in hits] == [r[2] for r in ref]
        assert all(h.frame.summary.sizes[h.token] > 0 for h in hits)  # never a token without a footprint
        for h in hits:
            assert flt.site in (None, h.frame.site) and flt.line in (None, h.frame.line)


def test_box_weights_are_overlap_areas() -> None:
    fp = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]], np.uint8)
    w = box_weights(fp, (0.125, 0.125, 0.625, 0.5), 5)
    np.testing.assert_allclose(w, [0.375 * 0.375, 0.125 * 0.375, 0, 0, 0])


RED = (0, 0, 255)  # BGR


def _frames(n: int, red: set, rng: np.random.Generator) -> list:
    """96x64 frames of grey noise; the frames in ``red`` hold a red 16x16 square at x 48..64, y 16..32: inside the
    ROI (16, 8, 64, 48), one whole patch (row 1, column 2: token 6) of the letterboxed 32x32 model input."""
    out = []
    for i in range(n):
        f = rng.integers(90, 140, size=(64, 96, 3), dtype=np.uint8)
        if i in red:
            f[16:32, 48:64] = RED
        out.append(f)
    return out


@pytest.fixture
def red_frames(engine, db_url, tmp_path):
    """A letterboxing slic model, 16 frames encoded by it with an ROI (5 with the red square), stored with their
    geometry, and an API client."""
    model_dir = build_tiny_model(tmp_path / "lb", size=32, patch=8, dim=384, head="slic", token_dim=96,
                                 resize="letterbox", name="tiny-letterbox")
    manifest = Manifest.from_file(model_dir)
    model = tx(engine, store.register_model, manifest, model_dir)
    runner = OnnxRuntimeRunner(model_dir, manifest, providers=["CPUExecutionProvider"])
    roi = (16, 8, 64, 48)
    red = {1, 4, 7, 10, 13}
    frames = _frames(16, red, np.random.default_rng(5))
    out = runner.run(np.stack([preprocess(f, manifest.input, roi) for f in frames]))
    msgs = [TokenMessage(frame_id=new_frame_id(T0 + i), device="d1", site="s1", line="l1", camera="c1",
                         capture_ts_us=T0 + i, seq=i, manifest_hash=manifest.hash_bytes(), summary=out[i],
                         metadata={"frame": frame_geometry(f, roi).to_json()}) for i, f in enumerate(frames)]
    _store(engine, model, msgs)
    cfg = config_for(tmp_path, db_url)
    client = TestClient(create_app(cfg, engine))
    auth = {"Authorization": "Bearer " + tx(engine, store.create_token, "v", "viewer")}
    return client, auth, model, msgs, red


def test_a_crop_finds_the_frames_holding_it_at_the_known_place(red_frames) -> None:
    client, auth, model, msgs, red = red_frames
    crop = cv2.imencode(".png", np.full((40, 40, 3), RED, np.uint8))[1].tobytes()
    r = client.post("/v1/search/region", files={"image": ("crop.png", crop, "image/png")}, data={"k": "8"},
                    headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == {"kind": "crop"} and body["model"]["summary"]["region_search"]
    res = body["results"]
    assert {x["frame_id"] for x in res[:5]} == {msgs[i].frame_id.hex() for i in red}
    assert res[0]["score"] > 0.99 and res[4]["score"] - res[5]["score"] > 0.05
    for hit in res[:5]:
        m = hit["match"]
        assert m["token"] == 6 and m["mask"]["grid"] == [4, 4] and m["mask"]["rows"][1] == "0010"
        np.testing.assert_allclose(m["box_px"], [48, 16, 64, 32], atol=0.5)  # pixels of the 96x64 frame
        np.testing.assert_allclose(m["box"], [0.5, 0.25, 2 / 3, 0.5], atol=1e-3)
        assert len(m["cells"]) == 1 and m["cells"][0] == m["box"]
        assert hit["geometry"] == {"width": 96, "height": 64, "roi": [16, 8, 64, 48]}


def test_a_box_on_a_stored_frame_finds_the_others(red_frames) -> None:
    client, auth, model, msgs, red = red_frames
    src = msgs[4].frame_id.hex()
    r = client.post("/v1/search/region", data={"frame_id": src, "box": "0.52,0.27,0.64,0.48", "k": "4"}, headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["tokens"] == [{"token": 6, "weight": 1.0}] and body["query"]["frame_id"] == src
    got = [x["frame_id"] for x in body["results"]]
    assert src not in got and set(got) == {msgs[i].frame_id.hex() for i in red - {4}}
    # a box in the part of the frame outside the ROI covers nothing the model saw
    r = client.post("/v1/search/region", data={"frame_id": src, "box": "0,0,0.1,0.1"}, headers=auth)
    assert r.status_code == 400 and "covers no part" in r.json()["detail"]
    for bad, status in (({"frame_id": src}, 400), ({"frame_id": src, "box": "1,2"}, 400),
                        ({"frame_id": src, "box": "0.5,0.5,0.2,0.9"}, 400), ({"box": "0,0,1,1"}, 400),
                        ({"frame_id": "0" * 32, "box": "0,0,1,1"}, 404)):
        r = client.post("/v1/search/region", data=bad, headers=auth)
        assert r.status_code == status and r.json()["error"] == "bad_query", (bad, r.text)
    # the filters are validated as /v1/search's: an unknown or bad one is 422 naming it
    for bad, parameter in (({"camra": "c1"}, "camra"), ({"k": "0"}, "k"), ({"site": "plant 1"}, "site"),
                           ({"since_us": "10", "until_us": "10"}, "until_us"), ({"label": "bad name"}, "label")):
        r = client.post("/v1/search/region", data={"frame_id": src, "box": "0.52,0.27,0.64,0.48", **bad}, headers=auth)
        assert r.status_code == 422 and r.json()["parameter"] == parameter, (bad, r.text)
    # whole-image search answers with the same matched footprints
    r = client.post("/v1/search", data={"like_frame": src, "k": "3"}, headers=auth)
    assert r.status_code == 200 and all("cells" in m for hit in r.json()["results"] for m in hit["matches"])


def test_models_without_footprints_refuse_region_search(engine, db_url, tmp_path, tiny_manifest, tiny_model_dir):
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    msgs = [make_message(tiny_manifest, np.random.default_rng(1), seq=i, ts_us=T0 + i) for i in range(3)]
    _store(engine, model, msgs)
    client = TestClient(create_app(config_for(tmp_path, db_url), engine))
    auth = {"Authorization": "Bearer " + tx(engine, store.create_token, "v", "viewer")}
    r = client.post("/v1/search/region", data={"frame_id": msgs[0].frame_id.hex(), "box": "0,0,1,1"}, headers=auth)
    assert r.status_code == 400 and "has no footprints" in r.json()["detail"]
    with pytest.raises(Invalid, match="has no footprints"):
        region_search(engine, model, RegionQuery(model.id, unit(np.random.default_rng(2), 384), "crop"), 5,
                      frame_conditions(model.id, Filters(), False), 10)
    # whole-image search of an old model: the old re-rank weight and centroid-only matches
    searcher = Searcher(engine, SearchConfig())
    assert searcher.rerank_weight(model) == 0.25
    hits = searcher.search(model, Query.from_summary(model.id, msgs[0].summary), 2)
    assert hits and set(hits[0].matches[0]) == {"token", "sim", "x", "y", "size"}


def test_slic_models_rank_half_global_half_maxsim_over_tokens_with_footprints(engine, slic_manifest) -> None:
    model = tx(engine, store.register_model, slic_manifest)
    rng = np.random.default_rng(3)
    msgs = [make_slic_message(slic_manifest, rng, ts_us=T0 + i, seq=i) for i in range(60)]
    _store(engine, model, msgs)
    searcher = Searcher(engine, SearchConfig(candidates=60))
    assert searcher.rerank_weight(model) == 0.5
    probe = msgs[3]
    hits = searcher.search(model, Query.from_summary(model.id, probe.summary, probe.frame_id.hex()), 5)
    for h in hits:  # MaxSim over the tokens that stand for a cell, weighted by the query tokens' cells
        f = h.frame.summary
        live = f.sizes > 0
        w = probe.summary.sizes / probe.summary.sizes.sum()
        ms = float((w * (probe.summary.tokens @ f.tokens[live].T).max(1)).sum())
        assert h.maxsim == pytest.approx(ms, abs=1e-4)
        assert h.score == pytest.approx(0.5 * h.global_score + 0.5 * ms, abs=1e-4)
        assert all(f.sizes[m["token"]] > 0 and m["mask"]["grid"] == [4, 4] for m in h.matches)


def test_ingest_stores_slic_messages_and_refuses_what_does_not_fit_the_model(engine, slic_manifest) -> None:
    """A v2 slic message is stored with its footprint and geometry; tokens of the wrong dimension (all a version 1
    message can carry) and a missing or mis-sized footprint are dead letters with their reason."""
    from central.config import IngestConfig
    from central.ingest import Incoming, Ingestor
    from tokenline import topics
    from tokenline.summary import Summary
    from tokenline.wire import encode

    model = tx(engine, store.register_model, slic_manifest)
    rng = np.random.default_rng(7)
    topic = topics.tokens_topic("s1", "d1", "l1", "c1")
    good = make_slic_message(slic_manifest, rng, frame={"width": 640, "height": 480, "roi": [0, 0, 320, 240]})
    s = good.summary
    wide = replace(good, frame_id=new_frame_id(T0 + 1), summary=Summary(s.global_embedding, unit(rng, 16, 384),
                                                                         s.sizes, s.centroids, s.footprint))
    no_fp = replace(good, frame_id=new_frame_id(T0 + 2), summary=Summary(s.global_embedding, s.tokens, s.sizes,
                                                                          s.centroids))
    small_fp = replace(good, frame_id=new_frame_id(T0 + 3), summary=Summary(
        s.global_embedding, s.tokens, np.ones(16, np.float32), s.centroids, s.footprint[:2]))
    res = Ingestor(engine, IngestConfig(), "w").process(
        [Incoming(i, 1, topic, encode(m, "int8")) for i, m in enumerate([good, wide, no_fp, small_fp])])
    assert res.stored == 1 and res.reasons == {"token_dim_mismatch": 1, "footprint_mismatch": 2}
    fr = tx(engine, store.get_frame, good.frame_id.hex())
    np.testing.assert_array_equal(fr.summary.footprint, s.footprint)
    assert fr.geometry.to_json() == {"width": 640, "height": 480, "roi": [0, 0, 320, 240]}
    assert fr.summary.tokens.shape == (16, 96) and fr.model_id == model.id
