"""Test helper: a real MQTT 5 subscriber (paho) that decodes every token message with tokenline.wire and, like
central, confirms each one to its device (protocol 2 acknowledgements on the device's ack topic).

Persistent session (clean_start False, long session expiry) so QoS 1 messages published while it is
disconnected - e.g. across a broker restart - are queued for it by the broker. ``confirm=False`` makes it a
bare subscriber that confirms nothing (an edge then keeps its rows awaiting confirmation).
"""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tokenline import acks, topics, wire


class Collector:
    def __init__(self, host: str, port: int, topic: str = topics.TOKENS_FILTER, extra: Tuple[str, ...] = (),
                 confirm: bool = True, username: Optional[str] = None, password: Optional[str] = None,
                 ca_file: Optional[Path] = None, client_id: Optional[str] = None) -> None:
        self.messages: List[wire.TokenMessage] = []
        self.raw: List[Tuple[str, bytes, bool]] = []  # (topic, payload, retain) of non-token topics
        self.errors: List[Tuple[str, str]] = []
        self.confirmed: set = set()  # frame ids acknowledged as committed
        self.lock = threading.RLock()
        self.connected = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"test-sub-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.2, 1)  # type: ignore[arg-type]
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca_file is not None:
            self.client.tls_set(ca_certs=str(ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.suback: List[int] = []  # reason codes of every SUBACK
        self.topics = (topic,) + extra

        def on_connect(c, u, flags, rc, props):
            for t in self.topics:
                c.subscribe(t, qos=1)
            self.connected.set()

        def on_disconnect(c, u, flags, rc, props):
            self.connected.clear()

        def on_message(c, u, m):
            try:
                t: Optional[topics.Topic] = topics.parse_topic(m.topic)
            except topics.TopicError:
                t = None
            if t is not None and t.kind == topics.KIND_TOKENS:
                try:
                    msg = wire.decode(m.payload)
                except wire.WireError as exc:
                    with self.lock:
                        self.errors.append((exc.reason, str(exc)))
                    return
                with self.lock:
                    self.messages.append(msg)
                    seen = msg.frame_id in self.confirmed
                    self.confirmed.add(msg.frame_id)
                if confirm and t.version >= 2:
                    ack = acks.Ack(msg.frame_id, acks.DUPLICATE if seen else acks.COMMITTED)
                    c.publish(topics.ack_topic(t.site, t.device or ""), acks.encode([ack]), qos=1)
            else:
                with self.lock:
                    self.raw.append((m.topic, bytes(m.payload), bool(m.retain)))

        def on_subscribe(c, u, mid, reason_codes, props):
            with self.lock:
                self.suback.extend(rc.value for rc in reason_codes)

        self.client.on_subscribe = on_subscribe
        self.client.on_connect = on_connect
        self.client.on_disconnect = on_disconnect
        self.client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(host, port, keepalive=10, clean_start=False, properties=props)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise RuntimeError("test subscriber could not connect")

    def wait_for(self, pred: Callable[["Collector"], bool], timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if pred(self):
                    return True
            time.sleep(0.05)
        with self.lock:
            return pred(self)

    def count(self) -> int:
        return len(self.messages)

    def by_camera(self) -> Dict[str, List[wire.TokenMessage]]:
        out: Dict[str, List[wire.TokenMessage]] = {}
        with self.lock:
            for m in self.messages:
                out.setdefault(m.camera, []).append(m)
        return out

    def unique_seqs(self, camera: str) -> List[int]:
        """Sequence numbers of a camera in arrival order, duplicates (QoS 1 redelivery) removed."""
        seen, out = set(), []
        for m in self.by_camera().get(camera, []):
            if m.frame_id not in seen:
                seen.add(m.frame_id)
                out.append(m.seq)
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(host: str, port: int, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
    """Publish one message and wait for its acknowledgement."""
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(host, port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()
