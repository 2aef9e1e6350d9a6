"""Prometheus ``/metrics`` of the edge agent, next to ``/stats``: the same snapshot, in Prometheus conventions.

Every scrape turns the agent's stats snapshot (``Agent.snapshot``, docs/protocol.md) into metric families, so
the numbers a scrape shows are the ones ``/stats`` and the stats messages show. Counters (``_total``) are the
agent's own counts since it started (Prometheus handles the reset at a restart); fields a snapshot lacks are 0,
so every name is there from the first scrape. Plus the process metrics of ``runtime.metrics``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

Snapshot = Callable[[], Dict[str, Any]]


def _get(d: Any, *path: str) -> float:
    for p in path:
        if not isinstance(d, dict):
            return 0.0
        d = d.get(p)
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else 0.0


# (name, help, path in the snapshot) of the counters and gauges without labels
COUNTERS: List[Tuple[str, str, Tuple[str, ...]]] = [
    ("tokenline_edge_inference_frames", "frames encoded", ("inference", "frames")),
    ("tokenline_edge_inference_batches", "inference batches run", ("inference", "batches")),
    ("tokenline_edge_inference_errors", "inference batches that failed", ("inference", "errors")),
    ("tokenline_edge_preprocess_errors", "frames that could not be preprocessed", ("inference", "preprocess_errors")),
    ("tokenline_edge_outbox_inserted", "messages committed to the outbox", ("outbox", "inserted")),
    ("tokenline_edge_outbox_published", "messages handed to the broker", ("outbox", "published")),
    ("tokenline_edge_outbox_acked", "messages removed from the outbox (acknowledged)", ("outbox", "acked")),
    ("tokenline_edge_outbox_evicted", "messages evicted from a full outbox (lost)", ("outbox", "evicted")),
    ("tokenline_edge_outbox_rejected", "messages the broker or central refused", ("outbox", "rejected")),
    ("tokenline_edge_outbox_write_errors", "frames that could not be written to the outbox", ("outbox", "write_errors")),
    ("tokenline_edge_mqtt_connection_drops", "MQTT connections lost", ("outbox", "connection_drops")),
    ("tokenline_edge_frames_dropped", "frames dropped from full capture queues", ("queues", "frames", "dropped")),
    ("tokenline_edge_results_dropped", "encoded frames dropped from the full results queue",
     ("queues", "results", "dropped")),
    ("tokenline_edge_originals_uploaded", "originals uploaded to central", ("originals", "uploaded")),
    ("tokenline_edge_originals_upload_failed", "original uploads that failed for good", ("originals", "upload_failed")),
    ("tokenline_edge_commands_received", "commands received", ("commands", "received")),
    ("tokenline_edge_commands_rejected", "commands refused (malformed or failed)", ("commands", "rejected")),
]
GAUGES: List[Tuple[str, str, Tuple[str, ...]]] = [
    ("tokenline_edge_outbox_pending", "messages in the outbox", ("outbox", "pending")),
    ("tokenline_edge_outbox_bytes", "payload bytes in the outbox", ("outbox", "bytes")),
    ("tokenline_edge_outbox_inflight", "messages sent, not yet acknowledged by the broker", ("outbox", "inflight")),
    ("tokenline_edge_awaiting_confirmation", "messages awaiting central's confirmation",
     ("outbox", "awaiting_confirmation")),
    ("tokenline_edge_oldest_unconfirmed_seconds", "age of the oldest message awaiting central's confirmation",
     ("outbox", "oldest_awaiting_s")),
    ("tokenline_edge_frame_queue_depth", "frames waiting for inference", ("queues", "frames", "depth")),
    ("tokenline_edge_results_queue_depth", "encoded frames waiting for the outbox", ("queues", "results", "depth")),
    ("tokenline_edge_originals_stored_bytes", "bytes of JPEG originals kept on the device", ("originals", "store_bytes")),
    ("tokenline_edge_originals_upload_pending", "originals waiting for upload", ("originals", "upload_pending")),
    ("tokenline_edge_uptime_seconds", "seconds since the agent started", ("uptime_s",)),
]


class SnapshotCollector:
    """A prometheus-client collector reading the agent's snapshot at every scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.snapshot()
        for name, help_, path in COUNTERS:
            yield CounterMetricFamily(name, help_, value=_get(snap, *path))
        for name, help_, path in GAUGES:
            yield GaugeMetricFamily(name, help_, value=_get(snap, *path))
        yield GaugeMetricFamily("tokenline_edge_healthy", "1 while /health answers ok",
                                value=1 if snap.get("status") == "ok" else 0)
        yield GaugeMetricFamily("tokenline_edge_mqtt_connected", "1 while connected to the broker",
                                value=1 if snap.get("mqtt_connected") else 0)
        yield GaugeMetricFamily("tokenline_edge_paused", "1 while paused by command",
                                value=1 if snap.get("paused") else 0)
        lat = GaugeMetricFamily("tokenline_edge_capture_to_encoded_seconds",
                                "capture to encoded time of recent frames, by quantile", labels=["quantile"])
        lat.add_metric(["0.5"], _get(snap, "inference", "latency_ms_p50") / 1000.0)
        lat.add_metric(["0.95"], _get(snap, "inference", "latency_ms_p95") / 1000.0)
        yield lat
        cams = snap.get("cameras") if isinstance(snap.get("cameras"), dict) else {}
        frames = CounterMetricFamily("tokenline_edge_camera_frames", "frames read from the camera", labels=["camera"])
        sampled = CounterMetricFamily("tokenline_edge_camera_sampled", "frames sampled for inference", labels=["camera"])
        errors = CounterMetricFamily("tokenline_edge_camera_errors", "camera read errors", labels=["camera"])
        dropped = CounterMetricFamily("tokenline_edge_camera_dropped", "frames dropped from the camera's full queue",
                                      labels=["camera"])
        fps = GaugeMetricFamily("tokenline_edge_camera_frames_per_second", "camera frame rate", labels=["camera"])
        up = GaugeMetricFamily("tokenline_edge_camera_up", "1 while the camera delivers frames", labels=["camera"])
        for cam, c in sorted(cams.items()):
            frames.add_metric([cam], _get(c, "frames"))
            sampled.add_metric([cam], _get(c, "sampled"))
            errors.add_metric([cam], _get(c, "errors"))
            dropped.add_metric([cam], _get(c, "queue_dropped"))
            fps.add_metric([cam], _get(c, "fps"))
            up.add_metric([cam], 1 if isinstance(c, dict) and c.get("state") == "open" else 0)
        yield from (frames, sampled, errors, dropped, fps, up)


def make_registry(snapshot: Snapshot) -> Any:
    """A registry with the snapshot collector and the process metrics."""
    from runtime.metrics import new_registry

    reg = new_registry()
    reg.register(SnapshotCollector(snapshot))
    return reg


def render(registry: Optional[Any]) -> bytes:
    from runtime.metrics import render as render_registry

    return render_registry(registry)
