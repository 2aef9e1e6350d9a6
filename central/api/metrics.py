"""Prometheus ``/metrics`` of the API process (prometheus-client): its requests and searches, and the database's view.

Several processes write central's counts (the API, n ingest workers, the sweeper), possibly on several hosts,
so the totals that must add up across them are counted **in the database**, in the same transaction as the
rows they count (``counters`` table), and exported here at scrape time: one scrape of any ``serve`` gives
exact totals for the whole deployment, present from the start. Per-device gauges (online, last seen, backlog,
oldest unconfirmed frame, frames/s) and the ingest lag come from the tables too. What only one process knows
is exported by that process: this one's HTTP requests and search latency histogram (and process metrics);
each ingest worker's batch-size, commit-time and lag histograms on its own ``ingest.metrics_port``
(``central.ingest``). docs/central.md, "Metrics", lists every name.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import Response
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from central import devices, store
from central.anomaly.alerts import WEBHOOK_DROPPED, WEBHOOK_FAILED, WEBHOOK_SENT
from central.anomaly.scoring import ALERTS, SCORED
from runtime import metrics as prom
from sql.models import Frame, ScoreQueue

log = logging.getLogger(__name__)

# Counters kept in the database (store.add_counters), exported as tokenline_<name>_total even before any event.
DB_COUNTERS = {
    "received": "token messages received by the ingest workers (all workers)",
    "stored": "frames stored (all workers)",
    "duplicates": "token messages dropped as already stored (redeliveries, replays)",
    "dead_letters": "messages refused into dead letters",
    "status_updates": "status and stats messages from devices",
    "frames_deleted": "frame rows deleted (retention sweeps, models removed)",
    SCORED: "frames given an anomaly score (scorers and backfills)",
    ALERTS: "frames over their reference set's threshold (alerts published)",
    WEBHOOK_SENT: "alerts POSTed to the webhook",
    WEBHOOK_FAILED: "alerts the webhook refused after every retry",
    WEBHOOK_DROPPED: "alerts dropped because the webhook's queue was full",
}
SEARCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class DatabaseCollector:
    """Metrics read from the database at scrape time (module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> list:
        return []  # collected at scrape time only (the registry must not query the database on registration)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            with Session(self.engine) as s:
                counters = store.counter_totals(s)
                st = store.table_stats(s)
                devs = devices.list_devices(s)
                last = s.execute(select(Frame.received_us, Frame.capture_us).where(
                    Frame.id == select(func.max(Frame.id)).scalar_subquery())).first()
                queued, first_queued = s.execute(select(func.count(), func.min(ScoreQueue.queued_us))).one()
        except Exception as exc:  # noqa: BLE001 - a scrape reports the database as down rather than failing
            log.warning("metrics: database unavailable: %s", exc)
            yield GaugeMetricFamily("tokenline_database_up", "1 when the database answered this scrape", value=0)
            return
        yield GaugeMetricFamily("tokenline_database_up", "1 when the database answered this scrape", value=1)
        for name in sorted(set(DB_COUNTERS) | set(counters)):
            yield CounterMetricFamily(f"tokenline_{name}", DB_COUNTERS.get(name, name.replace("_", " ")),
                                      value=counters.get(name, 0))
        g = GaugeMetricFamily("tokenline_frames", "frames stored, per model", labels=["model_id"])
        for k, v in sorted(st["frames"].items()):
            g.add_metric([str(k)], v)
        yield g
        g = GaugeMetricFamily("tokenline_dead_letters_kept", "dead letters kept, by reason", labels=["reason"])
        for k, v in sorted(st["dead_letters"].items()):
            g.add_metric([k], v)
        yield g
        g = GaugeMetricFamily("tokenline_originals", "originals by state", labels=["state"])
        b = GaugeMetricFamily("tokenline_originals_bytes", "bytes of originals by state", labels=["state"])
        for state in ("kept", "deleting", "deleted"):
            n, size = st["originals"].get(state, (0, 0))
            g.add_metric([state], n)
            b.add_metric([state], size)
        yield g
        yield b
        yield GaugeMetricFamily("tokenline_devices", "devices seen", value=st["devices"])
        labels = ["device", "site"]
        online = GaugeMetricFamily("tokenline_device_online", "1 while the device's retained status is online", labels=labels)
        seen = GaugeMetricFamily("tokenline_device_last_seen_timestamp_seconds", "last message from the device",
                                 labels=labels)
        backlog = GaugeMetricFamily("tokenline_device_backlog_messages",
                                    "messages in the device's outbox not yet confirmed (its last stats)", labels=labels)
        oldest = GaugeMetricFamily("tokenline_device_oldest_unconfirmed_seconds",
                                   "age of the device's oldest frame awaiting confirmation (its last stats)", labels=labels)
        fps = GaugeMetricFamily("tokenline_device_frames_per_second", "frames/s over the device's cameras", labels=labels)
        infer = GaugeMetricFamily("tokenline_device_inference_seconds", "median capture-to-encoded time on the device",
                                  labels=labels)
        drops = CounterMetricFamily("tokenline_device_dropped_frames", "frames the device dropped or evicted "
                                    "(its own count; resets when it restarts)", labels=labels)
        for d in devs:
            lab = [d["device"], d["site"]]
            online.add_metric(lab, 1 if d["online"] else 0)
            seen.add_metric(lab, d["last_seen_us"] / 1e6)
            backlog.add_metric(lab, d["backlog"] or 0)
            oldest.add_metric(lab, d["oldest_unconfirmed_s"] or 0.0)
            fps.add_metric(lab, d["frames_per_s"] or 0.0)
            infer.add_metric(lab, (d["inference_ms_p50"] or 0.0) / 1000.0)
            drops.add_metric(lab, d["drops"] or 0)
        yield from (online, seen, backlog, oldest, fps, infer, drops)
        yield GaugeMetricFamily("tokenline_last_ingest_timestamp_seconds", "when the newest frame was stored",
                                value=(last[0] / 1e6) if last else 0.0)
        yield GaugeMetricFamily("tokenline_score_queue_frames", "frames stored and waiting for their anomaly score",
                                value=queued)
        yield GaugeMetricFamily("tokenline_score_queue_oldest_seconds", "how long the oldest of them has waited",
                                value=max(0.0, store.now_us() - first_queued) / 1e6 if first_queued is not None else 0.0)
        yield GaugeMetricFamily("tokenline_newest_frame_lag_seconds", "capture to storage of the newest frame",
                                value=max(0.0, (last[0] - last[1]) / 1e6) if last else 0.0)


class Metrics:
    """This API process's metrics and the database collector, in a registry of its own."""

    def __init__(self, engine: Engine) -> None:
        from prometheus_client import Counter, Histogram

        self.registry = prom.new_registry()
        self.requests = Counter("tokenline_http_requests", "HTTP requests answered, by route template and status",
                                ["route", "status"], registry=self.registry)
        self.search_seconds = Histogram("tokenline_search_seconds", "time to answer a search (encode, kNN, re-rank)",
                                        buckets=SEARCH_BUCKETS, registry=self.registry)
        self.original_requests = Counter("tokenline_original_requests", "originals requested from edges, by outcome of "
                                         "the publish", ["result"], registry=self.registry)
        for r in ("sent", "failed"):
            self.original_requests.labels(r)
        self.registry.register(DatabaseCollector(engine))

    def count(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def observe_search(self, seconds: float) -> None:
        self.search_seconds.observe(seconds)

    def render(self) -> bytes:
        return prom.render(self.registry)


def count_requests(app: FastAPI, metrics: Metrics) -> None:
    """Count every answer by route template (``unmatched`` when no route matched) and status."""

    @app.middleware("http")
    async def _count(request: Request, call_next: Callable) -> Response:
        resp = await call_next(request)
        route = request.scope.get("route")
        metrics.count(getattr(route, "path", "unmatched"), resp.status_code)
        return resp
