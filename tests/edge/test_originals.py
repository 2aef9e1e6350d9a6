"""Originals: the JPEG store (age and size caps) and the upload queue against a local HTTP server playing central."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import cv2

from edge_agent import config as C
from edge_agent.originals import OriginalsStore, classify_status, upload_decision
from edge_agent.synthetic import draw_conveyor_frame
from tests.support.upload_server import UploadServer
from tokenline.frame_id import new_frame_id


def test_upload_policy_and_status_classes() -> None:
    assert [upload_decision("every_nth", 3, i) for i in range(4)] == [True, False, False, True]
    assert upload_decision("all", 1, 5) and not upload_decision("none", 1, 0) and not upload_decision("on_request", 1, 0)
    assert [classify_status(s) for s in (200, 201, 408, 429, 500, 503, 400, 401, 403, 409, 410, 413, 422)] == \
        ["done", "done", "retry", "retry", "retry", "retry"] + ["final"] * 7


def _store(tmp: Path, max_bytes: int = 2500, **upload) -> OriginalsStore:
    cfg = C.OriginalsConfig(dir=tmp / "orig", max_age_s=100, max_bytes=max_bytes,
                      upload=C.UploadConfig(**dict({"retry_min_s": 0.05, "retry_max_s": 0.1}, **upload)))
    return OriginalsStore(cfg)


def test_originals_prune_by_age_and_size(tmp_path: Path) -> None:
    st = _store(tmp_path)
    ids = [new_frame_id(1_700_000_000_000_000 + i * 1000) for i in range(4)]
    st.put(ids[0], b"\xff\xd8" + b"0" * 998, now=1000.0)
    st.put(ids[1], b"\xff\xd8" + b"1" * 998, now=1050.0)
    assert st.stats()["stored"] == 2 and st.total_bytes == 2000
    st.put(ids[2], b"\xff\xd8" + b"2" * 998, now=1060.0)  # 3000 > 2500: oldest goes
    assert not st.path_for(ids[0].hex()).exists() and st.path_for(ids[1].hex()).exists() and st.pruned == 1
    st.put(ids[3], b"\xff\xd8" + b"3" * 98, now=1155.0)  # ids[1] is now older than 100 s
    assert not st.path_for(ids[1].hex()).exists() and st.total_bytes == 1100 and st.pruned == 2
    st.stop()


def test_uploads_follow_the_http_contract_and_survive_restart(tmp_path: Path) -> None:
    central = UploadServer([503, 201, 409])
    try:
        st = _store(tmp_path, 10**6, policy="all", url=central.url, token="secret-token")
        a, b = new_frame_id(1_700_000_000_000_000), new_frame_id(1_700_000_000_001_000)
        jpeg = cv2.imencode(".jpg", draw_conveyor_frame(0, 64, 48))[1].tobytes()
        st.put(a, jpeg)
        st.put(b, jpeg)
        assert st.upload_once() == 2  # a: 503 (retry later), b: 201
        assert st.upload_row(a.hex())[0] == "pending" and st.upload_row(b.hex()) == ("done", 1, 201)
        st.stop()
        st = _store(tmp_path, 10**6, policy="all", url=central.url, token="secret-token")  # restart: queue persisted
        time.sleep(0.06)
        assert st.upload_once() == 1
        assert st.upload_row(a.hex()) == ("failed", 2, 409)  # 409 is final, kept for inspection
        req = central.requests[0]
        assert req["path"] == f"/v1/originals/{a.hex()}" and req["body"] == jpeg
        h = {k.lower(): v for k, v in req["headers"].items()}
        assert h["authorization"] == "Bearer secret-token" and h["content-type"] == "image/jpeg"
        import hashlib
        assert h["x-tokenline-sha256"] == hashlib.sha256(jpeg).hexdigest()
        assert st.request(a.hex()) and st.upload_row(a.hex())[0] == "pending"  # an operator may ask again
        assert not st.request("0" * 32)
        st.stop()
    finally:
        central.close()


def test_uploads_retry_connection_errors(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    st = _store(tmp_path, policy="on_request", url=f"http://127.0.0.1:{port}")
    fid = new_frame_id(1_700_000_000_000_000)
    st.put(fid, b"\xff\xd8jpeg")
    assert st.upload_once() == 0  # on_request: nothing queued yet
    assert st.request(fid.hex()) and st.upload_once() == 1
    state, attempts, status = st.upload_row(fid.hex())
    assert (state, attempts, status) == ("pending", 1, None) and st.upload_retries == 1
    st.stop()
