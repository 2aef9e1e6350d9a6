"""Broker security with the real Mosquitto: the generated dynamic-security configuration, TLS, wrong passwords
refused, devices confined to their own topics (publishing refused by PUBACK, subscribing refused by SUBACK)."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import mosquitto_binary
from tests.support.secured_broker import generated_broker, load_generator
from tokenline import topics

gen = load_generator()

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
alert_readers: [andon]
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

    def __init__(self, port: int, user: str, password: str, ca: Path | None = None, client_id: str | None = None) -> None:
        # the generated configuration binds a device to tokenline-edge-<id> and a service to its user name
        cid = client_id or (f"tokenline-edge-{user}" if user.startswith("jetson") else user)
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
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
    """The generated configuration with a TLS listener: (broker, its port, the CA file, passwords by user)."""
    tls = tmp_path / "tls"
    tls.mkdir()
    make_ca(tls)
    broker, passwords = generated_broker(tmp_path, INVENTORY, tls_dir=tls)
    broker.start()
    yield broker, broker.port, tls / "ca.crt", passwords
    broker.stop()


def test_generated_files_and_permissions(tmp_path: Path) -> None:
    inv = tmp_path / "inv.yaml"
    inv.write_text(INVENTORY)
    out = tmp_path / "o"
    assert gen.main([str(inv), "--out", str(out), "--plugin", "/opt/dynsec.so"]) == 0
    doc = json.loads((out / "dynamic-security.json").read_text())
    assert doc["defaultACLAccess"] == {"publishClientSend": False, "publishClientReceive": False, "subscribe": False,
                                       "unsubscribe": True}
    roles = {r["rolename"]: {(a["acltype"], a["topic"]) for a in r["acls"]} for r in doc["roles"]}
    assert roles["device-jetson-a"] == {
        ("publishClientSend", "tokenline/v2/plant1/jetson-a/tokens/line1/cam1"),
        ("publishClientSend", "tokenline/v2/plant1/jetson-a/status"),
        ("publishClientSend", "tokenline/v2/plant1/jetson-a/stats"),
        ("publishClientSend", "tokenline/v2/plant1/jetson-a/alert/line1/cam1"),
        ("subscribeLiteral", "tokenline/v2/plant1/jetson-a/cmd"), ("subscribeLiteral", "tokenline/v2/plant1/jetson-a/ack"),
        ("publishClientReceive", "tokenline/v2/plant1/jetson-a/cmd"),
        ("publishClientReceive", "tokenline/v2/plant1/jetson-a/ack")}
    assert ("subscribePattern", "$share/central/tokenline/v2/+/+/tokens/+/+") in roles["service"]
    assert not any(t.startswith("tokenline/v2/+/+/tokens") for k, t in roles["service"] if k.startswith("subscribe"))
    assert ("publishClientSend", topics.ALERTS_FILTER) in roles["service"]
    assert roles["alert-reader"] == {("subscribePattern", topics.ALERTS_FILTER),
                                     ("publishClientReceive", topics.ALERTS_FILTER)}
    clients = {c["username"]: c for c in doc["clients"]}
    assert [r["rolename"] for r in clients["jetson-b"]["roles"]] == ["device-jetson-b"]
    assert (clients["andon"]["clientid"], [r["rolename"] for r in clients["andon"]["roles"]]) == \
        ("andon", ["alert-reader"])
    a = clients["jetson-a"]
    salt = base64.b64decode(a["salt"])
    first = (out / "credentials" / "jetson-a").read_text()
    assert len(salt) == 12 and a["password"] == base64.b64encode(
        hashlib.pbkdf2_hmac("sha512", first.strip().encode(), salt, a["iterations"])).decode()
    conf = (out / "tokenline.conf").read_text()
    for line in ("plugin /opt/dynsec.so", f"plugin_opt_config_file {out / 'dynamic-security.json'}",
                 "allow_anonymous false", "persistence true", "autosave_interval 60", "listener 8883"):
        assert line in conf.splitlines()
    assert "use_username_as_clientid" not in conf  # see the generator's docstring
    assert (clients["jetson-a"]["clientid"], clients["central"]["clientid"]) == ("tokenline-edge-jetson-a", "central")
    assert "clientid" not in clients["ops"]
    assert (out / "credentials" / "jetson-a").stat().st_mode & 0o777 == 0o600
    gen.main([str(inv), "--out", str(out), "--plugin", "/opt/dynsec.so"])
    assert (out / "credentials" / "jetson-a").read_text() == first  # re-run keeps passwords
    gen.main([str(inv), "--out", str(out), "--plugin", "/opt/dynsec.so", "--rotate", "--allow-protocol-v1"])
    assert (out / "credentials" / "jetson-a").read_text() != first
    doc = json.loads((out / "dynamic-security.json").read_text())
    v1 = {a["topic"] for r in doc["roles"] if r["rolename"] == "device-jetson-a" for a in r["acls"]
          if "/v1/" in a["topic"]}
    assert v1 == {"tokenline/v1/plant1/line1/cam1/tokens", "tokenline/v1/plant1/jetson-a/status",
                  "tokenline/v1/plant1/jetson-a/stats", "tokenline/v1/plant1/jetson-a/cmd"}


@pytest.mark.parametrize("bad,msg", [
    ("devices: [{id: 'a b', site: s, cameras: []}]", "devices\\[0\\].id"),
    ("devices: [{id: a, site: s, cameras: [{line: l}]}]", "needs line and camera"),
    ("devices: [{id: a, site: s, cameras: [{line: l, camera: c}]}, {id: b, site: s, cameras: [{line: l, camera: c}]}]",
     "claimed by both"),
    ("services: [a]\nadmins: [a]", "unique"),
    ("device: []", "unknown keys"),
    ("devices: [{id: a, site: s, cameras: [], client_id: x}]\nservices: [{id: b, client_id: x}]", "client ids"),
    ("devices: [{id: a, site: s, cameras: [], client_id: 'a/b'}]", "devices\\[0\\].client_id"),
    ("services: [{name: b}]", "services\\[0\\]"),
    ("bridges: [{id: b}]", "bridges\\[0\\]"),
    ("alert_readers: [{id: r, site: s}]", "alert_readers\\[0\\]"),
    ("alert_readers: [a]\nadmins: [a]", "unique"),
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
    # client ids are bound to users: jetson-b cannot take jetson-a's (nor central's) and knocks nobody off
    for cid in ("tokenline-edge-jetson-a", "central"):
        impostor = Conn(tls_port, "jetson-b", pw["jetson-b"], ca, client_id=cid).connect()
        assert impostor.reason.value == 135, cid  # Not authorized, at CONNECT
        impostor.close()
    time.sleep(0.2)
    assert a.c.is_connected()
    # the plugin refuses subscriptions outside a device's own cmd/ack topics at SUBSCRIBE time (0x87)
    for topic in ("tokenline/v2/plant1/jetson-b/cmd", "tokenline/v2/plant1/jetson-b/tokens/line2/cam7",
                  "tokenline/v2/plant1/+/ack", "tokenline/#", "#", "$SYS/#",
                  topics.shared("central", topics.TOKENS_FILTER), "$share/x/tokenline/v2/plant1/jetson-a/cmd"):
        assert a.subscribe(topic).value == 135, topic
    for own in ("tokenline/v2/plant1/jetson-a/cmd", "tokenline/v2/plant1/jetson-a/ack"):
        assert a.subscribe(own).value == 1
    b = Conn(tls_port, "jetson-b", pw["jetson-b"], ca).connect()
    assert b.subscribe("tokenline/v2/plant1/jetson-b/cmd").value == 1
    assert a.publish("tokenline/v2/plant1/jetson-a/tokens/line1/cam1", b"own-a").value < 128  # own camera: accepted
    assert b.publish("tokenline/v2/plant1/jetson-b/tokens/line2/cam7", b"own-b").value < 128
    central = Conn(tls_port, "central", pw["central"], ca).connect()
    assert central.subscribe("tokenline/v2/+/+/tokens/+/+").value == 135  # tokens only through its shared group
    for dev in ("jetson-a", "jetson-b"):
        assert central.publish(f"tokenline/v2/plant1/{dev}/cmd", dev.encode()).value < 128
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (a.messages and b.messages and len(ops.messages) >= 4):
        time.sleep(0.02)
    time.sleep(0.3)  # let anything that should not arrive have its chance
    assert a.messages == [("tokenline/v2/plant1/jetson-a/cmd", b"jetson-a")]  # nothing of b's
    assert b.messages == [("tokenline/v2/plant1/jetson-b/cmd", b"jetson-b")]
    a.close()
    # Mosquitto closes the connection after a refused publish; a second connection with jetson-a's credentials
    # takes over its client id (the username): forge from a fresh connection each time
    for topic in ("tokenline/v2/plant1/jetson-b/tokens/line2/cam7", "tokenline/v1/plant1/line1/cam1/tokens"):
        forger = Conn(tls_port, "jetson-a", pw["jetson-a"], ca).connect()
        assert forger.publish(topic, b"forged").value == 135, topic  # v1 only with --allow-protocol-v1
        forger.close()
    time.sleep(0.3)
    tokens_seen = sorted(p for t, p in ops.messages if "/tokens" in t)
    assert tokens_seen == [b"own-a", b"own-b"]  # the forged messages never reached anyone

    # anomaly alerts: central publishes any device's camera's alert, a device only its own cameras', an alert
    # reader subscribes to the alerts (a filter inside them too) and to nothing else, and publishes nothing
    andon = Conn(tls_port, "andon", pw["andon"], ca).connect()
    assert not andon.reason.is_failure
    for topic in (topics.TOKENS_FILTER, "tokenline/#", "tokenline/v2/plant1/jetson-a/cmd", topics.STATUS_FILTER,
                  topics.shared("central", topics.TOKENS_FILTER)):
        assert andon.subscribe(topic).value == 135, topic
    assert andon.subscribe(topics.ALERTS_FILTER).value == 1
    central_alert = topics.alert_topic("plant1", "jetson-b", "line2", "cam7")
    edge_alert = topics.alert_topic("plant1", "jetson-a", "line1", "cam1")
    assert central.publish(central_alert, b"from-central").value < 128
    a = Conn(tls_port, "jetson-a", pw["jetson-a"], ca).connect()
    assert a.publish(edge_alert, b"from-edge").value < 128
    a.close()
    for topic in (central_alert, topics.alert_topic("plant1", "jetson-a", "line2", "cam7")):
        forger = Conn(tls_port, "jetson-a", pw["jetson-a"], ca).connect()
        assert forger.publish(topic, b"forged").value == 135, topic  # another device's, or not its camera
        forger.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(andon.messages) < 2:
        time.sleep(0.02)
    time.sleep(0.3)
    assert sorted(andon.messages) == sorted([(central_alert, b"from-central"), (edge_alert, b"from-edge")])
    assert andon.publish(central_alert, b"reader").value == 135
    for c in (ops, b, central, andon):
        c.close()


def test_api_user_publishes_commands_only(tmp_path: Path) -> None:
    """Central's API asks an edge for an original (request_original) as the inventory's `apis` user: it reaches the
    device's protocol 2 command topic and may do nothing else; with the ingest worker's user it is refused, since
    that user is bound to the worker's client id."""
    from central.commands import publish_command
    from central.config import parse_config
    from central.errors import Unavailable

    broker, pw = generated_broker(tmp_path, INVENTORY + "apis: [central-api]\n")
    broker.start()
    try:
        dev = Conn(broker.port, "jetson-a", pw["jetson-a"]).connect()
        assert dev.subscribe(topics.cmd_topic("plant1", "jetson-a")).value == 1
        base = {"mqtt": {"host": "127.0.0.1", "port": broker.port, "client_id": "central", "username": "central",
                         "password": pw["central"]}}
        api = parse_config(dict(base, api={"command_client_id": "central-api", "command_username": "central-api",
                                           "command_password": pw["central-api"]}))
        assert publish_command(api, topics.cmd_topic("plant1", "jetson-a"), b"req") == 0  # delivered
        assert publish_command(api, topics.cmd_topic("plant1", "jetson-b"), b"req") == 0x10  # nobody listens
        with pytest.raises(Unavailable, match="refused"):  # the worker's user, another client id: not authorized
            publish_command(parse_config(dict(base, api={"command_client_id": "central-api"})),
                            topics.cmd_topic("plant1", "jetson-a"), b"forged")
        deadline = time.monotonic() + 5
        while not dev.messages and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert dev.messages == [(topics.cmd_topic("plant1", "jetson-a"), b"req")]
        for topic in ("tokenline/#", topics.cmd_topic("plant1", "jetson-a"), topics.shared("central", topics.TOKENS_FILTER)):
            c = Conn(broker.port, "central-api", pw["central-api"]).connect()
            assert c.subscribe(topic).value == 135, topic
            c.close()
        for topic in ("tokenline/v2/plant1/jetson-a/tokens/line1/cam1", topics.ack_topic("plant1", "jetson-a"),
                      "tokenline/v2/plant1/jetson-a/status"):
            c = Conn(broker.port, "central-api", pw["central-api"]).connect()  # a refused publish ends the connection
            assert c.publish(topic).value == 135, topic
            c.close()
        dev.close()
    finally:
        broker.stop()
