"""Prometheus exposition shared by the programs: a registry with process metrics, and a small /metrics server.

Metric names follow Prometheus conventions: ``tokenline_`` prefix, base units (``_seconds``, ``_bytes``),
counters end in ``_total`` and are exported from the start (zero) rather than after their first event.
``prometheus_client`` is imported here only; the edge installs it with its extra (Python 3.8 compatible).
"""

from __future__ import annotations

import logging
import threading
from http.server import ThreadingHTTPServer
from typing import Any, Tuple

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def new_registry() -> Any:
    """A registry of its own (never the global one: tests and several apps share a process) with the process
    metrics (``process_cpu_seconds_total``, ``process_resident_memory_bytes``, open fds, start time) and the
    Python platform info."""
    from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, disable_created_metrics

    disable_created_metrics()  # no <name>_created series next to every counter and histogram
    reg = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    return reg


def render(registry: Any) -> bytes:
    """The text exposition of ``registry``."""
    from prometheus_client import generate_latest

    return generate_latest(registry)


def serve(registry: Any, host: str, port: int) -> Tuple[ThreadingHTTPServer, int]:
    """Serve ``GET /metrics`` of ``registry`` on a daemon thread; returns the server and its port (``port`` 0 picks
    a free one)."""
    from prometheus_client.exposition import MetricsHandler

    server = ThreadingHTTPServer((host, port), MetricsHandler.factory(registry))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    actual = int(server.server_address[1])
    log.info("metrics on http://%s:%d/metrics", host, actual)
    return server, actual
