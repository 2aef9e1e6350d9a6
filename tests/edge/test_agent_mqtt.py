"""The agent end to end against a real Mosquitto, with a real subscriber decoding every message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.outbox import read_pending
from edge_agent.synthetic import draw_conveyor_frame
from tests.edge.conftest import agent_config, synthetic_camera
from tests.support.broker import Mosquitto, free_port
from tests.support.mqtt_sub import Collector, publish
from tests.support.tiny_model import reference_outputs
from tokenline import topics, wire
from tokenline.manifest import Manifest
from tokenline.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[2]


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def start_agent(tmp: Path, model: Path, port: int, cameras, **over) -> Agent:
    return Agent(parse_config(agent_config(tmp, model, port, cameras, **over))).start()


def test_round_trip_every_message_decodes_and_matches_the_bare_encoder(mosquitto, tmp_path, tiny_model_dir) -> None:
    sub = Collector(mosquitto.host, mosquitto.port, extra=(topics.STATUS_FILTER, topics.STATS_FILTER))
    agent = start_agent(tmp_path, tiny_model_dir, mosquitto.port,
                        [synthetic_camera("cam-1", seed=1, frames=12), synthetic_camera("cam-2", seed=2, frames=12,
                                                                                         line="line-2")])
    try:
        assert sub.wait_for(lambda s: s.count() >= 24, 30), f"got {sub.count()} messages"
        assert sub.wait_for(lambda s: any(t.endswith("/stats") for t, _, _ in s.raw), 5)
    finally:
        assert agent.shutdown()
    time.sleep(0.3)
    sub.close()
    assert not sub.errors
    manifest = Manifest.from_file(tiny_model_dir)
    by_cam = sub.by_camera()
    for cam, seed, line in (("cam-1", 1, "line-1"), ("cam-2", 2, "line-2")):
        msgs = by_cam[cam]
        assert [m.seq for m in msgs] == list(range(12))  # in order, nothing lost, no duplicates on a clean run
        assert [m.capture_ts_us for m in msgs] == sorted(m.capture_ts_us for m in msgs)
        frames = [draw_conveyor_frame(n, 96, 64, seed=seed, defect_rate=0.3) for n in range(12)]
        ref = reference_outputs(tiny_model_dir, np.stack([preprocess(f, manifest.input) for f in frames]))
        for n, m in enumerate(msgs):
            assert (m.device, m.site, m.line, m.token_dtype, m.flags) == ("edge-test", "site-a", line, "int8", 0)
            assert m.manifest_hash == manifest.hash_bytes()
            assert cos(m.summary.global_embedding, ref[0][n]) >= 0.999
            assert cos(m.summary.tokens, ref[1][n]).min() >= 0.999
            np.testing.assert_allclose(m.summary.sizes, ref[2][n])
            np.testing.assert_allclose(m.summary.centroids, ref[3][n], atol=1e-4)
            jpeg = tmp_path / "originals" / m.frame_id_hex[:8] / f"{m.frame_id_hex}.jpg"
            assert cv2.imread(str(jpeg)).shape == (64, 96, 3)  # the original is kept locally
    status = [(t, p, r) for t, p, r in sub.raw if t.endswith("/status")]
    assert status[0] == ("tokenline/v2/site-a/edge-test/status", b"online", False)
    assert status[-1][1] == b"offline"  # clean shutdown says offline itself
    stats = json.loads(next(p for t, p, _ in sub.raw if t.endswith("/stats")))
    assert set(stats) >= {"cameras", "inference", "queues", "outbox", "originals", "commands"}
    final = json.loads((tmp_path / "health.json").read_text())
    assert final["outbox"]["pending"] == 0 and final["inference"]["frames"] == 24 and final["state"] == "stopped"


def test_broker_down_then_back_everything_delivered_in_order(mosquitto, tmp_path, tiny_model_dir) -> None:
    sub = Collector(mosquitto.host, mosquitto.port)
    agent = start_agent(tmp_path, tiny_model_dir, mosquitto.port, [synthetic_camera("cam-1", frames=90, fps=30)],
                        messages={"token_dtype": "int4"})
    try:
        assert sub.wait_for(lambda s: s.count() >= 15, 30)
        mosquitto.stop()
        time.sleep(1.5)  # the camera keeps going; messages pile up in the outbox
        assert agent.outbox.count > 0 and not agent.link.connected.is_set()
        mosquitto.start()
        assert sub.wait_for(lambda s: len(s.unique_seqs("cam-1")) >= 90, 40), len(sub.unique_seqs("cam-1"))
        assert sub.unique_seqs("cam-1") == list(range(90))  # first arrivals in order; QoS 1 may repeat some
        assert any(m.replayed for m in sub.messages)  # sent after the reconnect: flagged historical
        assert all(m.token_dtype == "int4" for m in sub.messages) and not sub.errors
    finally:
        agent.shutdown()
        sub.close()


def test_frames_wait_for_centrals_confirmation_and_health_says_so(mosquitto, tmp_path, tiny_model_dir) -> None:
    import urllib.error
    import urllib.request

    bare = Collector(mosquitto.host, mosquitto.port, confirm=False)  # receives, never confirms
    agent = start_agent(tmp_path, tiny_model_dir, mosquitto.port, [synthetic_camera("cam-1", frames=6)],
                        mqtt={"confirm_timeout_s": 1.0, "confirm_timeout_max_s": 1.0},
                        health={"http_port": 0, "max_unconfirmed_age_s": 1.5})
    url = f"http://127.0.0.1:{agent.health_server.port}/health"
    try:
        assert bare.wait_for(lambda s: len(s.unique_seqs("cam-1")) == 6, 30)
        assert bare.wait_for(lambda s: agent.outbox.resent >= 6, 10)  # unconfirmed: sent again, flagged replayed
        # the counter moves when a resend is published; its delivery to the collector may still be on the way
        assert bare.wait_for(lambda s: any(m.replayed for m in s.messages), 10) and agent.outbox.count == 6
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and agent.snapshot()["status"] == "ok":
            time.sleep(0.1)
        snap = agent.snapshot()
        assert snap["outbox"]["acked"] >= 6 and snap["outbox"]["pending"] == 6 and snap["outbox"]["oldest_pending_s"] > 1.5
        assert any("awaiting central's confirmation" in p for p in snap["problems"])
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=5)
        body = json.loads(err.value.read())
        assert err.value.code == 503 and body["pending"] == 6 and "oldest_awaiting_s" in body
        central = Collector(mosquitto.host, mosquitto.port)  # now something confirms: the next resends do it
        try:
            assert central.wait_for(lambda s: agent.outbox.count == 0, 20), agent.snapshot()["outbox"]
        finally:
            central.close()
        out = agent.snapshot()["outbox"]
        assert out["confirmed"] == 6 and out["awaiting_confirmation"] == 0 and out["oldest_awaiting_s"] == 0
        with urllib.request.urlopen(url, timeout=5) as r:
            assert json.loads(r.read())["awaiting_confirmation"] == 0
    finally:
        agent.shutdown()
        bare.close()


def test_outbox_cap_evicts_oldest_counted_then_delivers_the_rest(tmp_path, tiny_model_dir) -> None:
    port = free_port()  # nothing listens yet: the broker is "down" from the start
    agent = start_agent(tmp_path, tiny_model_dir, port, [synthetic_camera("cam-1", frames=30, fps=100)],
                        outbox={"max_messages": 10})
    broker = None
    try:
        deadline = time.monotonic() + 30
        while agent.outbox.inserted < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.outbox.inserted == 30 and agent.outbox.count == 10 and agent.outbox.evicted == 20
        assert agent.snapshot()["outbox"]["evicted"] == 20
        assert [r.seq for r in read_pending(Path(tmp_path / "outbox.sqlite"))] == list(range(20, 30))
        broker = Mosquitto(tmp_path / "broker", port=port).start()
        sub = Collector(broker.host, broker.port)
        assert sub.wait_for(lambda s: len(s.unique_seqs("cam-1")) >= 10, 30)
        assert sub.unique_seqs("cam-1") == list(range(20, 30)) and all(m.replayed for m in sub.messages)
        sub.close()
    finally:
        agent.shutdown()
        if broker is not None:
            broker.stop()


def test_corrupt_frames_and_vanishing_cameras_never_stop_the_daemon(mosquitto, tmp_path, tiny_model_dir) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"part{i}.jpg"), draw_conveyor_frame(i, 96, 64))
    (folder / "part9.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    cams = [
        synthetic_camera("corrupt", frames=12, corrupt_every=3),  # frames 3, 6, 9, 12 are garbage
        synthetic_camera("flaky", seed=5, frames=10, fail_after=4),  # disconnects once, is reopened
        {"name": "folder", "line": "line-1", "source": {"kind": "folder", "path": str(folder), "poll_s": 0.05},
         "sampling": {"mode": "every_nth"}, "reopen": {"initial_s": 0.1, "max_s": 0.3}},
        {"name": "gone", "line": "line-1", "source": {"kind": "file", "path": str(tmp_path / "nope.mp4")},
         "reopen": {"initial_s": 0.1, "max_s": 0.3}},
    ]
    sub = Collector(mosquitto.host, mosquitto.port)
    agent = start_agent(tmp_path, tiny_model_dir, mosquitto.port, cams)
    try:
        assert sub.wait_for(lambda s: s.count() >= 8 + 10 + 3, 30), sub.by_camera().keys()
        for p in folder.glob("*.jpg"):
            p.unlink()
        for p in (folder / "rejected").iterdir():
            p.unlink()
        (folder / "rejected").rmdir()
        folder.rmdir()  # the watched folder vanishes too
        time.sleep(0.8)
        snap = agent.snapshot()
        cams_s = snap["cameras"]
        assert cams_s["corrupt"]["errors"] == 4 and cams_s["corrupt"]["sampled"] == 8
        assert cams_s["flaky"]["reopens"] >= 1 and cams_s["flaky"]["sampled"] == 10
        assert cams_s["folder"]["errors"] >= 2 and cams_s["folder"]["state"] == "reopening"
        assert cams_s["gone"]["state"] == "reopening" and cams_s["gone"]["errors"] >= 2
        assert snap["state"] == "running" and snap["status"] == "degraded"
        assert all(t.is_alive() for t in agent._threads)
        folder.mkdir()  # the folder comes back: frames flow again
        cv2.imwrite(str(folder / "late.jpg"), draw_conveyor_frame(7, 96, 64))
        assert sub.wait_for(lambda s: len(s.by_camera().get("folder", [])) >= 4, 15)
        by = sub.by_camera()
        assert len(by["corrupt"]) == 8 and len(by["flaky"]) == 10 and not sub.errors
    finally:
        agent.shutdown()
        sub.close()


def test_commands_trigger_pause_and_request_original(mosquitto, tmp_path, tiny_model_dir) -> None:
    from tests.support.upload_server import UploadServer

    central = UploadServer([])
    cams = [dict(synthetic_camera("trig", frames=None, fps=50), sampling={"mode": "trigger"}),
            synthetic_camera("cont", seed=3, frames=None, fps=20)]
    sub = Collector(mosquitto.host, mosquitto.port)
    agent = start_agent(tmp_path, tiny_model_dir, mosquitto.port, cams,
                        originals={"upload": {"policy": "on_request", "url": central.url, "token": "t0k"}})
    cmd = topics.cmd_topic("site-a", "edge-test")
    try:
        assert sub.wait_for(lambda s: len(s.by_camera().get("cont", [])) >= 3, 20)
        assert "trig" not in sub.by_camera()
        for _ in range(3):
            publish(mosquitto.host, mosquitto.port, cmd, topics.Command("trigger", camera="trig").to_json())
        assert sub.wait_for(lambda s: len(s.by_camera().get("trig", [])) == 3, 10)
        publish(mosquitto.host, mosquitto.port, cmd, b'{"action": "explode"}')  # rejected, counted, harmless
        publish(mosquitto.host, mosquitto.port, cmd, topics.Command("pause").to_json())
        assert sub.wait_for(lambda s: agent.paused, 5)
        n, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 0.4:  # let frames sampled before the pause drain
            time.sleep(0.05)
            if len(sub.by_camera()["cont"]) != n:
                n, stable_since = len(sub.by_camera()["cont"]), time.monotonic()
        time.sleep(0.6)
        assert len(sub.by_camera()["cont"]) == n  # paused: nothing new
        publish(mosquitto.host, mosquitto.port, cmd, topics.Command("resume").to_json())
        assert sub.wait_for(lambda s: len(s.by_camera()["cont"]) >= n + 3, 10)
        fid = sub.by_camera()["trig"][0].frame_id_hex
        publish(mosquitto.host, mosquitto.port, cmd, topics.Command("request_original", frame_id=fid).to_json())
        deadline = time.monotonic() + 10
        while not central.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert central.requests and central.requests[0]["path"] == f"/v1/originals/{fid}"
        assert cv2.imdecode(np.frombuffer(central.requests[0]["body"], np.uint8), cv2.IMREAD_COLOR) is not None
        c = agent.snapshot()["commands"]
        assert c["received"] == 7 and c["rejected"] == 1 and c["applied"] == 6
    finally:
        agent.shutdown()
        sub.close()
        central.close()


def _spawn(cfg_path: Path, log_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(cfg_path)], cwd=ROOT,
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def _next_seq(db_path: Path) -> int:
    import sqlite3

    db = sqlite3.connect(str(db_path))
    try:
        return int(db.execute("SELECT next_seq FROM seqs WHERE camera='cam-1'").fetchone()[0])
    finally:
        db.close()


def test_sigkill_mid_stream_then_restart_delivers_everything_and_sigterm_exits_clean(mosquitto, tmp_path,
                                                                                   tiny_model_dir) -> None:
    sub = Collector(mosquitto.host, mosquitto.port, extra=(topics.STATUS_FILTER,))
    cfg = agent_config(tmp_path, tiny_model_dir, mosquitto.port, [synthetic_camera("cam-1", frames=2000, fps=60)],
                       outbox={"synchronous": "FULL"})
    cfg_path = tmp_path / "edge.yaml"
    db_path = tmp_path / "outbox.sqlite"
    log_path = tmp_path / "agent.log"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = _spawn(cfg_path, log_path)
    try:
        # 1. killed while streaming live
        assert sub.wait_for(lambda s: s.count() >= 40, 60), log_path.read_text()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        time.sleep(0.3)
        delivered = set(sub.unique_seqs("cam-1"))
        pending = {r.seq for r in read_pending(db_path)}
        assert delivered | pending == set(range(_next_seq(db_path)))  # committed = delivered or still queued
        # 2. restarted while the broker is down, killed again with messages only in the outbox
        mosquitto.stop()
        proc = _spawn(cfg_path, log_path)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(read_pending(db_path)) < len(pending) + 10:
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        stranded = {r.seq for r in read_pending(db_path)}
        assert pending <= stranded and len(stranded - delivered) >= 10  # new messages exist only in the outbox
        total = _next_seq(db_path)
        # 3. broker back, agent restarted with a short run: everything arrives, in order
        mosquitto.start()
        cfg["cameras"][0]["source"]["max_frames"] = 5
        cfg_path.write_text(yaml.safe_dump(cfg))
        proc = _spawn(cfg_path, log_path)
        want = list(range(total + 5))
        assert sub.wait_for(lambda s: sorted(set(s.unique_seqs("cam-1"))) == want, 60), \
            (total, sorted(set(want) - set(sub.unique_seqs("cam-1")))[:10], log_path.read_text()[-2000:])
        assert sub.unique_seqs("cam-1") == want  # first arrivals in order across both crashes
        replayed = {m.seq for m in sub.messages if m.replayed}
        assert stranded - delivered <= replayed
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not read_pending(db_path)
        assert sub.wait_for(lambda s: bool(s.raw) and s.raw[-1][1] == b"offline", 5)
        assert not sub.errors
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sub.close()


def test_simulate_command_streams_synthetic_cameras(mosquitto, tmp_path, tiny_model_dir) -> None:
    sub = Collector(mosquitto.host, mosquitto.port)
    r = subprocess.run([sys.executable, "-m", "edge_agent", "simulate", "--model-dir", str(tiny_model_dir),
                        "--mqtt-port", str(mosquitto.port), "--cameras", "2", "--fps", "30", "--frames", "6",
                        "--workdir", str(tmp_path / "sim"), "--token-dtype", "int4", "--log-level", "WARNING"],
                       cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "12 frames encoded" in r.stdout
    assert sub.wait_for(lambda s: s.count() >= 12, 10)
    assert {c: [m.seq for m in ms] for c, ms in sub.by_camera().items()} == {"cam-1": list(range(6)),
                                                                            "cam-2": list(range(6))}
    assert all(m.token_dtype == "int4" and len(wire.encode(m, "int4")) <= 4096 for m in sub.messages)
    sub.close()


def test_slic_model_sends_footprints_projected_tokens_and_the_frame_geometry(mosquitto, tmp_path,
                                                                            slic_model_dir) -> None:
    """Wire v2 from a slic model: tokens of dim d, the footprint (sizes and centroids follow from it) and the
    frame's size and ROI in the metadata, so central can draw a footprint on the original frame."""
    sub = Collector(mosquitto.host, mosquitto.port)
    cam = dict(synthetic_camera("cam-1", seed=3, frames=6), roi=[16, 8, 64, 48])
    agent = start_agent(tmp_path, slic_model_dir, mosquitto.port, [cam])
    try:
        assert sub.wait_for(lambda s: s.count() >= 6, 30), f"got {sub.count()} messages"
    finally:
        assert agent.shutdown()
    sub.close()
    assert not sub.errors
    manifest = Manifest.from_file(slic_model_dir)
    frames = [draw_conveyor_frame(n, 96, 64, seed=3, defect_rate=0.3) for n in range(6)]
    ref = reference_outputs(slic_model_dir, np.stack([preprocess(f, manifest.input, (16, 8, 64, 48)) for f in frames]))
    for n, m in enumerate(sub.by_camera()["cam-1"]):
        s = m.summary
        assert m.version == 2 and s.tokens.shape == (16, 96) and s.global_embedding.shape == (384,)
        assert cos(s.tokens, ref[1][n]).min() >= 0.999 and cos(s.global_embedding, ref[0][n]) >= 0.999
        np.testing.assert_array_equal(s.footprint, ref[2][n])
        np.testing.assert_array_equal(s.sizes, np.ones(16))  # one cell per token in this model
        assert m.metadata == {"frame": {"width": 96, "height": 64, "roi": [16, 8, 64, 48]}}


def test_a_slic_model_refuses_wire_version_1(tmp_path, slic_model_dir) -> None:
    from edge_agent.agent import AgentError

    cfg = parse_config(agent_config(tmp_path, slic_model_dir, free_port(), [synthetic_camera("cam-1")],
                                    messages={"wire_version": 1}))
    with pytest.raises(AgentError, match="wire_version: 1 cannot carry the slic summary"):
        Agent(cfg)
