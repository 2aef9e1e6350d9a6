"""MQTT ingest: a shared-subscription worker that validates token messages, commits them in batches and confirms
each committed frame to its device.

After the transaction that holds a batch's rows and dead letters has committed, the worker publishes commit
acknowledgements (``tokenline.acks``) on each device's ``ack`` topic - committed, duplicate, or rejected with the
dead letter's reason - and only then PUBACKs the batch. Edges of protocol 2 keep a frame until it is confirmed,
so nothing the broker loses (a crash, a hijacked subscription, a wiped session) is lost for good; edges of
protocol 1 rely on the PUBACK, which still comes only after the commit. A worker that dies loses nothing either:
the broker redelivers unacknowledged messages of the persistent session, and redelivered frames are dropped by
the ``frames.frame_id`` unique constraint.

Anomaly scoring stays off this path: the batch's transaction queues the new frames of cameras with a reference
set (``central.anomaly.scoring.queue``), and the scorer process each worker starts beside it
(``central.anomaly.process``) scores them and publishes their alerts through this worker's MQTT client.

Identity: a protocol 2 token topic names the device (the broker lets a device publish only under its own name),
and a payload whose device differs from its topic's is rejected as ``identity_mismatch``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from central import store
from central.anomaly import scoring
from central.anomaly.alerts import AlertPublisher, Webhook
from central.anomaly.process import ScorerProcess
from central.config import AnomalyConfig, IngestConfig, MqttConfig
from tokenline import acks, topics
from tokenline.anomaly import AnomalyScore
from tokenline.wire import TokenMessage, WireError, decode, peek_frame_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Incoming:
    mid: int
    qos: int
    topic: str
    payload: bytes


DeviceKey = Tuple[str, str]  # (site, device) of a protocol 2 topic: where its acknowledgements go


@dataclass
class BatchResult:
    stored: int = 0
    duplicates: int = 0
    dead: int = 0
    status: int = 0
    reasons: Dict[str, int] = field(default_factory=dict)
    captures_s: List[float] = field(default_factory=list)  # capture times (s) of the frames committed
    acks: Dict[DeviceKey, List[acks.Ack]] = field(default_factory=dict)  # to publish once committed


LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 86400.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class IngestMetrics:
    """This worker's Prometheus metrics (its own ``/metrics`` on ``ingest.metrics_port``): what only the worker
    knows, per batch and per message. The totals across workers are the database counters ``serve`` exports."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        from runtime.metrics import new_registry

        self.registry = r = new_registry()
        self.batch = Histogram("tokenline_ingest_batch_messages", "messages per committed batch", buckets=BATCH_BUCKETS,
                               registry=r)
        self.commit = Histogram("tokenline_ingest_commit_seconds", "time to validate and commit one batch", registry=r)
        self.lag = Histogram("tokenline_ingest_lag_seconds", "capture to commit, per stored frame", buckets=LAG_BUCKETS,
                             registry=r)
        self.messages = Counter("tokenline_ingest_messages", "messages committed by this worker, by outcome",
                                ["outcome"], registry=r)
        for o in ("stored", "duplicate", "dead_letter", "status"):
            self.messages.labels(o)
        self.db_retries = Counter("tokenline_ingest_database_retries", "batches retried: database unavailable",
                                  registry=r)
        self.connect_failures = Counter("tokenline_ingest_connect_failures", "failed connections to the MQTT broker",
                                        registry=r)
        self.connected = Gauge("tokenline_ingest_connected", "1 while subscribed to the broker", registry=r)


class Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class Ingestor:
    """Validates messages against the model registry and commits a batch (rows, dead letters, counters)."""

    def __init__(self, engine: Engine, cfg: IngestConfig, worker: str) -> None:
        self.engine, self.cfg, self.worker = engine, cfg, worker
        self._models: Dict[str, store.ModelInfo] = {}
        self._refreshed = 0.0

    def _model(self, hash16: str) -> Optional[store.ModelInfo]:
        m = self._models.get(hash16)
        if m is None and time.monotonic() - self._refreshed > 2.0:  # a newly registered model
            with Session(self.engine) as s:
                self._models = {x.hash16: x for x in store.list_models(s)}
            self._refreshed = time.monotonic()
            m = self._models.get(hash16)
        return m

    def validate_tokens(self, topic: topics.Topic, payload: bytes) -> Tuple[TokenMessage, store.ModelInfo]:
        if topic.version == 1 and not self.cfg.accept_protocol_v1:
            raise Rejected("protocol_v1_refused", "protocol v1 topics are not accepted (ingest.accept_protocol_v1)")
        if len(payload) > self.cfg.max_message_bytes:
            raise Rejected("too_large", f"{len(payload)} bytes > max_message_bytes {self.cfg.max_message_bytes}")
        try:
            msg = decode(payload, max_bytes=self.cfg.max_message_bytes)
        except WireError as exc:
            raise Rejected(exc.reason, str(exc)) from None
        if topic.device is not None and msg.device != topic.device:
            raise Rejected("identity_mismatch", f"message claims device {msg.device!r}, published on the topic of "
                                                f"device {topic.device!r}")
        if (msg.site, msg.line, msg.camera) != (topic.site, topic.line, topic.camera):
            raise Rejected("topic_mismatch", f"message is from {msg.site}/{msg.line}/{msg.camera}, published on "
                                             f"{topic.site}/{topic.line}/{topic.camera}")
        model = self._model(msg.manifest_hash.hex())
        if model is None:
            raise Rejected("unknown_model", f"manifest hash {msg.manifest_hash.hex()} is not registered "
                                            "(tokenline-central register-model)")
        if msg.summary.dim != model.embedding_dim:
            raise Rejected("dim_mismatch", f"D={msg.summary.dim}, model {model.name!r} has {model.embedding_dim}")
        if msg.summary.k != model.k:
            raise Rejected("token_count_mismatch", f"K={msg.summary.k}, model {model.name!r} has {model.k}")
        if msg.summary.token_dim != model.token_dim:
            raise Rejected("token_dim_mismatch", f"tokens of dim {msg.summary.token_dim}, model {model.name!r} has "
                                                 f"{model.token_dim} (a version 1 message cannot carry them)")
        grid = model.manifest.summary.footprint_grid
        fp = msg.summary.footprint
        if grid is not None and (fp is None or tuple(fp.shape) != tuple(grid)):
            raise Rejected("footprint_mismatch", f"footprint {None if fp is None else list(fp.shape)}, model "
                                                 f"{model.name!r} has a {grid[0]}x{grid[1]} footprint")
        if msg.token_dtype not in self.cfg.allowed_token_dtypes:
            raise Rejected("dtype_not_allowed", f"token dtype {msg.token_dtype!r} not in {self.cfg.allowed_token_dtypes}")
        return msg, model

    def process(self, batch: Sequence[Incoming]) -> BatchResult:
        """Commit one batch; raises OperationalError (database unavailable) so the caller retries unacked.

        ``BatchResult.acks`` holds, per device of a protocol 2 topic, what became of each of its frames."""
        res = BatchResult()
        rows: List[dict] = []
        dead: List[dict] = []
        seen: Dict[str, tuple] = {}
        status_updates: List[Tuple[topics.Topic, bytes]] = []
        outcomes: List[Tuple[DeviceKey, bytes, str]] = []  # (device, frame id, dead-letter reason or "")
        edge: Dict[str, AnomalyScore] = {}  # the edges' own anomaly scores, by frame id, queued with the frames
        received = store.now_us()
        for m in batch:
            t: Optional[topics.Topic] = None
            try:
                t = topics.parse_topic(m.topic)
                if t.kind == topics.KIND_TOKENS:
                    msg, model = self.validate_tokens(t, m.payload)
                    rows.append(store.frame_row(msg, model.id, received))
                    if msg.anomaly is not None:
                        edge[rows[-1]["frame_id"]] = msg.anomaly
                    seen[msg.device] = (msg.site, received)
                    if t.device is not None:
                        outcomes.append(((t.site, t.device), msg.frame_id, ""))
                elif t.kind in (topics.KIND_STATUS, topics.KIND_STATS):
                    self._check_status(t, m.payload)
                    status_updates.append((t, m.payload))
                else:
                    raise Rejected("unexpected_topic", f"central does not consume {t.kind!r} topics")
            except Rejected as exc:
                dead.append(store.dead_letter_row(m.topic, m.payload, exc.reason, exc.detail,
                                                  self.cfg.dead_letter_max_bytes))
            except topics.TopicError as exc:
                dead.append(store.dead_letter_row(m.topic, m.payload, "bad_topic", str(exc),
                                                  self.cfg.dead_letter_max_bytes))
            except Exception as exc:  # noqa: BLE001 - one bad message never stops the worker
                log.exception("unexpected error validating a message on %r", m.topic)
                dead.append(store.dead_letter_row(m.topic, m.payload, "internal_error", repr(exc),
                                                  self.cfg.dead_letter_max_bytes))
            else:
                continue
            fid = peek_frame_id(m.payload)  # tell the device, when the topic names it and the id is readable
            if t is not None and t.kind == topics.KIND_TOKENS and t.device is not None and fid is not None:
                outcomes.append(((t.site, t.device), fid, dead[-1]["reason"]))
        new: set = set()
        try:
            new.update(self._commit(rows, dead, seen, status_updates, res, edge))
        except OperationalError:
            raise
        except (DBAPIError, SQLAlchemyError) as exc:  # a row the database refuses: isolate it
            log.warning("batch commit failed (%s); committing message by message", exc.__class__.__name__)
            res = BatchResult()
            refused = {}
            for r in rows:
                try:
                    new.update(self._commit([r], [], {}, [], res, edge))
                except OperationalError:
                    raise
                except (DBAPIError, SQLAlchemyError) as e2:
                    self._commit([], [store.dead_letter_row("", b"", "db_error", f"frame {r['frame_id']}: {e2}",
                                                            0)], {}, [], res)
                    refused[r["frame_id"]] = "db_error"
            self._commit([], dead, seen, status_updates, res)
            outcomes = [(d, fid, reason or refused.get(fid.hex(), "")) for d, fid, reason in outcomes]
        for device, fid, reason in outcomes:
            if reason:
                ack = acks.Ack(fid, acks.REJECTED, reason)
            else:
                ack = acks.Ack(fid, acks.COMMITTED if fid.hex() in new else acks.DUPLICATE)
            res.acks.setdefault(device, []).append(ack)
        for d in dead:
            res.reasons[d["reason"]] = res.reasons.get(d["reason"], 0) + 1
        return res

    @staticmethod
    def _check_status(t: topics.Topic, payload: bytes) -> None:
        if len(payload) > 65536:
            raise Rejected("too_large", "status/stats payload > 64 KiB")
        if t.kind == topics.KIND_STATUS:
            if payload.decode("utf-8", "replace") not in (topics.STATUS_ONLINE, topics.STATUS_OFFLINE, ""):
                raise Rejected("bad_status", f"status must be online/offline, got {payload[:40]!r}")
        else:
            try:
                json.loads(payload)
            except (ValueError, UnicodeDecodeError) as exc:
                raise Rejected("bad_stats", f"stats payload is not JSON: {exc}") from None

    def _commit(self, rows: List[dict], dead: List[dict], seen: Dict[str, tuple],
                status_updates: List[Tuple[topics.Topic, bytes]], res: BatchResult,
                edge: Optional[Dict[str, AnomalyScore]] = None) -> List[str]:
        """One transaction (the new frames of cameras with a reference set queued for the scorer in it); returns
        the new frame ids."""
        with Session(self.engine) as s, s.begin():
            new_ids = store.insert_new_frames(s, rows)
            new = len(new_ids)
            dups = len(rows) - new
            # "received": token messages (stored, duplicate or refused); status and stats are status_updates
            counters = {"received": len(rows) + len(dead), "stored": new, "duplicates": dups,
                        "dead_letters": len(dead), "status_updates": len(status_updates)}
            fresh = set(new_ids)
            scoring.queue(s, [r for r in rows if r["frame_id"] in fresh], edge or {})
            # every device this batch writes, locked first and in device order (store.touch_devices), so
            # concurrent batches cannot wait on each other's device rows in a cycle
            devices = dict(seen)
            for t, payload in status_updates:
                if payload or t.kind != topics.KIND_STATUS:  # an empty retained status writes nothing
                    devices.setdefault(t.device or "", (t.site, store.now_us()))
            store.touch_devices(s, devices)
            for t, payload in sorted(status_updates, key=lambda u: u[0].device or ""):
                text = payload.decode("utf-8", "replace")
                if t.kind == topics.KIND_STATUS:
                    if text:  # an empty retained message clears the status
                        store.set_device_status(s, t.device or "", t.site, status=text)
                else:
                    store.set_device_status(s, t.device or "", t.site, stats=text)
            store.insert_dead_letters(s, dead)
            store.add_counters(s, self.worker, counters)
        res.stored += new
        res.duplicates += dups
        # lag of first arrivals only: a resent duplicate says nothing about the pipeline
        res.captures_s.extend(r["capture_us"] / 1e6 for r in rows if r["frame_id"] in fresh)
        res.dead += len(dead)
        res.status += len(status_updates)
        return new_ids


