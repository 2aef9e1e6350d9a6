"""MQTT link (paho-mqtt 2.x, MQTT 5): publishes only from the outbox, QoS 1, in order; rows leave the outbox when
central confirms them (protocol 2) or, with ``mqtt.protocol: 1``, on the broker's PUBACK.

The publisher thread hands rows to paho in outbox order with at most ``window`` unacknowledged. PUBACK
callbacks and central's acknowledgements (on the device's ``ack`` topic) only enqueue what arrived (paho calls
them holding its own lock); the publisher thread applies them to the outbox: a PUBACK marks a row as awaiting
confirmation (protocol 1: deletes it), a confirmation deletes it, a rejection by central or a PUBACK with a
failure reason code moves it to ``rejected`` (kept). Rows whose confirmation does not come in time are handed
back by the outbox (``requeue_due``) and sent again, flagged replayed; central drops duplicates by frame id.

Connections: one paho client per connection attempt. When an attempt fails or a connection ends, the link
throws that client away (with paho's own copies of the unacknowledged messages) and opens a new one after a
backoff (``reconnect_min_s`` doubling to ``reconnect_max_s`` while nothing gets through), sending again from
the outbox, oldest row first. The outbox is the only source of truth, so nothing is lost and the link decides
what goes on the wire after a drop:

- slow start: the window restarts at 1 and grows by one per acknowledged row up to ``mqtt.inflight``. A broker
  that closes the connection after refusing a publish (Mosquitto 2.0 sends PUBACK 0x87 and then closes) would
  otherwise reset the connection with the client's following publishes unread, and the refusal's PUBACK is
  lost with the reset: paho would resend the same burst after every reconnect, for ever.
- poison rows: a row that was the only one in flight each time an established connection dropped,
  ``mqtt.reject_after_drops`` times in a row, is moved to ``rejected`` (e.g. larger than the broker's limit).

Availability: last will ``offline`` (retained), ``online`` retained after every connect. Commands arrive on
the device's ``cmd`` topic and are passed to a callback after validation.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Tuple

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import AgentConfig
from edge_agent.outbox import Outbox
from runtime.mqtt import make_client
from tokenline import acks, topics
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
        self.protocol = cfg.mqtt.protocol
        self.status_topic = topics.status_topic(cfg.site, cfg.device, self.protocol)
        self.stats_topic = topics.stats_topic(cfg.site, cfg.device, self.protocol)
        self.cmd_topic = topics.cmd_topic(cfg.site, cfg.device, self.protocol)
        self.ack_topic: Optional[str] = topics.ack_topic(cfg.site, cfg.device) if self.protocol >= 2 else None
        self.connected = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._acks: Deque[Tuple[int, bool, str, int]] = deque()  # PUBACKs
        self._confirms: Deque[List[acks.Ack]] = deque()  # central's acknowledgements
        self._next_requeue = 0.0
        self._inflight: Dict[int, int] = {}  # mid -> outbox row id
        self._cursor = 0
        self._replay_upto = outbox.startup_max_id
        self._remark = False
        self.published = 0
        self.commands_received = 0
        self.commands_rejected = 0
        self.publish_errors = 0
        self.no_subscriber_retries = 0
        self.acks_received = 0  # acknowledgement messages from central
        self.acks_invalid = 0
        self.subscribe_refused = 0  # SUBACKs that refused a subscription (counted)
        self.subscriptions_ok = True  # the latest SUBACK granted everything
        self._hold_until = 0.0

        self.props = Properties(PacketTypes.PUBLISH)
        self.props.ContentType = CONTENT_TYPE
        self.props.UserProperty = [("manifest", manifest_hash_hex)]
        if cfg.messages.message_expiry_s:
            self.props.MessageExpiryInterval = cfg.messages.message_expiry_s

        self._window = cfg.mqtt.inflight
        self._strikes: Dict[int, int] = {}  # row id -> drops while it was the only row in flight
        self._drops = 0  # consecutive drops without an acknowledged row: sets the backoff
        self._dropped = threading.Event()
        self._reopen_at = 0.0
        self.connection_drops = 0
        self._connected_at = 0.0
        self.client = self._live = self._make_client()  # callbacks from any other (retired) client are ignored
        self._thread = threading.Thread(target=self._publisher, name="mqtt-publisher", daemon=True)

    def _make_client(self) -> mqtt.Client:
        """A configured paho client for one connection attempt (the link, not paho, reconnects)."""
        m = self.cfg.mqtt
        c = make_client(m, self.cfg.client_id, reconnect_on_failure=False)
        c.will_set(self.status_topic, payload=topics.STATUS_OFFLINE, qos=1, retain=True)
        c.reconnect_delay_set(min_delay=0.05, max_delay=0.05)  # type: ignore[arg-type]  # paho's wait before it gives up
        c.max_inflight_messages_set(m.inflight)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        return c

    # -- paho callbacks (network thread) --------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if client is not self._live:
            return
        if reason_code.is_failure:
            log.warning("MQTT connect refused: %s (retrying; the password file is read again each time)", reason_code)
            return
        self._connected_at = time.monotonic()
        log.info("MQTT connected to %s:%d", self.cfg.mqtt.host, self.cfg.mqtt.port)
        client.publish(self.status_topic, topics.STATUS_ONLINE, qos=1, retain=True)
        subs = [(self.cmd_topic, 1)] + ([(self.ack_topic, topics.ACK_QOS)] if self.ack_topic else [])
        client.subscribe(subs)
        self._remark = True  # rows that waited for this connection go out flagged as replayed
        self.connected.set()
        self._wake.set()

    def _on_connect_fail(self, client, userdata) -> None:
        if client is self._live and not self._stop.is_set():
            self._dropped.set()
            self._wake.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if client is not self._live:
            return
        if self.connected.is_set():
            (log.info if self._stop.is_set() else log.warning)("MQTT disconnected: %s", reason_code)
        self.connected.clear()
        if not self._stop.is_set():
            self._dropped.set()  # the publisher thread opens a new connection (see the module docstring)
            self._wake.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acks.append((mid, bool(reason_code.is_failure), str(reason_code), int(reason_code.value)))
        self._wake.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        bad = [str(rc) for rc in reason_codes if rc.is_failure]
        if client is not self._live:
            return
        self.subscriptions_ok = not bad
        if bad:
            self.subscribe_refused += 1
            log.error("the broker refused the subscription to %s: %s (commands%s cannot arrive; check the "
                      "broker's configuration for this device)", self.cmd_topic, ", ".join(bad),
                      " and central's confirmations" if self.ack_topic else "")

    def _on_message(self, client, userdata, message) -> None:
        if self.ack_topic is not None and message.topic == self.ack_topic:
            try:
                entries = acks.decode(message.payload)
            except acks.AckError as exc:
                self.acks_invalid += 1
                log.warning("ignored an acknowledgement that does not parse: %s", exc)
                return
            self.acks_received += 1
            self._confirms.append(entries)
            self._wake.set()
            return
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
        self._connect()
        self._thread.start()

    def _connect(self) -> None:
        m = self.cfg.mqtt
        if self.protocol >= 2:  # persistent session: confirmations sent while we are away wait at the broker
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = m.session_expiry_s
            self.client.connect_async(m.host, m.port, keepalive=m.keepalive_s, clean_start=False, properties=props)
        else:
            self.client.connect_async(m.host, m.port, keepalive=m.keepalive_s)
        self.client.loop_start()

    def wake(self) -> None:
        self._wake.set()

    def _drain_acks(self) -> None:
        done: List[int] = []
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
            self._strikes.pop(row, None)
            self._drops = 0
            self._window = min(self.cfg.mqtt.inflight, self._window + 1)
        if done:
            m = self.cfg.mqtt
            if self.protocol >= 2:  # the broker has it; the outbox keeps it until central confirms
                self.outbox.mark_sent(done, m.confirm_timeout_s, m.confirm_timeout_max_s)
            else:
                self.outbox.delete(done)
        entries: List[acks.Ack] = []
        while self._confirms:
            entries.extend(self._confirms.popleft())
        if entries:
            _, refused = self.outbox.confirm(entries)
            if refused:
                log.error("central rejected %d frame(s): %s (moved to the outbox's rejected table)", refused,
                          sorted({a.reason for a in entries if not a.confirmed}))
        if rewind is not None:
            self._cursor = min(self._cursor, rewind - 1)
            self._hold_until = time.monotonic() + self.cfg.mqtt.no_subscriber_retry_s
            log.warning("no subscriber took outbox rows from %d on; sending them again in %.1fs", rewind,
                        self.cfg.mqtt.no_subscriber_retry_s)

    def _reopen_later(self) -> None:
        """After a drop: forget the old client and its unacknowledged messages, schedule a new connection."""
        old, self._live = self.client, None
        old.disconnect()  # in case it got through meanwhile
        old.loop_stop()  # its network thread ends by itself after a drop (reconnect_on_failure=False)
        self.connected.clear()
        self._drain_acks()  # acknowledgements that arrived before the drop
        self.connection_drops += 1
        rows = sorted(self._inflight.values())
        self._inflight.clear()
        if len(rows) == 1:  # the only row on the wire when the broker closed the connection
            row = rows[0]
            self._strikes[row] = strikes = self._strikes.get(row, 0) + 1
            if strikes >= self.cfg.mqtt.reject_after_drops:
                reason = (f"the broker closed the connection each of the {strikes} times this message was the only "
                          "one in flight, without acknowledging it (over the broker's size limit, or refused)")
                self.publish_errors += 1
                log.error("outbox row %d: %s; moved to the outbox's rejected table", row, reason)
                self.outbox.reject(row, reason)
                self._strikes.pop(row, None)
        self._cursor = 0  # everything still in the outbox goes again, oldest first
        self._window = 1
        if self._connected_at and time.monotonic() - self._connected_at > 10 * self.cfg.mqtt.reconnect_min_s:
            self._drops = 0  # it was up for a while: start the backoff again from the minimum
        self._connected_at = 0.0
        self._drops += 1
        m = self.cfg.mqtt
        delay = min(m.reconnect_max_s, m.reconnect_min_s * 2 ** (self._drops - 1))
        self._reopen_at = time.monotonic() + delay
        log.info("MQTT connection ended with %d row(s) unacknowledged; connecting again in %.1fs", len(rows), delay)

    def _publisher(self) -> None:
        while True:
            self._wake.wait(0.2)
            self._wake.clear()
            try:
                self._drain_acks()
                if self._stop.is_set():
                    return
                if self._dropped.is_set():
                    self._dropped.clear()
                    self._reopen_later()
                if self._reopen_at and time.monotonic() >= self._reopen_at:
                    self._reopen_at = 0.0
                    try:
                        self.client = self._live = self._make_client()
                        self._connect()
                    except Exception:  # noqa: BLE001 - e.g. the password file vanished: try again later
                        log.exception("could not open a new MQTT connection")
                        self._dropped.set()
                        continue
                if not self.connected.is_set():
                    continue
                if self._remark:
                    self._remark = False
                    self._replay_upto = max(self._replay_upto, self.outbox.max_id())
                if self.protocol >= 2 and time.monotonic() >= self._next_requeue:
                    self._next_requeue = time.monotonic() + 0.5
                    first = self.outbox.requeue_due()
                    if first is not None:
                        log.warning("no confirmation from central in time for outbox rows from %d on: sending them "
                                    "again (%d resent in total)", first, self.outbox.resent)
                        self._cursor = min(self._cursor, first - 1)
                if time.monotonic() < self._hold_until:
                    continue
                room = self._window - len(self._inflight)
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
                    if row.id <= self._replay_upto or row.sends:
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
                if len(self._inflight) < self._window and self.outbox.count > len(self._inflight):
                    self._wake.set()
            except Exception:  # noqa: BLE001 - keep publishing; the outbox still has everything
                log.exception("publisher loop error")
                self._stop.wait(0.5)

    def publish_stats(self, stats: dict) -> None:
        if self.connected.is_set():
            self.client.publish(self.stats_topic, json.dumps(stats, separators=(",", ":")), qos=0)

    def publish_alert(self, topic: str, payload: bytes) -> bool:
        """An anomaly alert (retained, QoS 1) while connected; False when not (the caller counts it)."""
        if not self.connected.is_set():
            return False
        self.client.publish(topic, payload, qos=topics.ALERT_QOS, retain=True)
        return True

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty, i.e. every row delivered (confirmed by central; under protocol 1,
        PUBACKed), and nothing is in flight (or ``timeout``); True when flushed."""

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
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.connected.clear()
        self.client.disconnect()
        self.client.loop_stop()

    def stats(self) -> dict:
        return {"connected": self.connected.is_set(), "published": self.published, "inflight": len(self._inflight),
                "publish_errors": self.publish_errors, "no_subscriber_retries": self.no_subscriber_retries,
                "connection_drops": self.connection_drops, "window": self._window, "protocol": self.protocol,
                "acks_received": self.acks_received, "acks_invalid": self.acks_invalid,
                "subscribe_refused": self.subscribe_refused, "subscriptions_ok": self.subscriptions_ok}
