"""Ingest through a real Mosquitto: SIGKILL between receive and commit -> redelivery, no loss, no
duplicates; hostile payloads -> dead letters while the worker keeps going; device status and stats."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from central import store
from sql.db import make_engine
from sql.migrate import upgrade
from sql.models import DeadLetter, Frame
from tests.central.conftest import make_message, tx
from tests.support.mqtt_sub import Collector
from tokenline import acks, topics
from tokenline.wire import encode, peek_frame_id

ROOT = Path(__file__).resolve().parents[2]


def _publisher(broker) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-pub", protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def _publish_all(c: mqtt.Client, items) -> None:
    infos = [c.publish(t, p, qos=1, retain=r) for t, p, r in items]
    for i in infos:
        i.wait_for_publish(10)


def _worker(tmp_path: Path, db_url: str, broker, linger_ms: int, name: str = "w1") -> subprocess.Popen:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(json.dumps({
        "database": {"url": db_url},
        "mqtt": {"host": broker.host, "port": broker.port, "client_id": f"central-{name}", "group": "g1"},
        "ingest": {"batch_max": 500, "batch_linger_ms": linger_ms},
        "originals": {"root": str(tmp_path / "originals")}}))
    return subprocess.Popen([sys.executable, "-m", "central.cli", "--config", str(cfg), "--log-level", "DEBUG",
                             "ingest", "--no-migrate"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


class LogTail:
    """Drains a worker's stderr on a thread (a full pipe would block it) and waits for lines."""

    def __init__(self, p: subprocess.Popen) -> None:
        self.lines: list = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, args=(p,), daemon=True).start()

    def _read(self, p: subprocess.Popen) -> None:
        for line in p.stderr:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def wait(self, pattern: str, count: int, timeout: float = 20.0) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: sum(pattern in x for x in self.lines) >= count, timeout)
        assert ok, f"saw {sum(pattern in x for x in self.lines)}/{count} lines with {pattern!r}:\n" + "".join(self.lines[-20:])


def _count(engine, model) -> int:
    with Session(engine) as s:
        return int(s.scalar(select(func.count()).select_from(model)))


