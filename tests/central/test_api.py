"""HTTP API on SQLite and PostgreSQL: roles, the originals PUT contract, frames, holds, search, metrics."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from central import store
from central.api import create_app
from central.blobs import BlobStore
from central.retention import sweep
from tests.central.conftest import config_for, make_message, tx


def _jpeg(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


@pytest.fixture
def setup(engine, db_url, tmp_path, tiny_manifest, tiny_model_dir):
    cfg = config_for(tmp_path, db_url, originals={"max_upload_bytes": 50_000},
                     retention={"originals_days": 1, "tokens_days": 10})
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    rng = np.random.default_rng(0)
    msgs = [make_message(tiny_manifest, rng, seq=i, ts_us=store.now_us() - i) for i in range(20)]
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, model.id, store.now_us()) for m in msgs])
    client = TestClient(create_app(cfg, engine))
    toks = {r: {"Authorization": "Bearer " + tx(engine, store.create_token, r, r)} for r in ("viewer", "device", "admin")}
    return client, toks, msgs, cfg, model


def test_roles_and_health(setup):
    client, toks, msgs, cfg, _ = setup
    assert client.get("/healthz").json()["status"] == "ok"
    r = client.get("/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"error": "unauthorized", "detail": "missing bearer token"}  # every error has this shape
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/models", headers=toks["device"]).status_code == 403  # devices only upload
    assert client.get("/v1/models", headers=toks["viewer"]).json()["models"][0]["k"] == 16
    # tokens: only admins create them; the new token works at once; path traversal in ids is refused
    assert client.post("/v1/tokens", json={"name": "x", "role": "admin"}).status_code == 401
    assert client.post("/v1/tokens", json={"name": "x", "role": "admin"}, headers=toks["viewer"]).status_code == 403
    r = client.post("/v1/tokens", json={"name": "cam-9", "role": "viewer"}, headers=toks["admin"])
    assert r.status_code == 201 and r.json()["role"] == "viewer"
    assert client.get("/v1/models", headers={"Authorization": "Bearer " + r.json()["token"]}).status_code == 200
    assert client.post("/v1/tokens", json={"name": "../x", "role": "viewer"}, headers=toks["admin"]).status_code == 422
    for bad in ("..%2F..%2Fetc%2Fpasswd", "%2e%2e", "0" * 31 + "/"):
        assert client.get(f"/v1/frames/{bad}/original", headers=toks["viewer"]).status_code in (400, 404)
        assert client.put(f"/v1/originals/{bad}", content=b"x", headers=toks["device"]).status_code in (400, 404)
    assert client.get("/v1/dead-letters", headers=toks["viewer"]).status_code == 403
    assert client.get("/v1/dead-letters", headers=toks["admin"]).status_code == 200
    fid = msgs[0].frame_id.hex()
    assert client.put(f"/v1/frames/{fid}/hold", json={"hold": True}, headers=toks["viewer"]).status_code == 403
    body = _jpeg(0)
    h = {"Content-Type": "image/jpeg", "X-Tokenline-Sha256": hashlib.sha256(body).hexdigest()}
    assert client.put(f"/v1/originals/{fid}", content=body, headers={**h, **toks["viewer"]}).status_code == 403
    spec = client.get("/openapi.json").json()
    assert {"/v1/search", "/v1/frames/{frame_id}", "/v1/frames/{frame_id}/original", "/v1/devices", "/v1/models",
            "/healthz", "/metrics", "/v1/originals/{frame_id}"} <= set(spec["paths"])


def test_originals_contract_over_http(setup, engine):
    client, toks, msgs, cfg, _ = setup
    fid = msgs[1].frame_id.hex()
    body = _jpeg(1)
    sha = hashlib.sha256(body).hexdigest()
    h = {**toks["device"], "Content-Type": "image/jpeg", "X-Tokenline-Sha256": sha}
    assert client.put(f"/v1/originals/{fid}", content=body, headers=h).status_code == 201
    assert client.put(f"/v1/originals/{fid}", content=body, headers=h).status_code == 200
    other = _jpeg(2)
    assert client.put(f"/v1/originals/{fid}", content=other,
                      headers={**h, "X-Tokenline-Sha256": hashlib.sha256(other).hexdigest()}).status_code == 409
    assert client.put(f"/v1/originals/{'0' * 32}", content=body, headers={**h, "X-Tokenline-Sha256": "ab" * 32}
                      ).status_code == 422
    assert client.put("/v1/originals/XYZ", content=body, headers=h).status_code == 400
    assert client.put(f"/v1/originals/{'1' * 32}", content=b"GIF89a....", headers=h).status_code == 400
    assert client.put(f"/v1/originals/{'2' * 32}", content=b"\xff" * 60_000, headers=h).status_code == 413
    r = client.get(f"/v1/frames/{fid}/original", headers=toks["viewer"])
    assert r.status_code == 200 and r.content == body and r.headers["content-type"] == "image/jpeg"
    t = client.get(f"/v1/frames/{fid}/thumbnail?size=20", headers=toks["viewer"])
    assert t.status_code == 200 and cv2.imdecode(np.frombuffer(t.content, np.uint8), 1).shape[:2] == (20, 20)
    meta = client.get(f"/v1/frames/{fid}", headers=toks["viewer"]).json()
    assert meta["frame"]["seq"] == 1 and meta["original"]["state"] == "kept"
    assert client.get(f"/v1/frames/{msgs[2].frame_id.hex()}/original", headers=toks["viewer"]).status_code == 404
    # the retention policy deletes it -> 410 on read and on a retried upload
    sweep(engine, BlobStore(cfg.originals.root), cfg.retention, now=store.now_us() + 2 * 86_400_000_000)
    assert client.get(f"/v1/frames/{fid}/original", headers=toks["viewer"]).status_code == 410
    assert client.put(f"/v1/originals/{fid}", content=body, headers=h).status_code == 410
    m = client.get("/metrics").text
    assert 'tokenline_originals{state="deleted"} 1' in m and "tokenline_frames{model_id=" in m
    assert 'tokenline_http_requests_total{route="/v1/originals/{frame_id}",status="201"} 1' in m


def test_search_endpoint(setup, tiny_model_dir):
    client, toks, msgs, cfg, model = setup
    v = toks["viewer"]
    like = msgs[3].frame_id.hex()
    r = client.post("/v1/search", data={"like_frame": like, "k": 5}, headers=v)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 5 and like not in [x["frame_id"] for x in res]
    assert all(len(x["matches"]) == 3 for x in res) and res == sorted(res, key=lambda x: -x["score"])
    r = client.post("/v1/search", data={"like_frame": like, "k": 5, "camera": "nope"}, headers=v)
    assert r.json()["results"] == []
    img = cv2.imencode(".png", np.full((30, 50, 3), 120, np.uint8))[1].tobytes()
    r = client.post("/v1/search", files={"image": ("q.png", img, "image/png")}, data={"k": 3}, headers=v)
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    r = client.post("/v1/search", files={"image": ("q.png", b"garbage", "image/png")}, headers=v)
    assert r.status_code == 400 and r.json()["error"] == "bad_image"
    assert client.post("/v1/search", data={"q": "scratch"}, headers=v).status_code == 400  # no text tower
    assert client.post("/v1/search", data={}, headers=v).status_code == 400
    assert client.post("/v1/search", data={"like_frame": "f" * 32}, headers=v).status_code == 404


def _pages(client, headers, path, data=None, params=None, key="results"):
    """Every page of a search (POST data) or of the frames list (GET params) through next_cursor."""
    out, cursor, n = [], None, 0
    while True:
        if data is not None:
            r = client.post(path, data=dict(data, **({"cursor": cursor} if cursor else {})), headers=headers)
        else:
            r = client.get(path, params=dict(params, **({"cursor": cursor} if cursor else {})), headers=headers)
        assert r.status_code == 200, r.text
        out.append(r.json()[key])
        cursor = r.json()["next_cursor"]
        n += 1
        if cursor is None or n > 50:
            return out


def test_search_pages_follow_one_ranking(setup, engine, tiny_manifest):
    """Pages of k results cut from one ranking: no repeats, nothing skipped, the same order as one big page,
    also when frames arrive between two pages."""
    client, toks, msgs, cfg, model = setup
    v = toks["viewer"]
    like = msgs[3].frame_id.hex()
    whole = client.post("/v1/search", data={"like_frame": like, "k": 19}, headers=v).json()
    assert whole["next_cursor"] is None and len(whole["results"]) == 19
    pages = _pages(client, v, "/v1/search", data={"like_frame": like, "k": 4})
    assert [len(p) for p in pages] == [4, 4, 4, 4, 3]
    flat = [h["frame_id"] for p in pages for h in p]
    assert flat == [h["frame_id"] for h in whole["results"]]
    scores = [h["score"] for p in pages for h in p]
    assert scores == sorted(scores, reverse=True)
    # frames arriving between pages: the listing goes on where it stopped, without repeats
    first = client.post("/v1/search", data={"like_frame": like, "k": 5}, headers=v).json()
    rng = np.random.default_rng(9)
    late = [make_message(tiny_manifest, rng, seq=100 + i, ts_us=store.now_us()) for i in range(6)]
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, model.id, store.now_us()) for m in late])
    rest = _pages(client, v, "/v1/search", data={"like_frame": like, "k": 5})  # a fresh listing sees all 25
    assert sum(len(p) for p in rest) == 25
    nxt = client.post("/v1/search", data={"like_frame": like, "k": 50, "cursor": first["next_cursor"]},
                      headers=v).json()["results"]
    seen = [h["frame_id"] for h in first["results"]]
    assert not set(seen) & {h["frame_id"] for h in nxt}
    assert all(h["score"] <= first["results"][-1]["score"] for h in nxt)
    # a cursor belongs to its query and filters
    r = client.post("/v1/search", data={"like_frame": msgs[4].frame_id.hex(), "cursor": first["next_cursor"]},
                    headers=v)
    assert r.status_code == 422 and r.json()["parameter"] == "cursor"
    r = client.post("/v1/search", data={"like_frame": like, "site": "s1", "cursor": first["next_cursor"]}, headers=v)
    assert r.status_code == 422 and r.json()["parameter"] == "cursor"
    r = client.post("/v1/search", data={"like_frame": like, "cursor": "garbage!"}, headers=v)
    assert r.status_code == 422 and r.json()["parameter"] == "cursor"


def test_search_depth_is_capped(engine, db_url, tmp_path, tiny_manifest, tiny_model_dir):
    cfg = config_for(tmp_path, db_url, search={"max_results": 5, "max_depth": 7})
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    rng = np.random.default_rng(1)
    msgs = [make_message(tiny_manifest, rng, seq=i) for i in range(12)]
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, model.id, 0) for m in msgs])
    client = TestClient(create_app(cfg, engine))
    v = {"Authorization": "Bearer " + tx(engine, store.create_token, "v", "viewer")}
    pages = _pages(client, v, "/v1/search", data={"like_frame": msgs[0].frame_id.hex(), "k": 5})
    assert [len(p) for p in pages] == [5, 2]  # search.max_depth
    r = client.post("/v1/search", data={"like_frame": msgs[0].frame_id.hex(), "k": 6}, headers=v)
    assert r.status_code == 422 and r.json()["parameter"] == "k" and "1 and 5" in r.json()["detail"]


def test_browse_latest_frames(setup, engine, tiny_manifest):
    client, toks, msgs, cfg, model = setup
    v = toks["viewer"]
    rng = np.random.default_rng(5)
    newest = max(m.capture_ts_us for m in msgs) + 1000
    other = [make_message(tiny_manifest, rng, seq=i, line="l2", camera="c9", ts_us=newest)
             for i in range(3)]  # one capture time: ties are ordered by row id (a batch is written in frame id
    # order), newest row first
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, model.id, store.now_us()) for m in other])
    pages = _pages(client, v, "/v1/frames", params={"limit": 6}, key="frames")
    flat = [f for p in pages for f in p]
    assert [len(p) for p in pages] == [6, 6, 6, 5]
    assert len({f["frame_id"] for f in flat}) == 23
    keys = [(f["capture_us"]) for f in flat]
    assert keys == sorted(keys, reverse=True)  # newest first
    assert [f["frame_id"] for f in flat[:3]] == sorted((m.frame_id.hex() for m in other), reverse=True)
    only = _pages(client, v, "/v1/frames", params={"line": "l2", "camera": "c9", "limit": 2}, key="frames")
    assert sorted(f["frame_id"] for p in only for f in p) == sorted(m.frame_id.hex() for m in other)
    ts = sorted(m.capture_ts_us for m in msgs)
    r = client.get("/v1/frames", params={"since_us": ts[2], "until_us": ts[6]}, headers=v)
    assert [f["capture_us"] for f in r.json()["frames"]] == ts[2:6][::-1]  # until exclusive
    assert all(f["original"] is None for f in flat) and flat[0]["k"] == 16
    r = client.get("/v1/frames", params={"limit": 2, "site": "s1"}, headers=v).json()
    assert client.get("/v1/frames", params={"limit": 2, "cursor": r["next_cursor"]}, headers=v).status_code == 422
    cams = client.get("/v1/cameras", headers=v).json()["cameras"]
    assert [(c["site"], c["line"], c["camera"], c["frames"]) for c in cams] == [("s1", "l1", "c1", 20),
                                                                                ("s1", "l2", "c9", 3)]


@pytest.mark.parametrize("data, parameter", [
    ({"k": "0"}, "k"), ({"k": "-3"}, "k"), ({"k": "201"}, "k"), ({"k": "ten"}, "k"),
    ({"rerank_weight": "nan"}, "rerank_weight"), ({"rerank_weight": "inf"}, "rerank_weight"),
    ({"rerank_weight": "1.5"}, "rerank_weight"), ({"model_id": "0"}, "model_id"),
    ({"site": "plant 1"}, "site"), ({"camera": "../x"}, "camera"), ({"since_us": "-1"}, "since_us"),
    ({"since_us": "10", "until_us": "10"}, "until_us"), ({"sitee": "s1"}, "sitee"), ({"offset": "20"}, "offset"),
    ({"cursor": "x"}, "cursor"),
])
def test_search_parameters_are_validated(setup, data, parameter):
    client, toks, msgs, cfg, model = setup
    r = client.post("/v1/search", data={"like_frame": msgs[0].frame_id.hex(), **data}, headers=toks["viewer"])
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_parameter" and body["parameter"] == parameter
    assert body["detail"].startswith(f"{parameter}: ")


def test_get_parameters_are_validated(setup):
    client, toks, msgs, cfg, model = setup
    fid = msgs[0].frame_id.hex()
    for path, params, parameter in (("/v1/frames", {"limit": 0}, "limit"), ("/v1/frames", {"lim": 5}, "lim"),
                                    ("/v1/frames", {"model_id": "x"}, "model_id"),
                                    (f"/v1/frames/{fid}/thumbnail", {"size": 9999}, "size"),
                                    ("/v1/models", {"verbose": 1}, "verbose"),
                                    ("/v1/dead-letters", {"limit": 0}, "limit")):
        r = client.get(path, params=params, headers=toks["admin"])
        assert r.status_code == 422 and r.json()["parameter"] == parameter, (path, r.text)
    r = client.post("/v1/tokens", json={"name": "x", "role": "viewer", "admin": True}, headers=toks["admin"])
    assert r.status_code == 422 and r.json()["parameter"] == "admin"


def test_openapi_is_typed_and_docs_are_local(setup):
    client, toks, msgs, cfg, model = setup
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]["bearer"]["description"]}
    for path, method in (("/v1/search", "post"), ("/v1/frames", "get"), ("/v1/models", "get"),
                         ("/v1/frames/{frame_id}", "get"), ("/v1/frames/{frame_id}/original/request", "post")):
        op = spec["paths"][path][method]
        assert op["security"] == [{"bearer": []}], path
        ok = op["responses"]["200" if method == "get" or path == "/v1/search" else "202"]
        assert "$ref" in ok["content"]["application/json"]["schema"], path  # a typed response, not "object"
        assert op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")
    assert "security" not in spec["paths"]["/healthz"]["get"]
    for page, asset in (("/docs", "/static/docs/swagger-ui-bundle.js"), ("/redoc", "/static/docs/redoc.standalone.js")):
        html = client.get(page).text
        assert asset in html and "cdn" not in html.lower() and "fonts.googleapis" not in html
        assert client.get(asset).status_code == 200
