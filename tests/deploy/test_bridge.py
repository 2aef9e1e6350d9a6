"""Growing past one machine: a site broker bridged to a central broker (deploy/broker/site-bridge.conf.template)
forwards tokens up and commands and acknowledgements down, and holds tokens while the central broker is away."""

from __future__ import annotations

import string
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.broker import Mosquitto, mosquitto_binary
from tests.support.secured_broker import generated_broker

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it)")


def client(port: int, name: str, sub: str | None = None, password: str | None = None) -> tuple[mqtt.Client, list]:
    got: list = []
    ready = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    if password is not None:
        c.username_pw_set(name, password)

    def on_connect(cl, u, f, rc, p):
        if sub:
            cl.subscribe(sub, qos=1)
        else:
            ready.set()

    c.on_connect = on_connect
    c.on_subscribe = lambda *a: ready.set()
    c.on_message = lambda cl, u, m: got.append((m.topic, m.payload))
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300  # persistent session: the broker queues QoS 1 messages while we are away
    c.connect("127.0.0.1", port, properties=props)
    c.loop_start()
    assert ready.wait(10)
    return c, got


def wait_for(pred, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


INVENTORY = """
bridges: [{id: bridge-plant1, site: plant1}, {id: bridge-plant2, site: plant2}]
admins: [ops]
"""


def test_site_bridge_forwards_tokens_up_commands_down_and_buffers_outages(tmp_path: Path) -> None:
    # the central broker runs the generated configuration: the bridge user speaks for the devices of its site
    central, pw = generated_broker(tmp_path / "central", INVENTORY)
    tmpl = string.Template((ROOT / "deploy" / "broker" / "site-bridge.conf.template").read_text())
    bridge = tmpl.substitute(SITE="plant1", CENTRAL_HOST="127.0.0.1", CENTRAL_PORT=central.port,
                             BRIDGE_USER="bridge-plant1", BRIDGE_PASSWORD=pw["bridge-plant1"])
    site = Mosquitto(tmp_path / "site", extra_conf=bridge)
    try:
        central.start()
        site.start()
        up, got_up = client(central.port, "ops", "tokenline/v2/+/+/tokens/+/+", pw["ops"])
        edge, got_down = client(site.port, "edge", "tokenline/v2/plant1/jetson-a/+")
        time.sleep(1.0)  # let the bridge connect and subscribe
        for i in range(5):
            edge.publish("tokenline/v2/plant1/jetson-a/tokens/line1/cam1", f"t{i}".encode(), qos=1)
        assert wait_for(lambda: len(got_up) >= 5), got_up
        assert [p for _, p in got_up] == [f"t{i}".encode() for i in range(5)]
        up.publish("tokenline/v2/plant1/jetson-a/cmd", b'{"cmd":"trigger"}', qos=1)
        up.publish("tokenline/v2/plant1/jetson-a/ack", b"ack", qos=1)
        assert wait_for(lambda: got_down == [("tokenline/v2/plant1/jetson-a/cmd", b'{"cmd":"trigger"}'),
                                             ("tokenline/v2/plant1/jetson-a/ack", b"ack")])
        up.disconnect()
        up.loop_stop()

        # central broker away: the site broker keeps the edge's tokens and forwards them when it is back
        central.stop()
        for i in range(5, 10):
            edge.publish("tokenline/v2/plant1/jetson-a/tokens/line1/cam1", f"t{i}".encode(), qos=1)
        time.sleep(0.5)
        central.start()
        got_later: list = []
        up2 = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="ops", protocol=mqtt.MQTTv5,)
        up2.username_pw_set("ops", pw["ops"])
        up2.on_message = lambda cl, u, m: got_later.append(m.payload)
        up2.on_connect = lambda cl, u, f, rc, p: cl.subscribe("tokenline/v2/+/+/tokens/+/+", qos=1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        up2.connect("127.0.0.1", central.port, clean_start=False, properties=props)
        up2.loop_start()
        assert wait_for(lambda: len(got_later) >= 5, timeout=40), got_later
        assert got_later[:5] == [f"t{i}".encode() for i in range(5, 10)]
        up2.disconnect()
        up2.loop_stop()
        edge.disconnect()
        edge.loop_stop()
        # the bridge user speaks for its own site only
        acks: dict = {}
        rogue, _ = client(central.port, "bridge-plant1", None, pw["bridge-plant1"])
        rogue.on_publish = lambda cl, u, mid, rc, p: acks.__setitem__(mid, rc)
        info = rogue.publish("tokenline/v2/plant2/jetson-z/tokens/line1/cam1", b"x", qos=1)
        assert wait_for(lambda: info.mid in acks) and acks[info.mid].value == 135  # Not authorized
        rogue.disconnect()
        rogue.loop_stop()
    finally:
        site.stop()
        central.stop()
