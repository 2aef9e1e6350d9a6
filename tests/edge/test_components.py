"""Edge components on their own: sampling, queues, sources, runners, outbox, originals store/uploader, health."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np
import pytest

from edge_agent import config as C
from edge_agent import health
from edge_agent.capture import Sampler
from edge_agent.originals import OriginalsStore, classify_status, upload_decision
from edge_agent.outbox import Outbox, read_pending
from edge_agent.queues import DropOldestQueue, FrameHub, Sample
from edge_agent.runners import (OnnxRuntimeRunner, RunnerError, RunnerUnavailable, TensorRTRunner, pad_batch,
                                resolve_providers)
from edge_agent.sources import FolderWatchSource, FrameError, SourceEnded, SourceError, SyntheticConveyorSource
from edge_agent.synthetic import draw_conveyor_frame
from tests.support.tiny_model import build_tiny_model, reference_outputs
from tokenline.manifest import Manifest
from tokenline.preprocess import preprocess
from tokenline.wire import new_frame_id


# -- sampling and queues ----------------------------------------------------------------------------------------
def test_sampler_modes() -> None:
    s = Sampler(C.Sampling(mode="every_nth", every_nth=3))
    assert [s.take(0.0) for _ in range(7)] == [True, False, False, True, False, False, True]
    s = Sampler(C.Sampling(mode="max_fps", max_fps=10))
    taken = [t for t in np.arange(0, 1.0, 0.01) if s.take(float(t))]  # 100 fps in -> about 10 out
    assert 9 <= len(taken) <= 11
    s = Sampler(C.Sampling(mode="trigger"))
    assert not s.take(0.0)
    s.trigger()
    s.trigger()
    assert [s.take(0.0) for _ in range(3)] == [True, True, False]


def _sample(cam: str, i: int) -> Sample:
    return Sample(cam, "l", np.zeros((2, 2, 3), np.uint8), i, new_frame_id(i), 0.0)


def test_frame_hub_drops_oldest_counted_and_batches_round_robin() -> None:
    hub = FrameHub({"a": 3, "b": 3})
    for i in range(5):
        hub.put(_sample("a", i))
    hub.put(_sample("b", 100))
    assert hub.dropped == {"a": 2, "b": 0} and hub.depths() == {"a": 3, "b": 1}
    batch = hub.take_batch(3, 0.1, 0.0)
    assert [(s.camera, s.capture_ts_us) for s in batch] == [("a", 2), ("b", 100), ("a", 3)]
    assert hub.take_batch(8, 0.0, 0.0)[0].capture_ts_us == 4
    t0 = time.monotonic()
    assert hub.take_batch(4, 0.05, 0.0) == [] and time.monotonic() - t0 < 1


def test_drop_oldest_queue() -> None:
    q: DropOldestQueue[int] = DropOldestQueue(2)
    assert q.put(1) is None and q.put(2) is None and q.put(3) == 1
    assert q.dropped == 1 and q.get_many(5, 0.01) == [2, 3]


# -- sources ---------------------------------------------------------------------------------------------------
def test_synthetic_source_is_deterministic_with_corruption_and_disconnect() -> None:
    src = SyntheticConveyorSource(C.SyntheticSource(kind="synthetic", fps=1000, max_frames=6, corrupt_every=3,
                                                    fail_after=4, width=64, height=48))
    src.open()
    frames = [src.read() for _ in range(4)]
    assert frames[0].shape == (48, 64, 3) and frames[2].shape[0] == 1  # frame 3 is garbage
    np.testing.assert_array_equal(frames[1], draw_conveyor_frame(1, 64, 48, seed=0, defect_rate=0.3))
    with pytest.raises(SourceError, match="simulated disconnect"):
        src.read()
    src.open()
    src.read()
    src.read()
    with pytest.raises(SourceEnded):
        src.read()


def test_folder_source_reads_new_files_and_rejects_corrupt_ones(tmp_path: Path) -> None:
    d = tmp_path / "in"
    src = FolderWatchSource(C.FolderSource(kind="folder", path=d, poll_s=0.01))
    with pytest.raises(SourceError, match="does not exist"):
        src.open()
    d.mkdir()
    src.open()
    assert src.read() is None
    cv2.imwrite(str(d / "a.jpg"), draw_conveyor_frame(0, 64, 48))
    (d / "b.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert src.read().shape == (48, 64, 3)
    with pytest.raises(FrameError, match="not a decodable image"):
        src.read()
    assert (d / "rejected" / "b.jpg").exists() and src.read() is None
    for p in d.rglob("*"):
        p.unlink() if p.is_file() else None
    (d / "rejected").rmdir()
    d.rmdir()
    with pytest.raises(SourceError, match="disappeared"):
        src.read()


# -- runners ---------------------------------------------------------------------------------------------------
def test_onnxruntime_runner_matches_bare_session(tiny_model_dir: Path) -> None:
    m = Manifest.from_file(tiny_model_dir)
    r = OnnxRuntimeRunner(tiny_model_dir, m, providers=["auto"])
    frames = [draw_conveyor_frame(i, 96, 64) for i in range(3)]
    px = np.stack([preprocess(f, m.input) for f in frames])
    out = r.run(px)
    ref = reference_outputs(tiny_model_dir, px)
    np.testing.assert_allclose(out.tokens, ref[1], atol=1e-6)
    assert out.global_embedding.shape == (3, 384) and out.centroids.shape == (3, 16, 2) and "CPU" in r.name


def test_fixed_batch_model_is_padded(tmp_path: Path) -> None:
    d = build_tiny_model(tmp_path / "b2", batch=2, dim=16)
    m = Manifest.from_file(d)
    r = OnnxRuntimeRunner(d, m)
    assert r.batch_sizes == [2]
    px = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    out = r.run(px)
    assert out.tokens.shape == (3, 16, 16)
    np.testing.assert_allclose(out.tokens[2], r.run(px[2:3]).tokens[0], atol=1e-6)
    assert [c.shape[0] for c in pad_batch(px, [1, 4])] == [4]
    assert [c.shape[0] for c in pad_batch(np.zeros((9, 1)), [1, 4])] == [4, 4, 1]


def test_runner_refuses_a_model_that_disagrees_with_its_manifest(tmp_path: Path) -> None:
    d = build_tiny_model(tmp_path / "m", dim=32, output_dims=(64, 16))
    with pytest.raises(RunnerError, match="global_embedding is \\[B, 32\\], manifest says \\[B, 64\\]"):
        OnnxRuntimeRunner(d, Manifest.from_file(d))


def test_provider_resolution() -> None:
    assert resolve_providers(["auto"], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers(["auto"], ["CUDAExecutionProvider", "CPUExecutionProvider", "TensorrtExecutionProvider"]) \
        == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(RunnerError, match="model.providers"):
        resolve_providers(["CUDAExecutionProvider"], ["CPUExecutionProvider"])


def test_tensorrt_runner(tiny_model_dir: Path, tmp_path: Path) -> None:
    m = Manifest.from_file(tiny_model_dir)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(RunnerUnavailable, match="tensorrt"):
            TensorRTRunner(tmp_path / "x.engine", m)
        pytest.skip("tensorrt is not installed here: only the 'unavailable' path of the native runner is tested")
    with pytest.raises(RunnerError, match="does not exist"):
        TensorRTRunner(tmp_path / "x.engine", m)


# -- outbox ----------------------------------------------------------------------------------------------------
def _put(ob: Outbox, cam: str, n: int, size: int = 100) -> None:
    ob.put_many([(cam, f"t/{cam}", lambda seq: seq.to_bytes(4, "little") + b"x" * (size - 4)) for _ in range(n)])


def test_outbox_order_seq_persistence_and_eviction(tmp_path: Path) -> None:
    p = tmp_path / "ob.sqlite"
    ob = Outbox(p, max_bytes=10_000, max_messages=5)
    _put(ob, "a", 3)
    _put(ob, "b", 1)
    rows = ob.after(0, 100)
    assert [(r.camera, r.seq) for r in rows] == [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
    assert rows[1].payload[:4] == (1).to_bytes(4, "little")
    _put(ob, "a", 4)  # 8 rows > 5: the 3 oldest go
    assert ob.count == 5 and ob.evicted == 3
    assert [(r.camera, r.seq) for r in ob.after(0, 100)] == [("b", 0), ("a", 3), ("a", 4), ("a", 5), ("a", 6)]
    assert ob.delete([r.id for r in ob.after(0, 2)]) == 2 and ob.count == 3 and ob.bytes == 300
    ob.reject(ob.after(0, 1)[0].id, "Not authorized")
    assert ob.count == 2
    ob.close()
    ob2 = Outbox(p, max_bytes=250, max_messages=100)  # reopened: counters and seqs survive, byte cap applies
    assert ob2.count == 2 and ob2.evicted == 3 and ob2.next_seqs() == {"a": 7, "b": 1}
    assert ob2.startup_max_id == max(r.id for r in ob2.after(0, 10))
    _put(ob2, "a", 1)
    assert ob2.count == 2 and ob2.bytes == 200 and ob2.evicted == 4
    assert [r.seq for r in read_pending(p)] == [6, 7]
    db = sqlite3.connect(str(p))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT reason FROM rejected").fetchone()[0] == "Not authorized"


# -- originals -------------------------------------------------------------------------------------------------
class _Central:
    """A local HTTP server playing central's PUT /v1/originals/{id}; ``script`` gives statuses in order."""

    def __init__(self, script: List[int]) -> None:
        self.script = list(script)
        self.requests: List[Dict[str, object]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status = outer.script.pop(0) if outer.script else 201
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_upload_policy_and_status_classes() -> None:
    assert [upload_decision("every_nth", 3, i) for i in range(4)] == [True, False, False, True]
    assert upload_decision("all", 1, 5) and not upload_decision("none", 1, 0) and not upload_decision("on_request", 1, 0)
    assert [classify_status(s) for s in (200, 201, 408, 429, 500, 503, 400, 401, 403, 409, 410, 413, 422)] == \
        ["done", "done", "retry", "retry", "retry", "retry"] + ["final"] * 7


def _store(tmp: Path, max_bytes: int = 2500, **upload) -> OriginalsStore:
    cfg = C.Originals(dir=tmp / "orig", max_age_s=100, max_bytes=max_bytes,
                      upload=C.Upload(**dict({"retry_min_s": 0.05, "retry_max_s": 0.1}, **upload)))
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
    central = _Central([503, 201, 409])
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


# -- health ----------------------------------------------------------------------------------------------------
def test_sd_notify_writes_to_the_notify_socket(tmp_path: Path, monkeypatch) -> None:
    path = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(2)
    try:
        assert not health.sd_notify("READY=1")  # no $NOTIFY_SOCKET: nothing sent
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert health.sd_notify("WATCHDOG=1")
        assert srv.recv(100) == b"WATCHDOG=1"
        monkeypatch.setenv("WATCHDOG_USEC", "4000000")
        assert health.watchdog_interval_s() == 2.0
    finally:
        srv.close()


def test_health_server_and_file(tmp_path: Path) -> None:
    snap = {"status": "ok", "state": "running", "problems": [], "outbox": {"pending": 3}}
    srv = health.HealthServer("127.0.0.1", 0, lambda: snap)
    srv.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/health", timeout=5) as r:
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/stats", timeout=5) as r:
            assert json.loads(r.read())["outbox"]["pending"] == 3
        snap["status"] = "degraded"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/health", timeout=5)
        assert e.value.code == 503
    finally:
        srv.stop()
    health.write_health_file(tmp_path / "h" / "health.json", snap)
    assert json.loads((tmp_path / "h" / "health.json").read_text())["status"] == "degraded"


def test_video_file_source_reads_to_the_end_or_loops(tmp_path: Path) -> None:
    from edge_agent.sources import CvCaptureSource

    path = tmp_path / "clip.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (96, 64))
    assert vw.isOpened(), "OpenCV cannot write MJPG/AVI here"
    for i in range(5):
        vw.write(draw_conveyor_frame(i, 96, 64))
    vw.release()
    src = CvCaptureSource(C.FileSource(kind="file", path=path, pace=False))
    src.open()
    frames = [src.read() for _ in range(5)]
    assert all(f.shape == (64, 96, 3) for f in frames)
    with pytest.raises(SourceEnded):
        src.read()
    src.close()
    loop = CvCaptureSource(C.FileSource(kind="file", path=path, pace=False, loop=True))
    loop.open()
    assert len([loop.read() for _ in range(12)]) == 12
    loop.close()
    with pytest.raises(SourceError, match="does not exist"):
        CvCaptureSource(C.FileSource(kind="file", path=tmp_path / "none.avi")).open()
    with pytest.raises(SourceError, match="cannot open"):
        (tmp_path / "junk.avi").write_bytes(b"junk" * 100)
        CvCaptureSource(C.FileSource(kind="file", path=tmp_path / "junk.avi")).open()


def test_edge_agent_never_imports_torch_or_the_exporter() -> None:
    import subprocess
    import sys

    code = ("import sys, edge_agent.cli, edge_agent.agent, edge_agent.runners, tokenline.wire, tokenline.topics; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'exporter')]; print(bad); "
            "sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