class IngestWorker:
    """The MQTT side: persistent MQTT 5 session, shared subscription, manual acks after each commit."""

    def __init__(self, engine: Engine, mqtt_cfg: MqttConfig, cfg: IngestConfig,
                 anomaly: Optional[AnomalyConfig] = None) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from runtime.mqtt import make_client

        self.mqtt_cfg, self.cfg = mqtt_cfg, cfg
        self.ingestor = Ingestor(engine, cfg, mqtt_cfg.client_id)
        self.inbox: "queue.Queue[Incoming]" = queue.Queue()
        self.stop_event = threading.Event()
        self.connected = threading.Event()
        self.totals: Tally = Tally()
        self.metrics = IngestMetrics()
        self.metrics_port: Optional[int] = None
        self._connect_failures = 0
        c = make_client(mqtt_cfg, mqtt_cfg.client_id, manual_ack=True)
        c.reconnect_delay_set(1, 30)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c
        self.scorer = self._scorer(engine, anomaly or AnomalyConfig(), c.publish)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = mqtt_cfg.session_expiry_s
        props.ReceiveMaximum = max(1, min(65535, cfg.batch_max))
        self._connect_props = props

    def _scorer(self, engine: Engine, cfg: AnomalyConfig, publish) -> Optional[ScorerProcess]:  # noqa: ANN001
        """The scoring process beside this worker (``anomaly.scorer``); its alerts go out through this worker's
        MQTT client (``anomaly.alerts``) and the webhook."""
        if not cfg.scorer:
            return None
        webhook = Webhook(cfg.webhook, engine, self.mqtt_cfg.client_id) if cfg.webhook.url else None
        publisher = AlertPublisher(publish if cfg.alerts else None, webhook)
        return ScorerProcess(engine, cfg, f"{self.mqtt_cfg.client_id}-scorer", publisher)

    def _on_connect(self, client, _ud, flags, reason_code, _props) -> None:  # noqa: ANN001 - paho signature
        if reason_code.is_failure:
            log.error("MQTT connect refused: %s", reason_code)
            return
        from paho.mqtt.subscribeoptions import SubscribeOptions

        group = self.mqtt_cfg.group
        filters = [topics.shared(group, topics.TOKENS_FILTER), topics.STATUS_FILTER, topics.STATS_FILTER]
        if self.cfg.accept_protocol_v1:
            filters += [topics.shared(group, topics.V1_TOKENS_FILTER), topics.V1_STATUS_FILTER, topics.V1_STATS_FILTER]
        client.subscribe([(f, SubscribeOptions(qos=1)) for f in filters])
        self._connect_failures = 0
        log.info("connected to %s:%d (session present: %s)", self.mqtt_cfg.host, self.mqtt_cfg.port,
                 flags.session_present)

    def _on_connect_fail(self, _c, _ud) -> None:  # noqa: ANN001 - paho signature
        """The broker could not be reached: say so at every attempt (paho retries with backoff up to 30 s)."""
        import socket

        self._connect_failures += 1
        self.metrics.connect_failures.inc()
        m = self.mqtt_cfg
        try:
            socket.create_connection((m.host, m.port), timeout=2).close()
            why = "the connection closed during the MQTT handshake"
        except OSError as exc:
            why = exc.strerror or str(exc)
        log.warning("cannot connect to the MQTT broker %s:%d (%s), attempt %d; retrying (backoff up to 30 s); "
                    "check mqtt.host/mqtt.port and that the broker runs", m.host, m.port, why, self._connect_failures)

    def _on_subscribe(self, _c, _ud, _mid, reason_codes, _props) -> None:  # noqa: ANN001
        bad = [str(rc) for rc in reason_codes if rc.is_failure]
        if bad:
            log.error("subscription refused: %s", ", ".join(bad))
            return
        log.info("subscribed as group %r (shared tokens, status, stats%s)", self.mqtt_cfg.group,
                 "; protocol v1 topics too" if self.cfg.accept_protocol_v1 else "")
        self.metrics.connected.set(1)
        self.connected.set()

    def _on_disconnect(self, _c, _ud, _flags, reason_code, _props) -> None:  # noqa: ANN001
        self.connected.clear()
        self.metrics.connected.set(0)
        if not self.stop_event.is_set():
            log.warning("MQTT disconnected (%s); reconnecting", reason_code)

    def _on_message(self, _c, _ud, msg) -> None:  # noqa: ANN001
        self.inbox.put(Incoming(msg.mid, msg.qos, msg.topic, bytes(msg.payload)))
        log.debug("received mid=%d topic=%s bytes=%d", msg.mid, msg.topic, len(msg.payload))

    def _next_batch(self) -> List[Incoming]:
        try:
            first = self.inbox.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.cfg.batch_linger_ms / 1000.0
        while len(batch) < self.cfg.batch_max:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(self.inbox.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def run(self) -> None:
        """Consume until ``stop()``; database outages are retried with backoff, never acknowledged early."""
        m = self.mqtt_cfg
        if self.cfg.metrics_port is not None:
            from runtime.metrics import serve

            self._metrics_server, self.metrics_port = serve(self.metrics.registry, self.cfg.metrics_host,
                                                            self.cfg.metrics_port)
        self.client.connect_async(m.host, m.port, keepalive=m.keepalive_s, clean_start=False,
                                  properties=self._connect_props)
        self.client.loop_start()
        if self.scorer is not None:
            self.scorer.start()
        try:
            while not self.stop_event.is_set():
                batch = self._next_batch()
                if batch:
                    self._commit_with_retry(batch)
        finally:
            if self.scorer is not None:
                self.scorer.close()
            self.client.disconnect()
            self.client.loop_stop()
            server = getattr(self, "_metrics_server", None)
            if server is not None:
                server.shutdown()
                server.server_close()

    def _commit_with_retry(self, batch: List[Incoming]) -> None:
        delay = 0.5
        t0 = time.perf_counter()
        while True:
            try:
                res = self.ingestor.process(batch)
                break
            except OperationalError as exc:
                self.metrics.db_retries.inc()
                cause = getattr(exc, "orig", None) or exc  # the driver's own error: DeadlockDetected, ...
                log.error("database unavailable or the transaction aborted (%s: %s); retrying %d messages in %.1fs",
                          cause.__class__.__name__, str(cause).split("\n")[0][:200], len(batch), delay)
                if self.stop_event.wait(delay):
                    return  # not acknowledged: the broker redelivers them to the next session
                delay = min(delay * 2, self.cfg.retry_backoff_max_s)
        confirmed = self._confirm(res.acks)
        for m in batch:
            if m.qos > 0:
                self.client.ack(m.mid, m.qos)
        self.totals.update({"stored": res.stored, "duplicates": res.duplicates, "dead_letters": res.dead,
                            "status": res.status, "acks": confirmed})
        mx = self.metrics
        mx.commit.observe(time.perf_counter() - t0)
        mx.batch.observe(len(batch))
        for outcome, n in (("stored", res.stored), ("duplicate", res.duplicates), ("dead_letter", res.dead),
                           ("status", res.status)):
            if n:
                mx.messages.labels(outcome).inc(n)
        now = time.time()
        for t in res.captures_s:
            mx.lag.observe(max(0.0, now - t))
        log.info("committed batch of %d: stored %d, duplicates %d, dead letters %d%s", len(batch), res.stored,
                 res.duplicates, res.dead, f" {res.reasons}" if res.reasons else "")

    def _confirm(self, by_device: Dict[DeviceKey, List[acks.Ack]]) -> int:
        """Publish the batch's commit acknowledgements, one message (or more, past ``acks.MAX_ENTRIES``) per
        device. A lost acknowledgement costs the edge a resend after its timeout, which comes back a duplicate."""
        from paho.mqtt.client import MQTT_ERR_NO_CONN, MQTT_ERR_SUCCESS

        n = 0
        for (site, device), entries in by_device.items():
            topic = topics.ack_topic(site, device)
            for payload in acks.batches(entries):
                info = self.client.publish(topic, payload, qos=topics.ACK_QOS)
                if info.rc not in (MQTT_ERR_SUCCESS, MQTT_ERR_NO_CONN):  # not connected: paho sends it later
                    log.warning("could not publish acknowledgements to %s: rc %d", topic, info.rc)
            n += len(entries)
        return n

    def stop(self) -> None:
        self.stop_event.set()
