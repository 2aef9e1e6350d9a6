"""Prometheus ``/metrics``: this process's request and search counters, and the database's gauges, as text."""

from __future__ import annotations

import threading
from typing import Callable, Dict, List, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from central import store


class Metrics:
    """Request counters of this process, exposed with the database gauges on /metrics."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Dict[Tuple[str, int], int] = {}
        self.search_seconds_sum = 0.0
        self.search_count = 0

    def count(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1

    def observe_search(self, seconds: float) -> None:
        with self.lock:
            self.search_seconds_sum += seconds
            self.search_count += 1


def count_requests(app: FastAPI, metrics: Metrics) -> None:
    """Count every answer by route template (``unmatched`` when no route matched) and status."""

    @app.middleware("http")
    async def _count(request: Request, call_next: Callable) -> Response:
        resp = await call_next(request)
        route = request.scope.get("route")
        metrics.count(getattr(route, "path", "unmatched"), resp.status_code)
        return resp


def render_metrics(session: Session, m: Metrics) -> str:
    """Prometheus text exposition: ingest counters (all workers), table gauges, this process's requests."""
    out: List[str] = []

    def add(name: str, kind: str, help_: str, samples: list) -> None:
        out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}")
        for labels, v in samples:
            lab = ",".join(f'{k}="{str(x)}"' for k, x in labels.items())
            out.append(f"{name}{{{lab}}} {v}" if lab else f"{name} {v}")

    counters = store.counter_totals(session)
    for name in sorted(counters):
        add(f"tokenline_{name}_total", "counter", f"{name.replace('_', ' ')} (all ingest workers and sweepers)",
            [({}, counters[name])])
    st = store.table_stats(session)
    add("tokenline_frames", "gauge", "frames stored per model", [({"model_id": k}, v) for k, v in st["frames"].items()])
    add("tokenline_dead_letters", "gauge", "dead letters by reason",
        [({"reason": k}, v) for k, v in st["dead_letters"].items()])
    add("tokenline_originals", "gauge", "originals by state", [({"state": k}, v[0]) for k, v in st["originals"].items()])
    add("tokenline_originals_bytes", "gauge", "bytes of originals by state",
        [({"state": k}, v[1]) for k, v in st["originals"].items()])
    add("tokenline_devices", "gauge", "devices seen", [({}, st["devices"])])
    with m.lock:
        add("tokenline_http_requests_total", "counter", "HTTP requests by route and status",
            [({"route": r, "status": s}, v) for (r, s), v in sorted(m.requests.items())])
        add("tokenline_search_seconds_sum", "counter", "time spent answering searches", [({}, round(m.search_seconds_sum, 6))])
        add("tokenline_search_count", "counter", "searches answered", [({}, m.search_count)])
    return "\n".join(out) + "\n"
