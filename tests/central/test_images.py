"""Hostile images at central: refused from their header (400, nothing decoded) for search and originals, decoding
and encoding on a bounded pool off the event loop (a full pool answers 503 at once)."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from central import store
from central.api import create_app
from central.errors import Unavailable
from central.images import ImagePool
from sql.db import make_engine
from sql.migrate import upgrade
from tests.central.conftest import config_for, make_message, tx
from tests.support.image_bombs import jpeg_bomb, png_bomb


@pytest.fixture(scope="module")
def bombs():
    return {"jpeg": jpeg_bomb(), "png": png_bomb()}


@pytest.fixture
def api(tmp_path, tiny_manifest, tiny_model_dir):
    url = f"sqlite:///{tmp_path / 'central.db'}"
    engine = make_engine(url)
    upgrade(engine)
    model = tx(engine, store.register_model, tiny_manifest, tiny_model_dir)
    msg = make_message(tiny_manifest, np.random.default_rng(0))
    tx(engine, store.insert_frames, [store.frame_row(msg, model.id, store.now_us())])
    cfg = config_for(tmp_path, url, api={"max_image_pixels": 1_000_000})
    client = TestClient(create_app(cfg, engine))
    toks = {r: {"Authorization": "Bearer " + tx(engine, store.create_token, r, r)} for r in ("viewer", "device")}
    yield client, toks, msg
    engine.dispose()


def test_image_bombs_are_refused_before_decoding(api, bombs):
    client, toks, msg = api
    for name, body, mime in (("q.jpg", bombs["jpeg"], "image/jpeg"), ("q.png", bombs["png"], "image/png")):
        r = client.post("/v1/search", files={"image": (name, body, mime)}, headers=toks["viewer"])
        assert r.status_code == 400 and r.json()["error"] == "too_many_pixels", r.text
        assert "pixels is over the limit of 1,000,000" in r.json()["detail"]
    big = cv2.imencode(".png", np.zeros((1001, 1000, 3), np.uint8))[1].tobytes()  # 1,001,000 px: just over
    r = client.post("/v1/search", files={"image": ("q.png", big, "image/png")}, headers=toks["viewer"])
    assert r.status_code == 400 and r.json()["error"] == "too_many_pixels"
    ok = cv2.imencode(".png", np.zeros((1000, 1000, 3), np.uint8))[1].tobytes()
    assert client.post("/v1/search", files={"image": ("q.png", ok, "image/png")},
                       headers=toks["viewer"]).status_code == 200
    # an original whose header claims 65000x65000 is not stored (thumbnails would decode it)
    fid = msg.frame_id.hex()
    body = bombs["jpeg"]
    h = {**toks["device"], "Content-Type": "image/jpeg", "X-Tokenline-Sha256": hashlib.sha256(body).hexdigest()}
    r = client.put(f"/v1/originals/{fid}", content=body, headers=h)
    assert r.status_code == 400 and r.json()["error"] == "too_many_pixels"
    assert client.get(f"/v1/frames/{fid}/original", headers=toks["viewer"]).status_code == 404


def test_the_image_pool_is_bounded():
    pool = ImagePool(workers=1, queue=1)
    release = threading.Event()
    started = threading.Event()

    def slow() -> str:
        started.set()
        release.wait(10)
        return "done"

    async def scenario():
        first = asyncio.ensure_future(pool.run(slow))
        second = asyncio.ensure_future(pool.run(slow))  # waits in the queue
        await asyncio.sleep(0)
        with pytest.raises(Unavailable) as e:
            await pool.run(slow)  # one worker busy, the queue full: refused at once
        assert e.value.reason == "busy"
        release.set()
        assert await first == "done" and await second == "done"
        assert await pool.run(lambda: 42) == 42  # slots come back when the work ends

    asyncio.run(scenario())
    assert started.is_set()
    pool.close()
