"""Real processes for the hostile-input system tests: central (``serve`` and ``ingest`` on one SQLite database and
configuration) and an edge agent (``tokenline-edge run``), each started from its CLI, stoppable and SIGKILLable."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import yaml

from tests.support.broker import free_port

ROOT = Path(__file__).resolve().parents[2]


def wait_for(pred: Callable[[], Any], timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class CentralNode:
    """One central: a configuration file, a SQLite database, the model registered, and its processes."""

    def __init__(self, tmp: Path, model_dir: Path, mqtt_port: Optional[int] = None, **sections: Any) -> None:
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.db = self.tmp / "central.db"
        self.port = free_port()
        cfg = {"database": {"url": f"sqlite:///{self.db}"}, "originals": {"root": str(self.tmp / "originals")},
               "api": {"host": "127.0.0.1", "port": self.port},
               "mqtt": {"host": "127.0.0.1", "port": mqtt_port or 1883, "client_id": "central-attack-1"},
               "ingest": {"batch_max": 50, "batch_linger_ms": 50}}
        self.config = self.tmp / "central.yaml"
        self.config.write_text(yaml.safe_dump(_merge(cfg, sections)))
        self.procs: Dict[str, subprocess.Popen] = {}
        self.cli("migrate")
        self.cli("register-model", str(model_dir))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "central.cli", "--config", str(self.config), "--log-level",
                            "WARNING", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"tokenline-central {' '.join(args)} -> {r.returncode}: {r.stdout}{r.stderr}")
        return r

    def token(self, name: str, role: str) -> str:
        return self.cli("token", "create", name, "--role", role).stdout.strip().splitlines()[-1]

    def start(self, what: str, *args: str) -> subprocess.Popen:
        """``serve`` (waits until /healthz answers) or ``ingest``."""
        log = open(self.tmp / f"{what}.log", "ab")
        p = subprocess.Popen([sys.executable, "-m", "central.cli", "--config", str(self.config), "--log-level",
                              "INFO", what, "--no-migrate", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.procs[what] = p
        if what == "serve":
            import httpx

            def up() -> bool:
                if p.poll() is not None:
                    raise RuntimeError(f"serve exited: {(self.tmp / 'serve.log').read_text()[-2000:]}")
                try:
                    return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            assert wait_for(up, 60), "central serve did not come up"
        return p

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def query(self, sql: str, args: tuple = ()) -> List[tuple]:
        with sqlite3.connect(self.db, timeout=10) as db:
            return db.execute(sql, args).fetchall()


class EdgeNode:
    """``tokenline-edge run`` on a configuration dict; ``kill()`` is SIGKILL, ``stop()`` SIGTERM."""

    def __init__(self, tmp: Path, cfg: Dict[str, Any]) -> None:
        self.tmp = Path(tmp)
        self.config = self.tmp / "edge.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.health = Path(cfg["health"]["file"])
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    def start(self) -> "EdgeNode":
        self.starts += 1
        log = open(self.tmp / f"edge-{self.starts}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(self.config)],
                                     cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def stats(self) -> Dict[str, Any]:
        try:
            return json.loads(self.health.read_text())
        except (OSError, ValueError):
            return {}

    def log(self) -> str:
        return "".join((self.tmp / f"edge-{i}.log").read_text(errors="replace") for i in range(1, self.starts + 1))
