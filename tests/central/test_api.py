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
