"""The agent through a secured broker: TLS, password from a file, per-device ACLs (deploy/broker generator)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from tests.deploy.test_broker_acl import secured  # noqa: F401 - the fixture is used by name
from tests.edge.conftest import agent_config, synthetic_camera
from tests.support.mqtt_sub import Collector
from tokenline import topics, wire


def test_tls_password_and_acl_refusals_are_kept(secured, tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    broker, tls_port, ca, pw = secured
    (tmp_path / "mqtt.pw").write_text(pw["jetson-a"] + "\n")
    central = Collector("127.0.0.1", tls_port, topic=topics.shared("central", topics.TOKENS_FILTER),
                        username="central", password=pw["central"], ca_file=ca, client_id="central")  # confirms
    assert central.wait_for(lambda c: c.suback == [1], 5)
    cams = [synthetic_camera("cam1", frames=6, line="line1"),
            synthetic_camera("cam9", seed=9, frames=3, line="line1")]  # not in the ACL: the broker refuses it
    cfg = agent_config(tmp_path, tiny_model_dir, tls_port, cams, device="jetson-a", site="plant1",
                       mqtt={"username": "jetson-a", "password_file": str(tmp_path / "mqtt.pw"),
                             "tls": {"enabled": True, "ca_file": str(ca)}})
    agent = Agent(parse_config(cfg)).start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(central.unique_seqs("cam1")) < 6
                                               or agent.outbox.rejected < 3 or agent.outbox.count):
            time.sleep(0.05)
        # Mosquitto answers a refused publish with PUBACK 0x87 and then drops the connection, so messages in
        # flight at that moment are sent again (QoS 1 duplicates): consumers dedupe by frame id.
        assert central.unique_seqs("cam1") == list(range(6))
        assert set(central.by_camera()) == {"cam1"}
        assert agent.outbox.rejected == 3 and agent.outbox.count == 0
        assert agent.snapshot()["outbox"]["publish_errors"] == 3
    finally:
        agent.shutdown()
        central.close()
    db = sqlite3.connect(str(tmp_path / "outbox.sqlite"))
    rows = db.execute("SELECT camera, seq, reason, payload FROM rejected ORDER BY seq").fetchall()
    assert [(r[0], r[1]) for r in rows] == [("cam9", 0), ("cam9", 1), ("cam9", 2)]
    assert "authori" in rows[0][2].lower() and wire.decode(rows[0][3]).camera == "cam9"  # kept for inspection


def test_wrong_password_keeps_retrying_and_a_fixed_password_file_is_read_on_the_next_attempt(
        secured, tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    broker, tls_port, ca, pw = secured
    secret = tmp_path / "mqtt.pw"
    secret.write_text("not-the-password\n")
    central = Collector("127.0.0.1", tls_port, topic=topics.shared("central", topics.TOKENS_FILTER),
                        username="central", password=pw["central"], ca_file=ca, client_id="central")
    assert central.wait_for(lambda c: c.suback == [1], 5)
    cfg = agent_config(tmp_path, tiny_model_dir, tls_port, [synthetic_camera("cam1", frames=5, line="line1")],
                       device="jetson-a", site="plant1",
                       mqtt={"username": "jetson-a", "password_file": str(secret),
                             "tls": {"enabled": True, "ca_file": str(ca)}})
    agent = Agent(parse_config(cfg)).start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (agent.outbox.inserted < 5 or agent.link.connection_drops < 2):
            time.sleep(0.05)
        snap = agent.snapshot()
        assert agent.link.connection_drops >= 2 and not snap["mqtt_connected"]  # refused, retried, still alive
        assert "MQTT not connected" in snap["problems"] and snap["outbox"]["pending"] == 5 and not central.messages
        secret.write_text(pw["jetson-a"] + "\n")  # rotated credentials: no restart needed
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (agent.outbox.count or len(central.messages) < 5):
            time.sleep(0.05)
        assert sorted(set(central.unique_seqs("cam1"))) == list(range(5)) and agent.outbox.count == 0
        assert agent.snapshot()["mqtt_connected"]
    finally:
        agent.shutdown()
        central.close()


def test_a_protocol_1_edge_against_a_broker_without_v1_grants_says_so(secured, tmp_path: Path,  # noqa: F811
                                                                       tiny_model_dir: Path) -> None:
    broker, tls_port, ca, pw = secured  # generated without --allow-protocol-v1
    (tmp_path / "mqtt.pw").write_text(pw["jetson-a"] + "\n")
    cfg = agent_config(tmp_path, tiny_model_dir, tls_port, [synthetic_camera("cam1", frames=2, line="line1")],
                       device="jetson-a", site="plant1",
                       mqtt={"username": "jetson-a", "password_file": str(tmp_path / "mqtt.pw"), "protocol": 1,
                             "tls": {"enabled": True, "ca_file": str(ca)}})
    agent = Agent(parse_config(cfg)).start()
    try:
        deadline = time.monotonic() + 30
        link = agent.link
        while time.monotonic() < deadline and (agent.outbox.rejected < 2 or not link.connected.is_set()
                                               or link.subscriptions_ok):
            time.sleep(0.05)
        assert agent.outbox.rejected == 2 and agent.outbox.count == 0  # v1 topics: publishes refused, rows kept
        snap = agent.snapshot()  # connected again after the refusals, still without its command subscription
        assert snap["mqtt_connected"] and snap["status"] == "degraded"
        assert "the broker refused the command/acknowledgement subscription" in snap["problems"]
    finally:
        agent.shutdown()
