"""The MQTT link when the broker closes the connection because of one message: nothing else is held up or lost."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np

from edge_agent.config import parse_config
from edge_agent.mqtt_link import MqttLink
from edge_agent.outbox import Outbox
from tests.edge.conftest import agent_config, synthetic_camera
from tests.support.broker import Mosquitto
from tests.support.mqtt_sub import Collector
from tokenline import topics, wire
from tokenline.frame_id import new_frame_id
from tokenline.summary import Summary

TOPIC = topics.tokens_topic("site-a", "edge-test", "line-1", "cam1")


def payload(seq: int, k: int, d: int, dtype: str) -> bytes:
    rng = np.random.default_rng(seq)
    x = rng.standard_normal((k + 1, d)).astype(np.float32)
    msg = wire.TokenMessage(
        frame_id=new_frame_id(), device="edge-test", site="site-a", line="line-1", camera="cam1",
        capture_ts_us=1_700_000_000_000_000 + seq, seq=seq, manifest_hash=bytes(16),
        summary=Summary(x[0], x[1:], np.ones(k, np.float32), np.full((k, 2), 0.5, np.float32)))
    return wire.encode(msg, dtype)


def test_a_message_the_broker_drops_the_connection_for_is_rejected_after_three_drops(tmp_path: Path,
                                                                                     tiny_model_dir: Path) -> None:
    # Mosquitto answers a packet over max_packet_size with DISCONNECT 0x95 and no PUBACK: paho alone would
    # send it again after every reconnect and nothing behind it would ever leave the outbox.
    big = 3  # seq of the oversize message
    assert len(payload(0, 4, 64, "int8")) < 1024 < 4096 < len(payload(big, 16, 384, "fp16"))
    outbox = Outbox(tmp_path / "outbox.sqlite", max_bytes=1 << 20, max_messages=1000)
    outbox.put_many([("cam1", TOPIC, lambda s: payload(s, 16, 384, "fp16") if s == big else payload(s, 4, 64, "int8"))
                     for _ in range(8)])
    broker = Mosquitto(tmp_path / "broker", extra_conf="max_packet_size 4096\n")
    cfg = parse_config(agent_config(tmp_path, tiny_model_dir, broker.port, [synthetic_camera("cam1")],
                                    mqtt={"reconnect_min_s": 0.1, "reconnect_max_s": 0.4, "inflight": 4}))
    link = MqttLink(cfg, outbox, "00" * 16, lambda cmd: None)
    broker.start()
    sub = Collector(broker.host, broker.port)
    try:
        assert sub.connected.wait(10)
        link.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (outbox.count or len(sub.unique_seqs("cam1")) < 7):
            time.sleep(0.05)
        assert sub.unique_seqs("cam1") == [s for s in range(8) if s != big]  # in order, nothing else lost
        assert outbox.count == 0 and outbox.rejected == 1
        st = link.stats()
        # Three drops with the big row alone in flight. Before those, up to two with other rows in flight too: the
        # first burst, and (when the reset lost the PUBACKs of the rows before it) the slow start's next burst.
        assert st["publish_errors"] == 1 and 3 <= st["connection_drops"] <= 5
        assert st["connected"] and st["window"] > 1  # the window grows back after the slow start
    finally:
        link.stop()
        outbox.close()
        sub.close()
        broker.stop()
    db = sqlite3.connect(str(tmp_path / "outbox.sqlite"))
    rows = db.execute("SELECT seq, reason, length(payload) FROM rejected").fetchall()
    assert len(rows) == 1 and rows[0][0] == big and rows[0][2] > 4096  # kept for inspection
    assert "closed the connection each of the 3 times" in rows[0][1]
