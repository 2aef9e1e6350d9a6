"""Frame metadata (wire v2): the source file name and labels reach frames' rows through ingest, show in the API,
and filter searches (name=value and presence) on SQLite and PostgreSQL exactly as a brute-force reference."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from central import store
from central.api import create_app
from central.cli import main as central_main
from central.config import IngestConfig, SearchConfig
from central.errors import BadParameter
from central.ingest import Incoming, Ingestor
from central.search import Filters, Query, Searcher, parse_labels
from tests.central.conftest import config_for, make_message, tx, unit
from tokenline import topics
from tokenline.wire import encode

LOTS = ("17", "18", "19")


def _labels(i: int) -> dict:
    out = {"lot": LOTS[i % 3], "station": "7"}
    if i % 5 == 0:
        out["rework"] = ""  # a tag: a label without a value
    return out


@pytest.fixture
def stored(engine, tiny_manifest):
    """60 frames ingested from wire messages, with metadata on all but every 4th."""
    model = tx(engine, store.register_model, tiny_manifest)
    rng = np.random.default_rng(3)
    center = unit(rng, 384)
    msgs = []
    for i in range(60):
        m = make_message(tiny_manifest, rng, seq=i, ts_us=1_700_000_000_000_000 + i, center=center, noise=0.9)
        if i % 4:
            m = replace(m, metadata={"source": f"lot-{LOTS[i % 3]}/img_{i:04d}.png", "labels": _labels(i)})
        msgs.append(m)
    ing = Ingestor(engine, IngestConfig(), "w-test")
    res = ing.process([Incoming(i, 1, topics.tokens_topic(m.site, m.device, m.line, m.camera), encode(m))
                       for i, m in enumerate(msgs)])
    assert res.stored == 60 and res.dead == 0
    return model, msgs, center


def _expect(msgs, flt):
    out = set()
    for m in msgs:
        labels = (m.metadata or {}).get("labels") or {}
        if all((n in labels) if v is None else labels.get(n) == v for n, v in flt):
            out.add(m.frame_id.hex())
    return out


def test_metadata_is_stored_and_label_filters_equal_brute_force(engine, stored):
    model, msgs, center = stored
    with Session(engine) as s:
        fr = store.get_frame(s, msgs[1].frame_id.hex())
        plain = store.get_frame(s, msgs[0].frame_id.hex())
    assert fr.source == "lot-18/img_0001.png" and fr.labels == {"lot": "18", "station": "7"}
    assert plain.source is None and plain.labels is None
    searcher = Searcher(engine, SearchConfig(rerank=False))
    for flt in [(("lot", "17"),), (("lot", "18"), ("station", "7")), (("rework", None),), (("rework", ""),),
                (("lot", "17"), ("rework", None)), (("lot", "99"),), (("station", None),)]:
        hits = searcher.search(model, Query(model.id, center), 60, Filters(labels=flt))
        got = {h.frame_id for h in hits}
        assert got == _expect(msgs, flt), flt  # k covers everything: the filter alone decides
        assert all(h.frame.labels is not None for h in hits)


def test_parse_label_filters():
    assert parse_labels(["lot=17", "rework", "note=a=b"]) == (("lot", "17"), ("rework", None), ("note", "a=b"))
    with pytest.raises(BadParameter, match="must match"):
        parse_labels(["bad name=1"])
    with pytest.raises(BadParameter, match="longer"):
        parse_labels(["lot=" + "x" * 200])


def test_api_and_cli_show_and_filter_labels(engine, stored, db_url, tmp_path, capsys):
    model, msgs, _ = stored
    cfg = config_for(tmp_path, db_url)
    client = TestClient(create_app(cfg, engine))
    v = {"Authorization": "Bearer " + tx(engine, store.create_token, "v", "viewer")}
    meta = client.get(f"/v1/frames/{msgs[2].frame_id.hex()}", headers=v).json()["frame"]
    assert meta["source"] == "lot-19/img_0002.png" and meta["labels"] == {"lot": "19", "station": "7"}
    like = msgs[1].frame_id.hex()
    r = client.post("/v1/search", data={"like_frame": like, "k": 60, "label": ["lot=17", "rework"]}, headers=v)
    assert r.status_code == 200, r.text
    assert {x["frame_id"] for x in r.json()["results"]} == _expect(msgs, (("lot", "17"), ("rework", None)))
    assert all(x["labels"]["lot"] == "17" for x in r.json()["results"])
    r = client.post("/v1/search", data={"like_frame": like, "label": "no spaces=1"}, headers=v)
    assert r.status_code == 422 and r.json()["error"] == "invalid_parameter" and r.json()["parameter"] == "label"
    r = client.get("/v1/frames", params={"label": ["lot=17", "rework"], "limit": 60}, headers=v)  # browse: the same
    assert r.status_code == 200, r.text
    assert {x["frame_id"] for x in r.json()["frames"]} == _expect(msgs, (("lot", "17"), ("rework", None)))
    assert all(x["labels"]["lot"] == "17" for x in r.json()["frames"])
    assert client.get("/v1/frames", params={"label": "a b"}, headers=v).json()["parameter"] == "label"
    (tmp_path / "c.yaml").write_text(f"database: {{url: '{db_url}'}}\n")
    assert central_main(["--config", str(tmp_path / "c.yaml"), "search", "--like-frame", like, "-k", "60",
                         "--label", "lot=18", "--json"]) == 0
    import json

    hits = json.loads(capsys.readouterr().out)
    assert {h["frame_id"] for h in hits} == _expect(msgs, (("lot", "18"),)) - {like}
