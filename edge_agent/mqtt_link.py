"""MQTT link (paho-mqtt 2.x, MQTT 5): publishes only from the outbox, QoS 1, deletes rows on PUBACK, in order.

The publisher thread hands rows to paho in outbox order with at most ``inflight`` unacknowledged; paho itself
retransmits those after a reconnect, then the cursor continues, so order is kept across broker restarts.
PUBACK callbacks only enqueue the message id (paho calls them holding its own lock); the publisher thread
turns them into outbox deletes. A PUBACK with a failure reason code moves the row to ``rejected`` (kept).
Availability: last will ``offline`` (retained), ``online`` retained after every connect. Commands arrive on
the device's ``cmd`` topic and are passed to a callback after validation.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, Tuple

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import AgentConfig, read_secret
from edge_agent.outbox import Outbox
from tokenline import topics
from tokenline.wire import FLAG_REPLAYED, WireError, with_flags

NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK reason code: accepted, but no subscription matched

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-tokenline-v1"


class MqttLink:
    """Owns the paho client and the publisher thread."""

    def __init__(self, cfg: AgentConfig, outbox: Outbox, manifest_hash_hex: str,
                 on_command: Callable[[topics.Command], None]) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self.on_command = on_command
        self.status_topic = topics.status_topic(cfg.site, cfg.device)
        self.stats_topic = topics.stats_topic(cfg.site, cfg.device)
        self.cmd_topic = topics.cmd_topic(cfg.site, cfg.device)
        self.connected = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._acks: Deque[Tuple[int, bool, str, int]] = deque()
        self._inflight: Dict[int, int] = {}  # mid -> outbox row id
        self._cursor = 0
        self._connects = 0
        self._replay_upto = outbox.startup_max_id
        self._remark = False
        self.published = 0
        self.commands_received = 0
        self.commands_rejected = 0
        self.publish_errors = 0
        self.no_subscriber_retries = 0
        self._hold_until = 0.0

        self.props = Properties(PacketTypes.PUBLISH)
        self.props.ContentType = CONTENT_TYPE
        self.props.UserProperty = [("manifest", manifest_hash_hex)]
        if cfg.messages.message_expiry_s:
            self.props.MessageExpiryInterval = cfg.messages.message_expiry_s

        m = cfg.mqtt
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
                        protocol=mqtt.MQTTv5)
        c.will_set(self.status_topic, payload=topics.STATUS_OFFLINE, qos=1, retain=True)
        password = read_secret(m.password, m.password_file, "mqtt.password_file")
        if m.username is not None:
            c.username_pw_set(m.username, password)
        if m.tls.enabled:
            c.tls_set(ca_certs=str(m.tls.ca_file) if m.tls.ca_file else None,
                      certfile=str(m.tls.cert_file) if m.tls.cert_file else None,
                      keyfile=str(m.tls.key_file) if m.tls.key_file else None,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            if m.tls.insecure:
                c.tls_insecure_set(True)
        c.reconnect_delay_set(min_delay=m.reconnect_min_s, max_delay=m.reconnect_max_s)  # type: ignore[arg-type]
        c.max_inflight_messages_set(m.inflight)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        self.client = c
        self._thread = threading.Thread(target=self._publisher, name="mqtt-publisher", daemon=True)

    # -- paho callbacks (network thread) --------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT connect refused: %s", reason_code)
            return
        self._connects += 1
        log.info("MQTT connected to %s:%d", self.cfg.mqtt.host, self.cfg.mqtt.port)
        client.publish(self.status_topic, topics.STATUS_ONLINE, qos=1, retain=True)
        client.subscribe(self.cmd_topic, qos=1)
        self._remark = True  # rows that waited for this connection go out flagged as replayed
        self.connected.set()
        self._wake.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected.is_set():
            (log.info if self._stop.is_set() else log.warning)("MQTT disconnected: %s", reason_code)
        self.connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acks.append((mid, bool(reason_code.is_failure), str(reason_code), int(reason_code.value)))
        self._wake.set()

    def _on_message(self, client, userdata, message) -> None:
        if message.topic != self.cmd_topic:
            return
        self.commands_received += 1
        try:
            cmd = topics.parse_command(message.payload)
        except topics.TopicError as exc:
            self.commands_rejected += 1
            log.warning("rejected command on %s: %s (payload %r)", message.topic, exc, message.payload[:200])
            return
        try:
            self.on_command(cmd)
        except Exception:  # noqa: BLE001 - a command must never kill the network thread
            self.commands_rejected += 1
            log.exception("command %s failed", cmd)

    # -- publisher thread -----------------------------------------------------------------------------------
    def start(self) -> None:
        self.client.connect_async(self.cfg.mqtt.host, self.cfg.mqtt.port, keepalive=self.cfg.mqtt.keepalive_s)
        self.client.loop_start()
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _drain_acks(self) -> None:
        done = []
        rewind = None
        while self._acks:
            mid, failed, reason, code = self._acks.popleft()
            row = self._inflight.pop(mid, None)
            if row is None:
                continue  # status/stats publishes, or a duplicate ack
            if failed:
                self.publish_errors += 1
                log.error("broker refused outbox row %d: %s (kept in the outbox's rejected table)", row, reason)
                self.outbox.reject(row, reason)
            elif code == NO_MATCHING_SUBSCRIBERS and self.cfg.mqtt.require_subscriber:
                self.no_subscriber_retries += 1  # accepted by the broker but delivered to nobody: send again
                rewind = row if rewind is None else min(rewind, row)
            else:
                done.append(row)
        if done:
            self.outbox.delete(done)
        if rewind is not None:
            self._cursor = min(self._cursor, rewind - 1)
            self._hold_until = time.monotonic() + self.cfg.mqtt.no_subscriber_retry_s
            log.warning("no subscriber took outbox rows from %d on; sending them again in %.1fs", rewind,
                        self.cfg.mqtt.no_subscriber_retry_s)

    def _publisher(self) -> None:
        while True:
            self._wake.wait(0.2)
            self._wake.clear()
            try:
                self._drain_acks()
                if self._stop.is_set():
                    return
                if not self.connected.is_set():
                    continue
                if self._remark:
                    self._remark = False
                    self._replay_upto = max(self._replay_upto, self.outbox.max_id())
                if time.monotonic() < self._hold_until:
                    continue
                room = self.cfg.mqtt.inflight - len(self._inflight)
                if room <= 0:
                    continue
                in_flight_rows = set(self._inflight.values())
                for row in self.outbox.after(self._cursor, room + len(in_flight_rows)):
                    if row.id in in_flight_rows:  # already sent and awaiting its PUBACK (after a rewind)
                        self._cursor = max(self._cursor, row.id)
                        continue
                    if room <= 0:
                        break
                    room -= 1
                    payload = row.payload
                    if row.id <= self._replay_upto:
                        try:
                            payload = with_flags(payload, FLAG_REPLAYED)
                        except (WireError, IndexError):
                            pass
                    info = self.client.publish(row.topic, payload, qos=topics.TOKENS_QOS, properties=self.props)
                    if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                        log.warning("publish of row %d failed: %s; retrying", row.id, mqtt.error_string(info.rc))
                        break
                    self._inflight[info.mid] = row.id
                    self._cursor = row.id
                    self.published += 1
                if len(self._inflight) < self.cfg.mqtt.inflight and self.outbox.count > len(self._inflight):
                    self._wake.set()
            except Exception:  # noqa: BLE001 - keep publishing; the outbox still has everything
                log.exception("publisher loop error")
                self._stop.wait(0.5)

    def publish_stats(self, stats: dict) -> None:
        if self.connected.is_set():
            self.client.publish(self.stats_topic, json.dumps(stats, separators=(",", ":")), qos=0)

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty and nothing is in flight (or ``timeout``); True when flushed."""

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.outbox.count == 0 and not self._inflight:
                return True
            if not self.connected.is_set():
                return False
            self._wake.set()
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 2.0) -> None:
        """Publish retained ``offline``, stop the publisher, disconnect. Unacked rows stay in the outbox."""
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, topics.STATUS_OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self.connected.clear()
        self.client.disconnect()
        self.client.loop_stop()

    def stats(self) -> dict:
        return {"connected": self.connected.is_set(), "published": self.published, "inflight": len(self._inflight),
                "publish_errors": self.publish_errors, "no_subscriber_retries": self.no_subscriber_retries}