def _wait_for(fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    return fn()


def test_sigkill_between_receive_and_commit_redelivers_without_loss_or_duplicates(
        db_url, mosquitto, tmp_path, tiny_manifest):
    engine = make_engine(db_url)
    upgrade(engine)
    tx(engine, store.register_model, tiny_manifest)
    rng = np.random.default_rng(0)
    msgs = [make_message(tiny_manifest, rng, seq=i, camera=f"c{i % 3}") for i in range(60)]
    items = [(topics.tokens_topic(m.site, m.device, m.line, m.camera), encode(m, "int8"), False) for m in msgs]

    w = _worker(tmp_path, db_url, mosquitto, linger_ms=60_000)  # holds the batch: received, not committed
    log = LogTail(w)
    log.wait("subscribed as group", 1)
    pub = _publisher(mosquitto)
    _publish_all(pub, items[:40])
    log.wait("received mid=", 40)
    w.send_signal(signal.SIGKILL)
    w.wait()
    assert _count(engine, Frame) == 0  # nothing was committed, nothing was acknowledged

    _publish_all(pub, items[40:] + items[:5])  # more while no worker runs, and 5 duplicates from the edge
    w2 = _worker(tmp_path, db_url, mosquitto, linger_ms=50)
    LogTail(w2)
    try:
        assert _wait_for(lambda: _count(engine, Frame) == 60), _count(engine, Frame)
        time.sleep(0.5)
        with Session(engine) as s:
            ids = set(s.scalars(select(Frame.frame_id)))
        assert ids == {m.frame_id.hex() for m in msgs}
        assert _wait_for(lambda: tx(engine, store.counter_totals).get("duplicates", 0) >= 5)
        assert _count(engine, DeadLetter) == 0
    finally:
        w2.terminate()
        w2.wait(10)
        pub.loop_stop()
        pub.disconnect()


def test_hostile_payloads_become_dead_letters(db_url, mosquitto, tmp_path, tiny_manifest, tiny_model_dir):
    from tests.support.tiny_model import build_tiny_model
    from tokenline.manifest import Manifest

    engine = make_engine(db_url)
    upgrade(engine)
    tx(engine, store.register_model, tiny_manifest)
    rng = np.random.default_rng(1)
    good = make_message(tiny_manifest, rng)
    raw = bytearray(encode(good, "int8"))
    flipped = bytes(raw[:100]) + bytes([raw[100] ^ 0xFF]) + bytes(raw[101:])
    unknown = make_message(Manifest.from_file(build_tiny_model(tmp_path / "u", seed=9, name="unregistered")), rng)
    t = topics.tokens_topic("s1", "d1", "l1", "c1")
    forged = encode(make_message(tiny_manifest, rng, device="d1"), "int8")
    hostile = [
        (t, b"", "truncated"), (t, b"\x00" * 10, None), (t, bytes(rng.integers(0, 256, 3000, np.uint8)), None),
        (t, flipped, "bad_crc"), (t, bytes(raw[:-7]), None), (t, b"\xff" * 70000, "too_large"),
        (topics.tokens_topic("s1", "d1", "l1", "other-camera"), bytes(raw), "topic_mismatch"),
        (topics.tokens_topic("s1", "d2", "l1", "c1"), forged, "identity_mismatch"),  # d2 claims to be d1
        (t, encode(unknown, "int8"), "unknown_model"),
        ("tokenline/v2/s1/d1/status", b"\xde\xad", "bad_status"),
        ("tokenline/v2/s1/d1/stats", b"{not json", "bad_stats"),
    ]
    good2 = make_message(tiny_manifest, rng, device="d7")
    good_v1 = make_message(tiny_manifest, rng, device="d8")  # an edge still on protocol 1
    acked = Collector(mosquitto.host, mosquitto.port, topic="tokenline/v2/+/+/ack")
    w = _worker(tmp_path, db_url, mosquitto, linger_ms=50)
    pub = _publisher(mosquitto)
    try:
        log = LogTail(w)
        log.wait("subscribed as group", 1)
        _publish_all(pub, [(tp, p, False) for tp, p, _ in hostile] +
                     [(topics.tokens_topic("s1", "d7", "l1", "c1"), encode(good2, "int4"), False),
                      (topics.tokens_topic("s1", "d8", "l1", "c1", version=1), encode(good_v1), False),
                      ("tokenline/v2/s1/d7/status", b"online", True),
                      ("tokenline/v2/s1/d7/stats", json.dumps({"fps": 3.5}).encode(), False),
                      ("tokenline/v1/s1/d8/status", b"online", True)])
        assert _wait_for(lambda: _count(engine, DeadLetter) == len(hostile)), "".join(log.lines[-30:])
        assert _wait_for(lambda: _count(engine, Frame) == 2)
        assert w.poll() is None  # still alive
        import hashlib

        with Session(engine) as s:
            by_sha = {d.payload_sha256: (d.reason, d.detail, d.payload_len, len(d.payload))
                      for d in s.scalars(select(DeadLetter))}
        for tp, p, reason in hostile:
            got_reason, detail, plen, kept = by_sha[hashlib.sha256(p).hexdigest()]
            if reason:
                assert got_reason == reason, (reason, got_reason, detail)
            whole = got_reason in store.REPLAYABLE  # kept whole for a replay after the fix, garbage cut short
            assert plen == len(p) and kept == (len(p) if whole else min(len(p), 1024)) and detail
        assert _wait_for(lambda: tx(engine, store.list_devices) and
                         {x["device"]: x for x in tx(engine, store.list_devices)}["d7"]["last_stats"] == {"fps": 3.5})
        devices = {x["device"]: x for x in tx(engine, store.list_devices)}
        assert devices["d7"]["status"] == "online" and devices["d7"]["site"] == "s1"
        assert "d8" in devices  # the protocol 1 edge's frame and status are taken too
        assert tx(engine, store.counter_totals)["dead_letters"] == len(hostile)
        # every token message with a readable frame id is answered on its topic's device's ack topic
        want = {("d1", p[12:28], by_sha[hashlib.sha256(p).hexdigest()][0]) for tp, p, _ in hostile
                if tp == t and peek_frame_id(p) is not None}
        want |= {("d1", bytes(raw[12:28]), "topic_mismatch"), ("d2", forged[12:28], "identity_mismatch"),
                 ("d7", good2.frame_id, "")}
        assert acked.wait_for(lambda c: len(c.raw) >= 3, 10)
        time.sleep(0.3)
        got = {(tp.split("/")[3], a.frame_id, a.reason) for tp, p, _ in acked.raw for a in acks.decode(p)}
        assert got == want
        statuses = {a.frame_id: a.status for _, p, _ in acked.raw for a in acks.decode(p)}
        assert statuses[good2.frame_id] == acks.COMMITTED and good_v1.frame_id not in statuses  # v1: PUBACK only
    finally:
        w.terminate()
        w.wait(10)
        pub.loop_stop()
        pub.disconnect()
        acked.close()
