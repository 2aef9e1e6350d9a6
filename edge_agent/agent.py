"""The agent: wires cameras -> frame hub -> batched inference -> results queue -> outbox writer -> MQTT link.

Threads: one per camera, one inference thread (batches across cameras), one writer (quantize + encode + commit
to the outbox, store the JPEG original), the MQTT publisher, the originals uploader and a stats/watchdog
ticker. ``shutdown()`` stops capture, finishes the frames already sampled, commits them, tries to flush the
outbox within ``shutdown_timeout_s`` and disconnects cleanly; anything unsent stays in the outbox.

Frames of file sources (``Sample.lossless``) are never dropped: each stage waits for room in the next, and a
frame's ticket tells its source when it is committed to the outbox (or failed). Every frame lost anywhere else
is recorded in the drop log (a warning, and a problem in the health snapshot while recent).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Deque, Dict, List, Optional, Tuple

import numpy as np

from edge_agent import health
from edge_agent.anomaly import EdgeScorer
from edge_agent.capture import CameraWorker
from edge_agent.config import AgentConfig
from edge_agent.drops import DropLog
from edge_agent.journal import FileJournal, journal_path
from edge_agent.mqtt_link import MqttLink
from edge_agent.originals import OriginalsStore, encode_jpeg
from edge_agent.outbox import Outbox
from edge_agent.queues import DropOldestQueue, FrameHub, Sample
from runtime.runners import Runner, RunnerError, make_runner
from tokenline import topics
from tokenline.anomaly import AnomalyScore, BankError
from tokenline.manifest import Manifest, ManifestError, verify_files
from tokenline.preprocess import FrameGeometry, ImageError, frame_geometry, preprocess
from tokenline.summary import Summary
from tokenline.wire import MAX_METADATA_BYTES, TokenMessage, WireError, encode, message_size, with_header

log = logging.getLogger(__name__)


class AgentError(RuntimeError):
    """The agent cannot start (model, manifest, outbox)."""


@dataclass
class Result:
    """A sampled frame, its summary and its geometry (size, ROI), on its way to the outbox."""

    sample: Sample
    summary: Summary
    geometry: Optional[FrameGeometry] = None


def load_model(cfg: AgentConfig) -> Manifest:
    """Read (and optionally verify) the manifest; AgentError with the reason otherwise."""
    try:
        manifest = Manifest.from_file(cfg.model.dir)
        if cfg.model.verify_files:
            verify_files(manifest, cfg.model.dir)
    except ManifestError as exc:
        raise AgentError(f"model.dir: {exc}") from None
    return manifest


WRITER_BATCH = 64  # results the outbox writer takes from the results queue and commits in one transaction


def file_source_room(cfg: AgentConfig, manifest: Manifest) -> Tuple[int, int]:
    """``(frames, bytes of the largest message)`` a file source keeps free in the outbox before it reads: every
    frame that can be on its way (each camera's queue, one batch, the results queue, the results the writer has
    taken from it and is committing, the frame each file source holds while it waits for room in its queue)."""
    in_writer = min(WRITER_BATCH, cfg.messages.results_queue)
    frames = (sum(c.queue_depth for c in cfg.cameras) + cfg.model.batch_size + cfg.messages.results_queue
              + in_writer + sum(1 for c in cfg.cameras if c.lossless))
    names = (cfg.device, cfg.site, "x" * 64, "x" * 64)  # the longest line and camera names
    largest = message_size(cfg.messages.token_dtype, manifest.summary.k, manifest.embedding_dim, names) + 6 \
        + MAX_METADATA_BYTES
    return frames, largest


def room_problem(cfg: AgentConfig, manifest: Manifest) -> Optional[str]:
    """Why file sources could never read (an outbox smaller than the room they keep free), else None."""
    if not any(c.lossless for c in cfg.cameras):
        return None
    frames, largest = file_source_room(cfg, manifest)
    if frames > cfg.outbox.max_messages or frames * largest > cfg.outbox.max_bytes:
        return (f"outbox.max_messages/max_bytes: file sources keep room for {frames} messages of up to {largest} "
                f"bytes ({frames * largest} bytes) before they read; the outbox holds {cfg.outbox.max_messages} "
                f"messages, {cfg.outbox.max_bytes} bytes")
    return None


class Agent:
    def __init__(self, cfg: AgentConfig, runner: Optional[Runner] = None, manifest: Optional[Manifest] = None) -> None:
        self.cfg = cfg
        self.manifest = manifest or load_model(cfg)
        self.manifest_hash = self.manifest.hash_bytes()
        if cfg.messages.wire_version == 1 and (self.manifest.has_footprint
                                               or self.manifest.summary.dim != self.manifest.embedding_dim):
            raise AgentError(f"messages.wire_version: 1 cannot carry the {self.manifest.summary.method} summary of "
                             f"model {self.manifest.name!r} (footprints, tokens of dim {self.manifest.summary.dim}); "
                             "use 2 (upgrade central first)")
        if runner is None:
            try:
                runner = make_runner(cfg.model, self.manifest, Path(cfg.model.dir))
            except RunnerError as exc:
                raise AgentError(str(exc)) from None
        self.runner = runner
        try:
            self.anomaly = EdgeScorer(cfg, self.manifest) if cfg.anomaly.enabled else None
        except BankError as exc:
            raise AgentError(f"anomaly: {exc}") from None
        self.rois = {c.name: c.roi for c in cfg.cameras}
        problem = room_problem(cfg, self.manifest)
        if problem:
            raise AgentError(problem)
        self.hub = FrameHub({c.name: c.queue_depth for c in cfg.cameras})
        self.results: DropOldestQueue[Result] = DropOldestQueue(cfg.messages.results_queue,
                                                                keep=lambda r: r.sample.lossless)
        self.drops = DropLog(cfg.health.drop_window_s)
        self.journal: Optional[FileJournal] = None
        if any(c.lossless for c in cfg.cameras):
            path = journal_path(cfg.outbox.path)
            try:
                self.journal = FileJournal(path, cfg.outbox.synchronous)
            except (OSError, sqlite3.Error) as exc:
                raise AgentError(f"outbox.path: cannot open the file journal {path}: {exc}") from None
        try:
            self.outbox = Outbox(cfg.outbox.path, cfg.outbox.max_bytes, cfg.outbox.max_messages,
                                 cfg.outbox.synchronous)
        except (OSError, sqlite3.Error) as exc:
            raise AgentError(f"outbox.path: cannot open {cfg.outbox.path}: {exc}") from None
        moved = self.outbox.retopic(self._protocol_topic)
        if moved:
            log.info("outbox: %d message(s) moved to the topics of protocol %d", moved, cfg.mqtt.protocol)
        try:
            self.originals = OriginalsStore(cfg.originals) if cfg.originals.enabled else None
        except (OSError, sqlite3.Error) as exc:
            raise AgentError(f"originals.dir: cannot use {cfg.originals.dir}: {exc}") from None
        self.link = MqttLink(cfg, self.outbox, self.manifest_hash.hex(), self.handle_command)
        self._paused = False
        self.capture_stop = threading.Event()
        self.inference_done = threading.Event()
        self.writer_done = threading.Event()
        self.workers: Dict[str, CameraWorker] = {
            c.name: CameraWorker(c, self.hub, self.capture_stop, lambda: self._paused, journal=self.journal,
                                 drops=self.drops, room=self._outbox_room) for c in cfg.cameras}
        self._room_frames, self._largest_message = file_source_room(cfg, self.manifest)
        self._evicted_seen = self.outbox.evicted
        self._evicted_lock = threading.Lock()
        self._metadata_v1_warned = False
        self._stats_stop = threading.Event()
        self._threads: List[threading.Thread] = [
            threading.Thread(target=self._inference_loop, name="inference", daemon=True),
            threading.Thread(target=self._writer_loop, name="outbox-writer", daemon=True),
        ]
        self._ticker = threading.Thread(target=self._stats_loop, name="stats", daemon=True)
        self.started = time.monotonic()
        self.state = "created"
        self.counters = {"inference_frames": 0, "inference_batches": 0, "inference_errors": 0,
                         "preprocess_errors": 0, "encode_errors": 0, "originals_errors": 0,
                         "outbox_write_errors": 0, "commands_applied": 0}
        self._latency: Deque[float] = deque(maxlen=512)
        self._command_log: Deque[dict] = deque(maxlen=20)  # the latest commands and their outcome (stats)
        self._beat = {"inference": time.monotonic(), "writer": time.monotonic()}
        self._final: Optional[dict] = None
        self.health_server: Optional[health.HealthServer] = None
        if cfg.health.http_port is not None:
            try:
                self.health_server = health.HealthServer(cfg.health.http_host, cfg.health.http_port, self.snapshot,
                                                         metrics=self._metrics())
            except OSError as exc:
                raise AgentError(f"health.http_port: cannot listen on {cfg.health.http_host}:"
                                 f"{cfg.health.http_port}: {exc.strerror or exc}") from None

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> "Agent":
        self.state = "running"
        for t in self._threads:
            t.start()
        self.link.start()
        if self.originals is not None:
            self.originals.start()
        for w in self.workers.values():
            w.start()
        if self.health_server is not None:
            self.health_server.start()
        self._ticker.start()
        health.sd_notify("READY=1")
        log.info("agent %s/%s running: %d camera(s), runner %s, model %s (%s)", self.cfg.site, self.cfg.device,
                 len(self.workers), self.runner.name, self.manifest.name, self.manifest_hash.hex())
        return self

    def shutdown(self) -> bool:
        """Finish in-flight work, flush, disconnect. Returns True when the outbox was fully delivered."""
        if self.state in ("stopping", "stopped"):
            return self.outbox.count == 0
        self.state = "stopping"
        health.sd_notify("STOPPING=1")
        deadline = time.monotonic() + self.cfg.shutdown_timeout_s
        self.capture_stop.set()
        for w in self.workers.values():
            w.join(max(0.1, deadline - time.monotonic()))
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        flushed = self.link.flush(max(0.0, deadline - time.monotonic()))
        if not flushed:
            log.warning("shutdown: %d message(s) stay in the outbox for the next start", self.outbox.count)
        self._stats_stop.set()
        self._ticker.join(2)
        self.link.stop()
        if self.health_server is not None:
            self.health_server.stop()
        self.state = "stopped"
        self._final = self.snapshot()
        self._write_health_file()
        if self.originals is not None:
            self.originals.stop()
        self.outbox.close()
        if self.journal is not None:
            self.journal.close()
        self.runner.close()
        log.info("agent stopped (outbox %s)", "empty" if flushed else "kept for replay")
        return flushed

    def _metrics(self):  # noqa: ANN202 - Optional[Callable[[], bytes]]
        """``/metrics`` from the snapshot (``edge_agent.metrics``), or None without prometheus-client installed."""
        try:
            from edge_agent import metrics
        except ImportError:  # pragma: no cover - the edge extra installs it
            return None
        try:
            registry = metrics.make_registry(self.snapshot)
        except ImportError:
            log.warning("prometheus-client is not installed: no /metrics (pip install 'tokenline[edge]')")
            return None
        return lambda: metrics.render(registry)

    def _protocol_topic(self, topic: str) -> str:
        """Rows written under the other protocol's layout go out on this protocol's topics."""
        try:
            return topics.relayout(topic, self.cfg.device, self.cfg.mqtt.protocol)
        except topics.TopicError:
            return topic

    @property
    def paused(self) -> bool:
        return self._paused

    # -- commands ---------------------------------------------------------------------------------------------
    def handle_command(self, cmd: topics.Command) -> None:
        """Apply a command; its outcome goes into the stats (``commands.recent``), where central reads the answer
        to its ``request_original`` by ``request_id``. ValueError when it cannot be applied."""
        log.info("command %s camera=%s frame_id=%s request_id=%s", cmd.action, cmd.camera, cmd.frame_id,
                 cmd.request_id)
        try:
            self._apply_command(cmd)
        except ValueError as exc:
            self._command_log.append({"action": cmd.action, "frame_id": cmd.frame_id, "request_id": cmd.request_id,
                                      "ts": time.time(), "result": "failed", "detail": str(exc)[:200]})
            raise
        self._command_log.append({"action": cmd.action, "frame_id": cmd.frame_id, "request_id": cmd.request_id,
                                  "ts": time.time(), "result": "queued" if cmd.action == "request_original" else "applied"})
        self.counters["commands_applied"] += 1

    def _apply_command(self, cmd: topics.Command) -> None:
        if cmd.camera is not None and cmd.camera not in self.workers:
            raise ValueError(f"unknown camera {cmd.camera!r}")
        if cmd.action == "trigger":
            for name, w in self.workers.items():
                if cmd.camera in (None, name):
                    w.sampler.trigger()
        elif cmd.action == "pause":
            self._paused = True
        elif cmd.action == "resume":
            self._paused = False
        elif cmd.action == "request_original":
            if self.originals is None or not self.originals.request(cmd.frame_id or ""):
                raise ValueError(f"original {cmd.frame_id} is not in the local store")

    # -- inference --------------------------------------------------------------------------------------------
    def _inference_loop(self) -> None:
        spec = self.manifest.input
        m = self.cfg.model
        try:
            while True:
                self._beat["inference"] = time.monotonic()
                batch = self.hub.take_batch(m.batch_size, 0.2, m.batch_timeout_ms / 1000.0)
                if not batch:
                    if self.capture_stop.is_set() and not any(w.is_alive() for w in self.workers.values()):
                        if not any(self.hub.depths().values()):
                            return
                    continue
                pixels, good, geometry = [], [], []
                for s in batch:
                    try:
                        roi = self.rois.get(s.camera)
                        pixels.append(preprocess(s.frame, spec, roi))
                        geometry.append(frame_geometry(s.frame, roi))
                        good.append(s)
                    except ImageError as exc:
                        self.counters["preprocess_errors"] += 1
                        self.workers[s.camera].stats.errors += 1
                        log.warning("camera %s: frame not usable: %s", s.camera, exc)
                        if s.ticket is not None:
                            s.ticket.failed(f"preprocessing: {exc}", retry=False)
                        self.drops.add("preprocess_error", detail=f"camera {s.camera}: {exc}")
                if not good:
                    continue
                try:
                    out = self.runner.run(np.stack(pixels))
                except Exception as exc:  # noqa: BLE001 - a failing batch is counted, the loop goes on
                    self.counters["inference_errors"] += 1
                    log.error("inference failed on a batch of %d: %s", len(good), exc)
                    self._failed(good, "inference_error", f"inference failed: {exc}")
                    time.sleep(0.05)
                    continue
                self.counters["inference_batches"] += 1
                self.counters["inference_frames"] += len(good)
                for i, s in enumerate(good):
                    r = Result(s, out[i], geometry[i])
                    if s.lossless:
                        if not self.results.put_wait(r, self.writer_done.is_set):
                            self._failed([s], "results_full", "the outbox writer stopped")
                    else:
                        dropped = self.results.put(r)
                        if dropped is not None:
                            self.drops.add("results_full", detail="encoded frames come faster than they are "
                                                                  "written to the outbox")
        finally:
            self.inference_done.set()

    def _failed(self, samples: List[Sample], kind: str, reason: str) -> None:
        """Frames that did not make it for a reason that is not theirs: a file source reads its file again,
        a live camera's frame is a drop."""
        live = 0
        for s in samples:
            if s.ticket is not None:
                s.ticket.failed(reason, retry=True)
            elif not s.lossless:
                live += 1
        self.drops.add(kind, live, detail=reason)

    def _outbox_room(self) -> bool:
        """Whether the outbox can take the frames already on their way and one more without evicting any: file
        sources wait while it cannot (the folder is their buffer), so an offline broker costs them no frame."""
        ob, n = self.outbox, self._room_frames
        return ob.count + n <= ob.max_messages and ob.bytes + n * self._largest_message <= ob.max_bytes

    # -- outbox writer ----------------------------------------------------------------------------------------
    def _message_bytes(self, r: Result, anomaly: Optional[AnomalyScore] = None) -> bytes:
        s = r.sample
        summary = replace(r.summary, centroids=np.clip(r.summary.centroids, 0.0, 1.0))
        version = self.cfg.messages.wire_version
        metadata = s.metadata
        if metadata is not None and version < 2:
            metadata = None  # version 1 has no metadata section
            if not self._metadata_v1_warned:
                self._metadata_v1_warned = True
                log.warning("messages.wire_version 1 carries no metadata: file names and labels are not sent")
        if version >= 2 and r.geometry is not None:
            # the frame's geometry: central draws footprints in the original frame's coordinates with it
            metadata = {**(metadata or {}), "frame": r.geometry.to_json()}
        msg = TokenMessage(frame_id=s.frame_id, device=self.cfg.device, site=self.cfg.site, line=s.line,
                           camera=s.camera, capture_ts_us=s.capture_ts_us, seq=0, manifest_hash=self.manifest_hash,
                           summary=summary, token_dtype=self.cfg.messages.token_dtype, metadata=metadata,
                           anomaly=anomaly if version >= 2 else None)
        buf = encode(msg, version=version)
        self._largest_message = max(self._largest_message, len(buf))
        return buf

    def _writer_loop(self) -> None:
        try:
            while True:
                self._beat["writer"] = time.monotonic()
                items = self.results.get_many(WRITER_BATCH, 0.2)
                if not items:
                    if self.inference_done.is_set() and not len(self.results):
                        return
                    continue
                entries, written, alerts = [], [], []
                for r in items:
                    a = self.anomaly.score(r.sample.camera, r.summary) if self.anomaly is not None else None
                    try:
                        buf = self._message_bytes(r, a)
                    except WireError as exc:
                        self.counters["encode_errors"] += 1
                        log.error("camera %s: cannot encode frame %s: %s (%s)", r.sample.camera,
                                  r.sample.frame_id.hex(), exc, exc.reason)
                        if r.sample.ticket is not None:
                            r.sample.ticket.failed(f"cannot encode: {exc}", retry=False)
                        self.drops.add("encode_error", detail=str(exc))
                        continue
                    topic = topics.tokens_topic(self.cfg.site, self.cfg.device, r.sample.line, r.sample.camera,
                                                self.cfg.mqtt.protocol)
                    entries.append((r.sample.camera, topic, lambda seq, b=buf: with_header(b, seq=seq)))
                    written.append(r.sample)
                    if a is not None and a.flagged and self.cfg.anomaly.alerts and self.cfg.mqtt.protocol >= 2:
                        s = r.sample
                        alerts.append(self.anomaly.alert(a, s.frame_id.hex(), s.line, s.camera, s.capture_ts_us,
                                                         r.summary))
                if entries:
                    try:
                        self.outbox.put_many(entries)
                    except sqlite3.OperationalError as exc:  # e.g. "database or disk is full"
                        # live frames are lost, but counted and reported; files are read again; the agent keeps
                        # running and writes again as soon as the disk has room (the outbox drains on PUBACKs)
                        self.counters["outbox_write_errors"] += len(entries)
                        log.error("outbox write failed, %d frame(s) not written: %s", len(entries), exc)
                        self._failed(written, "outbox_write_error", f"outbox write failed: {exc}")
                        continue
                    for s in written:
                        if s.ticket is not None:
                            s.ticket.committed()
                    self.link.wake()
                for alert in alerts:  # the frames are in the outbox: tell the line now
                    self.anomaly.sent(self.link.publish_alert(alert.topic, alert.to_json()))
                now = time.monotonic()
                for r in items:
                    self._latency.append((now - r.sample.t_captured) * 1000.0)
                if self.originals is not None:
                    for r in items:
                        try:
                            self.originals.put(r.sample.frame_id,
                                               encode_jpeg(r.sample.frame, self.cfg.originals.jpeg_quality))
                        except Exception as exc:  # noqa: BLE001 - a full disk must not stop the tokens
                            self.counters["originals_errors"] += 1
                            log.error("cannot store original %s: %s", r.sample.frame_id.hex(), exc)
                            self.drops.add("original_not_stored", detail=str(exc))
        except Exception:  # noqa: BLE001 - e.g. the outbox disk failed: log loudly, health goes red
            log.exception("outbox writer failed")
            self.state = "failed"
        finally:
            self.writer_done.set()

    # -- stats / health ---------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        if self._final is not None:
            return self._final
        lat = sorted(self._latency)

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else 0.0

        depths = self.hub.depths()
        cams = {}
        for name, w in self.workers.items():
            d = w.stats.as_dict()
            d.update(queue_depth=depths.get(name, 0), queue_dropped=self.hub.dropped.get(name, 0),
                     source=w.source_stats())
            cams[name] = d
        with self._evicted_lock:  # the outbox logs its evictions; the drop log reports them in /health
            evicted = self.outbox.evicted
            new, self._evicted_seen = evicted - self._evicted_seen, evicted
        self.drops.add("outbox_evicted", new, detail="outbox.max_bytes / max_messages")
        link = self.link.stats()
        problems = []
        now = time.monotonic()
        if self.state == "running":
            for k, t in self._beat.items():
                if now - t > 10:
                    problems.append(f"{k} thread stalled for {now - t:.0f}s")
        for t in self._threads:
            if self.state == "running" and not t.is_alive():
                problems.append(f"{t.name} thread died")
        if not link["connected"]:
            problems.append("MQTT not connected")
        outbox = self.outbox.stats()
        if outbox["oldest_awaiting_s"] > self.cfg.health.max_unconfirmed_age_s:
            problems.append(f"{outbox['awaiting_confirmation']} frame(s) awaiting central's confirmation, the oldest "
                            f"for {outbox['oldest_awaiting_s']:.0f}s")
        if link["connected"] and not link["subscriptions_ok"]:
            problems.append("the broker refused the command/acknowledgement subscription")
        for name, d in cams.items():
            if d["state"] in ("reopening", "failed"):
                problems.append(f"camera {name} {d['state']}")
        problems.extend(self.drops.problems())
        snap = {
            "device": self.cfg.device, "site": self.cfg.site, "ts": time.time(),
            "uptime_s": round(now - self.started, 1), "state": self.state,
            "status": "ok" if not problems and self.state == "running" else "degraded", "problems": problems,
            "mqtt_connected": link["connected"], "paused": self._paused, "runner": self.runner.name,
            "model": {"name": self.manifest.name, "hash": self.manifest_hash.hex()},
            "cameras": cams,
            "inference": {"frames": self.counters["inference_frames"], "batches": self.counters["inference_batches"],
                          "errors": self.counters["inference_errors"],
                          "preprocess_errors": self.counters["preprocess_errors"],
                          "latency_ms_p50": pct(0.5), "latency_ms_p95": pct(0.95)},
            "queues": {"frames": {"depth": sum(depths.values()), "capacity": sum(self.hub.capacity.values()),
                                  "dropped": sum(self.hub.dropped.values())},
                       "results": {"depth": len(self.results), "capacity": self.results.capacity,
                                   "dropped": self.results.dropped}},
            "outbox": dict(outbox, published=link["published"], inflight=link["inflight"],
                           publish_errors=link["publish_errors"], encode_errors=self.counters["encode_errors"],
                           write_errors=self.counters["outbox_write_errors"],
                           no_subscriber_retries=link["no_subscriber_retries"],
                           connection_drops=link["connection_drops"], protocol=link["protocol"],
                           acks_received=link["acks_received"], acks_invalid=link["acks_invalid"]),
            "originals": (dict(self.originals.stats(), errors=self.counters["originals_errors"])
                          if self.originals is not None else None),
            "commands": {"received": self.link.commands_received, "rejected": self.link.commands_rejected,
                         "applied": self.counters["commands_applied"], "recent": list(self._command_log)},
            "drops": {"total": self.drops.totals(), "recent": self.drops.recent(),
                      "window_s": self.drops.window_s},
            "anomaly": self.anomaly.stats() if self.anomaly is not None else None,
        }
        return snap

    def _write_health_file(self) -> None:
        if self.cfg.health.file is not None:
            try:
                health.write_health_file(self.cfg.health.file, self.snapshot())
            except OSError as exc:
                log.warning("cannot write health file %s: %s", self.cfg.health.file, exc)

    def _stats_loop(self) -> None:
        wd = health.watchdog_interval_s() if self.cfg.health.watchdog else None
        tick = min(self.cfg.stats_interval_s, wd) if wd else self.cfg.stats_interval_s
        last_stats = 0.0
        while not self._stats_stop.wait(tick if last_stats else 0.5):
            try:
                snap = self.snapshot()
                now = time.monotonic()
                if now - last_stats >= self.cfg.stats_interval_s - 1e-3 or not last_stats:
                    last_stats = now
                    self.link.publish_stats(snap)
                    self._write_health_file()
                if wd and not any("thread" in p for p in snap["problems"]):
                    health.sd_notify("WATCHDOG=1")
            except Exception:  # noqa: BLE001
                log.exception("stats tick failed")
