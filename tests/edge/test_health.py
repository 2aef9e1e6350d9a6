"""Health: sd_notify to systemd's socket, the HTTP health/stats endpoint, the health file."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edge_agent import health


def test_sd_notify_writes_to_the_notify_socket(tmp_path: Path, monkeypatch) -> None:
    path = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(2)
    try:
        assert not health.sd_notify("READY=1")  # no $NOTIFY_SOCKET: nothing sent
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert health.sd_notify("WATCHDOG=1")
        assert srv.recv(100) == b"WATCHDOG=1"
        monkeypatch.setenv("WATCHDOG_USEC", "4000000")
        assert health.watchdog_interval_s() == 2.0
    finally:
        srv.close()


def test_health_server_and_file(tmp_path: Path) -> None:
    snap = {"status": "ok", "state": "running", "problems": [], "outbox": {"pending": 3}}
    srv = health.HealthServer("127.0.0.1", 0, lambda: snap)
    srv.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/health", timeout=5) as r:
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/stats", timeout=5) as r:
            assert json.loads(r.read())["outbox"]["pending"] == 3
        snap["status"] = "degraded"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/health", timeout=5)
        assert e.value.code == 503
    finally:
        srv.stop()
    health.write_health_file(tmp_path / "h" / "health.json", snap)
    assert json.loads((tmp_path / "h" / "health.json").read_text())["status"] == "degraded"
