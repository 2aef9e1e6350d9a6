"""Issue 9's hostile cases with real processes: Mosquitto, the edge agent (``tokenline-edge run``), central's
``ingest`` (and ``serve`` where needed) on SQLite.

Rows 1-5 (delivery and identity), on Mosquitto running the generated configuration
(deploy/broker/gen_broker_config.py): a frame leaves an edge only when central has committed it, so a broker crash,
a thief in central's shared group and a wiped session cost time, never frames (counted by frame id at central: none
lost, none stored twice); identities are bound by the broker (SUBSCRIBE and CONNECT refusals, client ids bound to
users) and checked by central (a payload naming another device is a dead letter).

Rows 6-12 (files, hostile input, operations): 150 images copied slowly into a watched folder (held open half
written, appended in bursts, written under a temporary name and renamed) while the edge is SIGKILLed and restarted
reach central exactly once each and are deleted only once committed; image bombs get a 400 from their header while
``/healthz`` keeps answering during legitimate heavy decodes; a flood of garbage leaves bounded dead letters; a
leaked token is revoked from the CLI and the admin API.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import cv2
import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.synthetic import draw_conveyor_frame
from tests.central.conftest import make_message
from tests.edge.conftest import agent_config, synthetic_camera
from tests.support.broker import Mosquitto, mosquitto_binary
from tests.support.image_bombs import jpeg_bomb, png_bomb
from tests.support.mqtt_sub import Collector
from tests.support.nodes import CentralNode, EdgeNode, wait_for
from tests.support.secured_broker import generated_broker
from tests.support.system_procs import CentralProcess, EdgeProcess
from tests.support.tiny_model import build_tiny_model
from tokenline import acks, topics, wire
from tokenline.manifest import Manifest

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it)")

ATTACK_INVENTORY = """
devices:
  - {id: jetson-a, site: plant1, cameras: [{line: line1, camera: cam1}]}
  - {id: jetson-b, site: plant1, cameras: [{line: line2, camera: cam7}]}
