"""Broker security with the real Mosquitto: generated credentials and ACLs, TLS, wrong passwords refused,
devices confined to their own topics."""

from __future__ import annotations

import importlib.util
import ssl
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import Mosquitto, free_port, mosquitto_binary

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gen_broker_config", ROOT / "deploy" / "broker" / "gen_broker_config.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)  # type: ignore[union-attr]

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it)")

INVENTORY = """
devices:
  - id: jetson-a
    site: plant1
    cameras: [{line: line1, camera: cam1}]
  - id: jetson-b
    site: plant1
    cameras: [{line: line2, camera: cam7}]
services: [central]
admins: [ops]
"""


def make_ca(d: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=tokenline-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")


class Conn:
    """A paho MQTT 5 client with blocking helpers that report the broker's reason codes."""

    def __init__(self, port: int, user: str, password: str, ca: Path | None = None) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.monotonic_ns()}",
                             protocol=mqtt.MQTTv5)
        self.c.username_pw_set(user, password)
        if ca is not None:
            self.c.tls_set(ca_certs=str(ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.connack = threading.Event()
        self.reason = None
        self.messages: list = []
        self.acks: dict = {}
        self.subacks: dict = {}
        self.c.on_connect = lambda c, u, f, rc, p: (setattr(self, "reason", rc), self.connack.set())
        self.c.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.__setitem__(mid, rcs)
        self.port = port

    def connect(self) -> "Conn":
        self.c.connect("127.0.0.1", self.port, keepalive=10)
        self.c.loop_start()
        assert self.connack.wait(10), "no CONNACK"
        return self

    def publish(self, topic: str, payload: bytes = b"x"):
        info = self.c.publish(topic, payload, qos=1)
        deadline = time.monotonic() + 10
        while info.mid not in self.acks and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.acks[info.mid]

    def subscribe(self, topic: str):
        _, mid = self.c.subscribe(topic, qos=1)
        deadline = time.monotonic() + 10
        while mid not in self.subacks and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.subacks[mid][0]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def secured(tmp_path: Path):
    inv_file = tmp_path / "inventory.yaml"
    inv_file.write_text(INVENTORY)
    tls = tmp_path / "tls"
    tls.mkdir()
    make_ca(tls)
    out = tmp_path / "broker-conf"
    tls_port = free_port()
    assert gen.main([str(inv_file), "--out", str(out), "--port", str(tls_port), "--tls-dir", str(tls)]) == 0
    passwords = {u: (out / "credentials" / u).read_text().strip() for u in ("jetson-a", "jetson-b", "central", "ops")}
    # per_listener_settings is false: the generated password file and ACLs apply to every listener
    broker = Mosquitto(tmp_path / "broker", allow_anonymous=False, extra_conf=(out / "tokenline.conf").read_text())
    broker.start()
    yield broker, tls_port, tls / "ca.crt", passwords
    broker.stop()


def test_generated_files_and_permissions(tmp_path: Path) -> None:
    inv = tmp_path / "inv.yaml"
    inv.write_text(INVENTORY)
    out = tmp_path / "o"
    gen.main([str(inv), "--out", str(out)])
    acl = (out / "acl").read_text()
    assert "user jetson-a\ntopic write tokenline/v1/plant1/line1/cam1/tokens" in acl
    assert "topic read tokenline/v1/plant1/jetson-a/cmd" in acl
    assert "line2/cam7" not in acl.split("user jetson-b")[0]
    assert (out / "credentials" / "jetson-a").stat().st_mode & 0o777 == 0o600
    first = (out / "credentials" / "jetson-a").read_text()
    gen.main([str(inv), "--out", str(out)])
    assert (out / "credentials" / "jetson-a").read_text() == first  # re-run keeps passwords
    gen.main([str(inv), "--out", str(out), "--rotate"])
    assert (out / "credentials" / "jetson-a").read_text() != first


@pytest.mark.parametrize("bad,msg", [
    ("devices: [{id: 'a b', site: s, cameras: []}]", "devices\\[0\\].id"),
    ("devices: [{id: a, site: s, cameras: [{line: l}]}]", "needs line and camera"),
    ("devices: [{id: a, site: s, cameras: [{line: l, camera: c}]}, {id: b, site: s, cameras: [{line: l, camera: c}]}]",
     "claimed by both"),
    ("services: [a]\nadmins: [a]", "unique"),
    ("device: []", "unknown keys"),
])
def test_inventory_errors_name_the_key(tmp_path: Path, bad: str, msg: str) -> None:
    p = tmp_path / "inv.yaml"
    p.write_text(bad)
    with pytest.raises(gen.InventoryError, match=msg):
        gen.load_inventory(p)


def test_tls_auth_and_acl_enforced_by_the_real_broker(secured) -> None:
    broker, tls_port, ca, pw = secured
    # wrong password refused (MQTT 5 reason code "Bad user name or password" / "Not authorized")
    bad = Conn(tls_port, "jetson-a", "wrong", ca).connect()
    assert bad.reason.is_failure
    bad.close()
    # plain TCP client speaking to the TLS port never gets a CONNACK
    plain = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    plain.username_pw_set("jetson-a", pw["jetson-a"])
    with pytest.raises(Exception):
        plain.connect("127.0.0.1", tls_port, keepalive=5)
        rc = plain.loop(timeout=3.0)
        plain.loop(timeout=3.0)
        assert plain.is_connected() and rc == 0
        raise AssertionError("unreachable")
    ops = Conn(tls_port, "ops", pw["ops"], ca).connect()
    assert ops.subscribe("tokenline/#").value < 128
    a = Conn(tls_port, "jetson-a", pw["jetson-a"], ca).connect()
    assert not a.reason.is_failure
    # mosquitto 2.0 grants SUBSCRIBE and enforces read ACLs at delivery: a subscribes to b's topics and must
    # receive nothing from them
    for topic in ("tokenline/v1/plant1/jetson-b/cmd", "tokenline/v1/plant1/line2/cam7/tokens",
                  "tokenline/v1/plant1/jetson-a/cmd"):
        a.subscribe(topic)
    b = Conn(tls_port, "jetson-b", pw["jetson-b"], ca).connect()
    b.subscribe("tokenline/v1/plant1/jetson-b/cmd")
    assert a.publish("tokenline/v1/plant1/line1/cam1/tokens", b"own-a").value < 128  # own camera: accepted
    assert b.publish("tokenline/v1/plant1/line2/cam7/tokens", b"own-b").value < 128
    forger = Conn(tls_port, "jetson-a", pw["jetson-a"], ca).connect()
    assert forger.publish("tokenline/v1/plant1/line2/cam7/tokens", b"forged").value == 135  # Not authorized
    forger.close()
    central = Conn(tls_port, "central", pw["central"], ca).connect()
    for dev in ("jetson-a", "jetson-b"):
        assert central.publish(f"tokenline/v1/plant1/{dev}/cmd", dev.encode()).value < 128
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (a.messages and b.messages and len(ops.messages) >= 4):
        time.sleep(0.02)
    time.sleep(0.3)  # let anything that should not arrive have its chance
    tokens_seen = sorted(p for t, p in ops.messages if t.endswith("/tokens"))
    assert tokens_seen == [b"own-a", b"own-b"]  # the forged message never reached anyone
    assert a.messages == [("tokenline/v1/plant1/jetson-a/cmd", b"jetson-a")]  # nothing of b's
    assert b.messages == [("tokenline/v1/plant1/jetson-b/cmd", b"jetson-b")]
    for c in (ops, a, b, central):
        c.close()
