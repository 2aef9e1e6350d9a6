"""Issue 9's hostile cases with real processes: Mosquitto running the generated configuration
(deploy/broker/gen_broker_config.py), the edge agent (``tokenline-edge run``) and central's ingest worker
(``tokenline-central ingest``) on SQLite.

Rows 1-5 (delivery and identity): a frame leaves an edge only when central has committed it, so a broker crash,
a thief in central's shared group and a wiped session cost time, never frames (counted by frame id at
central: none lost, none stored twice); identities are bound by the broker (SUBSCRIBE and CONNECT refusals,
client ids bound to users) and checked by central (a payload naming another device is a dead letter).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.central.conftest import make_message
from tests.edge.conftest import agent_config, synthetic_camera
from tests.support.broker import Mosquitto, mosquitto_binary
from tests.support.mqtt_sub import Collector
from tests.support.secured_broker import generated_broker
from tests.support.system_procs import CentralProcess, EdgeProcess, wait_until
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
    assert wait_until(lambda: edge.outbox_stats().get("awaiting_confirmation") == frames, 60), edge.log_text()
    before = edge.outbox_stats()
    assert before["acked"] >= frames and before["pending"] == frames  # PUBACKed, kept: awaiting central
    s.broker.kill()  # SIGKILL: what the broker held in memory is gone
    s.broker.start()
    s.central.start()
    assert wait_until(lambda: delivered(edge, s.central, "jetson-a", frames), 90), \
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
        assert wait_until(lambda: delivered(edge, s.central, "jetson-a", frames), 60), \
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
    assert wait_until(lambda: edge.outbox_stats().get("awaiting_confirmation") == frames, 60), edge.log_text()
    # the attack: central's client id with a clean start and no session expiry, from a device's credentials,
    # with a guessed password and with none (Mosquitto 2.0.11 wipes the session in that last case when
    # use_username_as_clientid is set: the generated configuration binds client ids in the plugin instead)
    for user, password in (("jetson-b", s.pw["jetson-b"]), ("central", "guessed"), (None, None)):
        c, rc = paho_client(s.broker.port, user, password, client_id="central", clean_start=True)
        assert rc is not None and rc.value == 0x87, (user, rc)  # Not authorized, at CONNECT
        close(c)
    s.central.start()
    assert wait_until(lambda: delivered(edge, s.central, "jetson-a", frames), 60), \
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
        assert wait_until(lambda: len(frame_rows(s.central, "jetson-a")) >= 10, 60), edge.log_text()
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
        assert wait_until(lambda: "rc" in refusal, 10, 0.05) and refusal["rc"].value == 0x87
        close(c)
        assert wait_until(lambda: delivered(edge, s.central, "jetson-a", frames), 60), edge.log_text()
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
        assert wait_until(lambda: delivered(edges[0], central, "jetson-a", 30), 90), edges[0].outbox_stats()
        taken = thief.count()
        thief.close()
        # the session wipe: central down with a backlog queued, an impostor takes its client id with a clean start
        central.stop()
        edges.append(attack_edge(tmp_path, tiny_model_dir, broker.port, 20, device="jetson-b", **fast))
        assert wait_until(lambda: (edges[1].outbox_stats().get("acked") or 0) >= 20, 60), edges[1].log_text()
        wiper, rc = paho_client(broker.port, None, None, client_id="central-ingest-1", clean_start=True)
        assert rc is not None and not rc.is_failure
        close(wiper)
        central.start()
        assert wait_until(lambda: delivered(edges[1], central, "jetson-b", 20), 90), edges[1].outbox_stats()
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