services: [central]
admins: [ops]
"""
REPLAYED = wire.FLAG_REPLAYED


def attack_edge(tmp: Path, model_dir: Path, port: int, frames: int, device: str = "jetson-a",
                password: str | None = None, fps: float = 50.0, **mqtt_over: Any) -> EdgeProcess:
    """An edge agent process for ``device`` (the inventory's camera), confirm timeouts short enough for a test."""
    line, cam = {"jetson-a": ("line1", "cam1"), "jetson-b": ("line2", "cam7")}[device]
    home = tmp / device
    home.mkdir(parents=True, exist_ok=True)
    mqtt_cfg: Dict[str, Any] = {"confirm_timeout_s": 2.0, "confirm_timeout_max_s": 4.0}
    if password is not None:
        (home / "mqtt.pw").write_text(password + "\n")
        mqtt_cfg.update(username=device, password_file=str(home / "mqtt.pw"))
    mqtt_cfg.update(mqtt_over)
    cfg = agent_config(home, model_dir, port, [synthetic_camera(cam, seed=7, frames=frames, fps=fps, line=line)],
                       device=device, site="plant1", mqtt=mqtt_cfg, originals={"enabled": False})
    return EdgeProcess(home, cfg, name=device).start()


def frame_rows(central: CentralProcess, device: str) -> List[tuple]:
    """(frame_id, seq, flags) of the frames central stored for ``device``."""
    return central.query("SELECT frame_id, seq, flags FROM frames WHERE device = ?", (device,))


def assert_exactly_once(central: CentralProcess, device: str, frames: int) -> List[tuple]:
    rows = frame_rows(central, device)
    assert len({r[0] for r in rows}) == len(rows), "a frame stored twice"
    assert sorted(r[1] for r in rows) == list(range(frames)), \
        f"missing seqs {sorted(set(range(frames)) - {r[1] for r in rows})[:10]}"
    return rows


def delivered(edge: EdgeProcess, central: CentralProcess, device: str, frames: int) -> bool:
    out = edge.outbox_stats()
    return len(frame_rows(central, device)) >= frames and out.get("inserted") == frames and out.get("pending") == 0


def paho_client(port: int, username: str | None, password: str | None, client_id: str,
                clean_start: bool = True) -> tuple:
    """A bare MQTT 5 client: (client, CONNACK reason code or None when none came)."""
    got: Dict[str, Any] = {}
    ready = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if username is not None:
        c.username_pw_set(username, password)
    c.on_connect = lambda cl, u, f, rc, p: (got.setdefault("rc", rc), ready.set())
    c.on_disconnect = lambda cl, u, f, rc, p: ready.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    c.connect("127.0.0.1", port, keepalive=10, clean_start=clean_start, properties=props)
    c.loop_start()
    ready.wait(10)
    return c, got.get("rc")


def close(c: mqtt.Client) -> None:
    c.disconnect()
    c.loop_stop()


@dataclass
class SecuredSystem:
    """The generated broker, every user's password, central's ingest worker (subscribed) and the edges started."""

    tmp: Path
    model_dir: Path
    broker: Mosquitto
    pw: Dict[str, str]
    central: CentralProcess
    edges: List[EdgeProcess] = field(default_factory=list)

    def edge(self, frames: int, device: str = "jetson-a", **kw: Any) -> EdgeProcess:
        e = attack_edge(self.tmp, self.model_dir, self.broker.port, frames, device, self.pw[device], **kw)
        self.edges.append(e)
        return e


@pytest.fixture
def secured_system(tmp_path: Path, tiny_model_dir: Path):
    broker, pw = generated_broker(tmp_path, ATTACK_INVENTORY)  # autosave every 60 s: a crash loses the memory
    broker.start()
    central = CentralProcess(tmp_path / "central", broker.port, tiny_model_dir, username="central",
                             password=pw["central"], client_id="central", log_level="INFO").start()
    system = SecuredSystem(tmp_path, tiny_model_dir, broker, pw, central)
    try:
        assert central.subscribed(), central.log_text()
        yield system
    finally:
        for e in system.edges:
            e.stop()
        central.stop()
        broker.stop()


def test_row1_broker_sigkill_while_ingest_is_down_loses_nothing(secured_system: SecuredSystem) -> None:
    frames, s = 100, secured_system
    s.central.stop()  # ingest down: the broker queues for its persistent session and PUBACKs the edge
    edge = s.edge(frames, confirm_timeout_s=4.0, confirm_timeout_max_s=8.0)
    assert wait_for(lambda: edge.outbox_stats().get("awaiting_confirmation") == frames, 60), edge.log_text()
    before = edge.outbox_stats()
    assert before["acked"] >= frames and before["pending"] == frames  # PUBACKed, kept: awaiting central
    s.broker.kill()  # SIGKILL: what the broker held in memory is gone
    s.broker.start()
    s.central.start()
    assert wait_for(lambda: delivered(edge, s.central, "jetson-a", frames), 90), \
        (edge.outbox_stats(), len(frame_rows(s.central, "jetson-a")), edge.log_text())
    time.sleep(1.0)  # anything redelivered late has its chance to (wrongly) show up twice
    rows = assert_exactly_once(s.central, "jetson-a", frames)
    out = edge.outbox_stats()
    print(f"\nrow 1: produced {frames}, stored {len(rows)} (distinct), resent by the edge {out['resent']}, "
          f"edge outbox {out['pending']} pending / {out['rejected']} rejected / {out['evicted']} evicted")
    assert all(r[2] & REPLAYED for r in rows)  # every stored frame came from a resend: the broker lost its copies
    assert out["resent"] >= frames and out["confirmed"] == frames and out["rejected"] == out["evicted"] == 0


def test_row2_a_device_joining_centrals_shared_group_is_refused_at_subscribe(secured_system: SecuredSystem) -> None:
    frames, s = 40, secured_system
    stolen = [topics.shared("central", topics.TOKENS_FILTER), topics.shared("central", topics.V1_TOKENS_FILTER),
              topics.TOKENS_FILTER, "#"]
    thief = Collector("127.0.0.1", s.broker.port, topic=stolen[0], extra=tuple(stolen[1:]), confirm=False,
                      username="jetson-b", password=s.pw["jetson-b"], client_id="tokenline-edge-jetson-b")
    try:
        assert thief.wait_for(lambda c: len(c.suback) == len(stolen), 10)
        assert thief.suback == [0x87] * len(stolen)  # Not authorized, at SUBSCRIBE time
        edge = s.edge(frames)
        assert wait_for(lambda: delivered(edge, s.central, "jetson-a", frames), 60), \
            (edge.outbox_stats(), edge.log_text())
        rows = assert_exactly_once(s.central, "jetson-a", frames)
    finally:
        thief.close()
    print(f"\nrow 2: produced {frames}, stored {len(rows)}, taken by the would-be thief {thief.count()}")
    assert thief.count() == 0 and not thief.raw and edge.outbox_stats()["rejected"] == 0


def test_row3_a_device_using_centrals_client_id_cannot_wipe_its_session(secured_system: SecuredSystem) -> None:
    frames, s = 30, secured_system
    s.central.stop()  # its persistent session keeps queueing
    # no resend within the test: whatever central stores must come from its preserved session
    edge = s.edge(frames, confirm_timeout_s=300.0, confirm_timeout_max_s=300.0)
    assert wait_for(lambda: edge.outbox_stats().get("awaiting_confirmation") == frames, 60), edge.log_text()
    # the attack: central's client id with a clean start and no session expiry, from a device's credentials,
    # with a guessed password and with none (Mosquitto 2.0.11 wipes the session in that last case when
    # use_username_as_clientid is set: the generated configuration binds client ids in the plugin instead)
    for user, password in (("jetson-b", s.pw["jetson-b"]), ("central", "guessed"), (None, None)):
        c, rc = paho_client(s.broker.port, user, password, client_id="central", clean_start=True)
        assert rc is not None and rc.value == 0x87, (user, rc)  # Not authorized, at CONNECT
        close(c)
    s.central.start()
    assert wait_for(lambda: delivered(edge, s.central, "jetson-a", frames), 60), \
        (edge.outbox_stats(), s.central.log_text()[-2000:])
    rows = assert_exactly_once(s.central, "jetson-a", frames)
    out = edge.outbox_stats()
    print(f"\nrow 3: produced {frames}, stored {len(rows)} from central's preserved session, resent {out['resent']}")
    assert not any(r[2] & REPLAYED for r in rows) and out["resent"] == 0  # the queued backlog survived


def test_rows4_5_client_id_takeover_and_forged_device_names_are_refused(secured_system: SecuredSystem) -> None:
    frames, s = 120, secured_system  # 4 s of frames at 30 fps: the attempts happen while the edge streams
    b_acks = Collector("127.0.0.1", s.broker.port, topic=topics.ack_topic("plant1", "jetson-b"), confirm=False,
                       username="jetson-b", password=s.pw["jetson-b"], client_id="tokenline-edge-jetson-b")
    try:
        edge = s.edge(frames, fps=30.0)
        assert wait_for(lambda: len(frame_rows(s.central, "jetson-a")) >= 10, 60), edge.log_text()
        # row 5: jetson-b publishes on its own topic a frame that names jetson-a
        manifest = Manifest.from_file(s.model_dir)
        forged = make_message(manifest, np.random.default_rng(5), site="plant1", line="line2", camera="cam7",
                              device="jetson-a")
        own_topic = topics.tokens_topic("plant1", "jetson-b", "line2", "cam7")
        b_acks.client.publish(own_topic, wire.encode(forged), qos=1).wait_for_publish(10)
        assert b_acks.wait_for(lambda c: len(c.raw) >= 1, 20), s.central.log_text()[-2000:]
        # row 4: jetson-a's client id with jetson-b's credentials, with none, with a guessed password
        for user, password in (("jetson-b", s.pw["jetson-b"]), (None, None), ("jetson-a", "guessed")):
            c, rc = paho_client(s.broker.port, user, password, client_id="tokenline-edge-jetson-a")
            assert rc is not None and rc.value == 0x87, (user, rc)  # Not authorized, at CONNECT
            close(c)
        # and on jetson-a's topic: refused by the broker (a fresh connection: Mosquitto closes it after a refusal)
        c, _ = paho_client(s.broker.port, "jetson-b", s.pw["jetson-b"], client_id="tokenline-edge-jetson-b")
        refusal: Dict[str, Any] = {}
        c.on_publish = lambda cl, u, mid, rc, p: refusal.setdefault("rc", rc)
        c.publish(topics.tokens_topic("plant1", "jetson-a", "line1", "cam1"), wire.encode(forged), qos=1)
        assert wait_for(lambda: "rc" in refusal, 10, 0.05) and refusal["rc"].value == 0x87
        close(c)
        assert wait_for(lambda: delivered(edge, s.central, "jetson-a", frames), 60), edge.log_text()
        rows = assert_exactly_once(s.central, "jetson-a", frames)
        out = edge.stats()
    finally:
        b_acks.close()
    (verdict,) = acks.decode(b_acks.raw[0][1])
    print(f"\nrows 4-5: jetson-a stored {len(rows)} of {frames}, connection drops {out['outbox']['connection_drops']}; "
          f"forged frame -> {verdict.status_name} {verdict.reason}")
    # row 4: the impostors were refused; jetson-a was never knocked off
    assert out["outbox"]["connection_drops"] == 0
    assert "tokenline-edge-jetson-a already connected" not in s.broker.log.read_text()
    # row 5: nothing stored under jetson-a's name from jetson-b; a dead letter, and jetson-b told why
    assert not s.central.query("SELECT 1 FROM frames WHERE frame_id = ?", (forged.frame_id_hex,))
    assert s.central.query("SELECT reason, topic FROM dead_letters") == [("identity_mismatch", own_topic)]
    assert (verdict.frame_id, verdict.status, verdict.reason) == (forged.frame_id, acks.REJECTED, "identity_mismatch")


def test_rows2_3_on_a_broker_that_lets_them_through_end_to_end_acks_still_lose_nothing(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """A broker without the generated configuration (anonymous, no plugin: as the issue found it). The thief's
    SUBSCRIBE goes through and the wipe succeeds; what they take is never confirmed, so the edges send it again."""
    broker = Mosquitto(tmp_path / "broker").start()
    central = CentralProcess(tmp_path / "central", broker.port, tiny_model_dir, client_id="central-ingest-1",
                             log_level="INFO").start()
    thief = Collector("127.0.0.1", broker.port, topic=topics.shared("central", topics.TOKENS_FILTER), confirm=False)
    edges: List[EdgeProcess] = []
    try:
        assert central.subscribed(), central.log_text()
        assert thief.wait_for(lambda c: c.suback == [1], 10)  # granted: the thief takes turns in the group
        fast = {"confirm_timeout_s": 1.0, "confirm_timeout_max_s": 2.0}
        edges.append(attack_edge(tmp_path, tiny_model_dir, broker.port, 30, device="jetson-a", **fast))
        assert wait_for(lambda: delivered(edges[0], central, "jetson-a", 30), 90), edges[0].outbox_stats()
        taken = thief.count()
        thief.close()
        # the session wipe: central down with a backlog queued, an impostor takes its client id with a clean start
        central.stop()
        edges.append(attack_edge(tmp_path, tiny_model_dir, broker.port, 20, device="jetson-b", **fast))
        assert wait_for(lambda: (edges[1].outbox_stats().get("acked") or 0) >= 20, 60), edges[1].log_text()
        wiper, rc = paho_client(broker.port, None, None, client_id="central-ingest-1", clean_start=True)
        assert rc is not None and not rc.is_failure
        close(wiper)
        central.start()
        assert wait_for(lambda: delivered(edges[1], central, "jetson-b", 20), 90), edges[1].outbox_stats()
        rows_a = assert_exactly_once(central, "jetson-a", 30)
        rows_b = assert_exactly_once(central, "jetson-b", 20)
        out_a, out_b = edges[0].outbox_stats(), edges[1].outbox_stats()
    finally:
        for e in edges:
            e.stop()
        thief.close()
        central.stop()
        broker.stop()
    print(f"\nthief took {taken} of 30 sends (all 30 delivered, {out_a['resent']} resends); session wiped with 20 "
          f"frames queued for it: 20 of 20 delivered ({out_b['resent']} resends)")
    assert taken > 0 and out_a["resent"] > 0 and len(rows_a) == 30
    assert all(r[2] & REPLAYED for r in rows_b) and len(rows_b) == 20  # the wiped backlog came back from the edge


@pytest.fixture(scope="module")
def files_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("attack-model"), size=32, patch=8, dim=384)


# -- rows 6, 7, 8: a watched folder, files copied in slowly, the edge restarted ------------------------------------
def _copy_slowly(data: bytes, dest: Path, how: str, hold_s: float, burst_s: float) -> None:
    """Copy ``data`` to ``dest`` the way real writers do, never all at once."""
    thirds = [data[: len(data) // 3], data[len(data) // 3: 2 * len(data) // 3], data[2 * len(data) // 3:]]
    if how == "held":  # one writer keeps the file open, half written, longer than the settle time
        with open(dest, "wb") as fh:
            for i, part in enumerate(thirds):
                fh.write(part)
                fh.flush()
                if i < 2:
                    time.sleep(hold_s)
    elif how == "append":  # reopened for every burst, pauses shorter than the settle time
        for part in thirds:
            with open(dest, "ab") as fh:
                fh.write(part)
            time.sleep(burst_s)
    else:  # write-then-rename: written slowly under a temporary name
        tmp = dest.with_name(dest.name + ".tmp")
        for part in thirds:
            with open(tmp, "ab") as fh:
                fh.write(part)
            time.sleep(burst_s)
        os.rename(tmp, dest)


def test_folder_files_copied_in_slowly_arrive_exactly_once_across_an_edge_restart(tmp_path, files_model_dir) -> None:
    n_files, writers = 150, 10
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    images = {f"part-{i:03d}.jpg": cv2.imencode(".jpg", draw_conveyor_frame(i, 320, 240))[1].tobytes()
              for i in range(n_files)}
    broker = Mosquitto(tmp_path / "broker").start()
    central = CentralNode(tmp_path / "central", files_model_dir, broker.port)
    central.start("ingest")
    camera = {"name": "files", "line": "line-1",
              "source": {"kind": "folder", "path": str(inbox), "delete_after_read": True, "settle_s": 0.5}}
    edge = EdgeNode(tmp_path, agent_config(tmp_path, files_model_dir, broker.port, [camera])).start()
    names = sorted(images)
    methods = ("held", "append", "rename")

    def writer(k: int) -> None:
        for j, name in enumerate(names[k::writers]):
            _copy_slowly(images[name], inbox / name, methods[j % 3], hold_s=0.7, burst_s=0.15)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(writers)]
    stored = lambda: central.query("SELECT COUNT(*) FROM frames")[0][0]  # noqa: E731
    try:
        for t in threads:
            t.start()
        assert wait_for(lambda: stored() >= 40, 90), f"only {stored()} frames arrived"
        edge.kill()  # mid-stream, files in the pipeline and the outbox; the writers go on
        time.sleep(1.0)
        edge.start()
        for t in threads:
            t.join(120)
        assert wait_for(lambda: stored() >= n_files and not any(inbox.glob("*.jpg")), 120), \
            f"{stored()} stored, {len(list(inbox.glob('*.jpg')))} files left"
        time.sleep(1.0)  # anything sent twice has its chance to (wrongly) show up
        rows = central.query("SELECT frame_id, source FROM frames")
        dups = central.query("SELECT COALESCE(SUM(value), 0) FROM counters WHERE name = 'duplicates'")[0][0]
        assert edge.stop() == 0
        stats = edge.stats()
    finally:
        if edge.proc is not None and edge.proc.poll() is None:
            edge.kill()
        central.stop()
        broker.stop()
    print(f"\n{n_files} files copied slowly, edge SIGKILLed once: stored {len(rows)}, distinct frame ids "
          f"{len({r[0] for r in rows})}, distinct files {len({r[1] for r in rows})}, resends dropped by central "
          f"as duplicates {dups}, files left {len(list(inbox.iterdir()))}")
    assert len(rows) == n_files and len({r[0] for r in rows}) == n_files
    assert sorted(r[1] for r in rows) == names  # every file exactly once, by name
    assert list(inbox.iterdir()) == []  # deleted after the commit, nothing rejected, no temporary left over
    assert stats["drops"]["total"] == {} and stats["cameras"]["files"]["source"]["rejected"] == 0
    assert stats["outbox"]["pending"] == 0


# -- rows 9, 10: image bombs at central's search ------------------------------------------------------------------
def test_image_bombs_get_a_400_and_healthz_answers_during_heavy_decodes(tmp_path, files_model_dir) -> None:
    central = CentralNode(tmp_path / "central", files_model_dir, api={"image_workers": 1})
    try:
        central.start("serve", "--no-sweeper")
        viewer = {"Authorization": "Bearer " + central.token("viewer-1", "viewer")}
        with httpx.Client(base_url=central.url, headers=viewer, timeout=120) as http:
            for name, body in (("bomb.jpg", jpeg_bomb()), ("bomb.png", png_bomb())):
                r = http.post("/v1/search", files={"image": (name, body)})
                print(f"\n{name}: {len(body)} bytes -> {r.status_code} {r.json()}")
                assert r.status_code == 400 and r.json()["error"] == "too_many_pixels"
            # legitimate but heavy: 49 MP JPEGs, decoded one at a time on the image pool
            x = np.linspace(0, 255, 7000).astype(np.uint8)
            big = cv2.imencode(".jpg", np.dstack([np.tile(x, (7000, 1)), np.tile(x[:, None], (1, 7000)),
                                                  np.full((7000, 7000), 80, np.uint8)]))[1].tobytes()
            t0 = time.monotonic()  # one heavy search alone: about one decode's time
            assert http.post("/v1/search", files={"image": ("big.jpg", big)}, data={"k": "3"}).status_code == 200
            alone = time.monotonic() - t0
            done: List[float] = []

            def search() -> None:
                r = http.post("/v1/search", files={"image": ("big.jpg", big)}, data={"k": "3"})
                assert r.status_code == 200, r.text
                done.append(time.monotonic())

            # three at once queue on the one image worker; /healthz is probed all along. Were images decoded on
            # the event loop, a probe arriving during a decode would wait for it (up to `alone`)
            threads = [threading.Thread(target=search) for _ in range(3)]
            start = time.monotonic()
            for t in threads:
                t.start()
            probes: List[Tuple[float, float]] = []
            with httpx.Client(base_url=central.url, timeout=60) as probe:
                while any(t.is_alive() for t in threads):
                    p0 = time.monotonic()
                    assert probe.get("/healthz").status_code == 200
                    probes.append((p0, time.monotonic()))
                    time.sleep(0.02)
            for t in threads:
                t.join(120)
        assert len(done) == 3
        busy = [b - a for a, b in probes if start < a and b < max(done)]  # answered while decodes were queued
        print(f"one search alone {alone:.3f} s; three took {max(done) - start:.3f} s; {len(busy)} probes meanwhile, "
              f"slowest {max(busy, default=0):.3f} s")
        assert len(busy) >= 3 and max(busy) < alone / 2  # never behind a decode: the event loop never decodes
    finally:
        central.stop()


# -- row 11: a flood of garbage -----------------------------------------------------------------------------------
def test_a_garbage_flood_leaves_bounded_dead_letters(tmp_path, files_model_dir) -> None:
    n, size, cap = 300, 60_000, 200_000
    broker = Mosquitto(tmp_path / "broker").start()
    central = CentralNode(tmp_path / "central", files_model_dir, broker.port,
                          retention={"sweep_interval_s": 0.5, "dead_letters_max_bytes": cap})
    try:
        central.start("ingest")
        central.start("serve")  # its sweeper enforces the dead letters' retention
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flooder", protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        topic = topics.tokens_topic("plant1", "flooder", "line1", "cam1")
        rng = np.random.default_rng(0)
        infos = [pub.publish(topic, bytes(rng.integers(0, 256, size, dtype=np.uint8)), qos=1) for _ in range(n)]
        for info in infos:
            info.wait_for_publish(30)
        pub.loop_stop()
        pub.disconnect()
        counted = lambda: central.query(  # noqa: E731
            "SELECT COALESCE(SUM(value), 0) FROM counters WHERE name = 'dead_letters'")[0][0]
        weight = lambda: central.query(  # noqa: E731
            "SELECT COALESCE(SUM(LENGTH(payload) + LENGTH(detail) + LENGTH(topic)), 0) FROM dead_letters")[0][0]
        assert wait_for(lambda: counted() >= n, 90), f"{counted()} dead letters counted"
        assert wait_for(lambda: weight() <= cap, 30), f"dead letters weigh {weight()} bytes"
        rows = central.query("SELECT id, LENGTH(payload), payload_len FROM dead_letters ORDER BY id")
        deleted = central.query("SELECT COALESCE(SUM(value), 0) FROM counters WHERE name = 'dead_letters_deleted'")
        top = central.query("SELECT MAX(id) FROM dead_letters")[0][0]
    finally:
        central.stop()
        broker.stop()
    print(f"\n{n} x {size} B of garbage ({n * size} B): {len(rows)} dead letters kept, {weight()} B, "
          f"{deleted[0][0]} deleted by the sweeper (cap {cap} B)")
    assert all(stored <= 1024 and length == size for _, stored, length in rows)  # garbage: only its head kept
    assert 0 < len(rows) <= cap // 1024 and deleted[0][0] >= n - len(rows)
    assert rows[-1][0] == top and [r[0] for r in rows] == list(range(rows[0][0], top + 1))  # the newest kept


# -- row 12: a leaked token ---------------------------------------------------------------------------------------
def test_a_leaked_token_is_revoked(tmp_path, files_model_dir) -> None:
    central = CentralNode(tmp_path / "central", files_model_dir)
    try:
        leaked = central.token("line3-tablet", "viewer")
        other = central.token("line4-tablet", "viewer")
        admin = central.token("ops", "admin")
        central.start("serve", "--no-sweeper")
        with httpx.Client(base_url=central.url, timeout=30) as http:
            def status(tok: str) -> int:
                return http.get("/v1/models", headers={"Authorization": "Bearer " + tok}).status_code

            assert status(leaked) == 200 and status(other) == 200
            central.cli("token", "revoke", "line3-tablet")  # from a shell, while the API runs
            assert wait_for(lambda: status(leaked) == 401, 20, step=0.5)  # the API's token cache lasts seconds
            listed = http.get("/v1/tokens", headers={"Authorization": "Bearer " + admin}).json()["tokens"]
            by_name: Dict[str, List[dict]] = {}
            for t in listed:
                by_name.setdefault(t["name"], []).append(t)
            assert by_name["line3-tablet"][0]["revoked_us"] is not None
            r = http.delete(f"/v1/tokens/{by_name['line4-tablet'][0]['id']}",
                            headers={"Authorization": "Bearer " + admin})
            assert r.status_code == 200 and status(other) == 401  # through the API: at once
            assert status(admin) == 200
    finally:
        central.stop()
