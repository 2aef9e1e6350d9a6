"""Health reporting: a local HTTP endpoint (GET /health, /stats, /metrics), a JSON health file, systemd sd_notify.

``sd_notify`` writes to ``$NOTIFY_SOCKET`` directly (no python-systemd dependency): ``READY=1`` at start,
``WATCHDOG=1`` on every healthy stats tick, ``STOPPING=1`` on shutdown.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)


def sd_notify(state: str) -> bool:
    """Send ``state`` to systemd when run under it (Type=notify); False when there is no $NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode("utf-8"))
        return True
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", state, exc)
        return False


def watchdog_interval_s() -> Optional[float]:
    """Half of systemd's WatchdogSec (from $WATCHDOG_USEC), or None when no watchdog is configured."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


def write_health_file(path: Path, snapshot: dict) -> None:
    """Write the snapshot atomically (tmp + rename), so readers never see half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(snapshot, indent=1, sort_keys=True))
    tmp.replace(p)


class HealthServer:
    """GET /health -> {"status", "state", "problems", "awaiting_confirmation", "oldest_awaiting_s", "pending"} (200
    when healthy, 503 otherwise); GET /stats -> the full snapshot; GET /metrics -> ``metrics()`` (Prometheus text,
    ``edge_agent.metrics``) when given."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], dict],
                 metrics: Optional[Callable[[], bytes]] = None) -> None:
        get = snapshot

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                if self.path == "/metrics" and metrics is not None:
                    data = metrics()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if self.path not in ("/health", "/stats"):
                    self.send_error(404)
                    return
                snap = get()
                outbox = snap.get("outbox") or {}
                body = snap if self.path == "/stats" else {
                    "status": snap.get("status"), "state": snap.get("state"), "problems": snap.get("problems", []),
                    "awaiting_confirmation": outbox.get("awaiting_confirmation", 0),
                    "oldest_awaiting_s": outbox.get("oldest_awaiting_s", 0.0),
                    "pending": outbox.get("pending", 0)}
                data = json.dumps(body).encode()
                self.send_response(200 if snap.get("status") == "ok" or self.path == "/stats" else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt: str, *args) -> None:
                log.debug("health: " + fmt, *args)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="health-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
