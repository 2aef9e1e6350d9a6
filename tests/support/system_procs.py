"""Real processes for whole-system tests and the soak benchmark: central's ingest worker and the edge agent, each
started from its CLI, SIGKILLable and restartable, with readers for what they left behind (central's SQLite
rows, the edge's health file)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from tests.support.nodes import wait_for

ROOT = Path(__file__).resolve().parents[2]


def spawn(cmd: List[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def read_health(path: Path) -> Dict[str, Any]:
    """The edge's health file (the stats JSON), {} while it is not there yet."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def prepare_database(db: Path, model_dir: Path) -> None:
    """What ``tokenline-central migrate`` and ``register-model`` do, here in this process (quicker than two more
    interpreters): the schema, and the model registered."""
    from sqlalchemy.orm import Session

    from central import store
    from sql.db import make_engine
    from sql.migrate import upgrade
    from tokenline.manifest import Manifest

    engine = make_engine(f"sqlite:///{db}")
    try:
        upgrade(engine)
        with Session(engine) as s, s.begin():
            store.register_model(s, Manifest.from_file(model_dir), model_dir)
    finally:
        engine.dispose()


class CentralProcess:
    """central's ingest worker on SQLite (``python -m central.cli ingest``) as a real process."""

    def __init__(self, tmp: Path, port: int, model_dir: Path, client_id: str = "central-fault-1",
                 username: Optional[str] = None, password: Optional[str] = None, log_level: str = "WARNING",
                 db: Optional[Path] = None, **ingest: Any) -> None:
        """``db``: the SQLite file (default ``tmp/central.db``); several workers may share one."""
        self.tmp, self.db = Path(tmp), Path(db) if db is not None else Path(tmp) / "central.db"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.cfg = self.tmp / "central.yaml"
        mqtt: Dict[str, Any] = {"host": "127.0.0.1", "port": port, "client_id": client_id}
        if username is not None:
            (self.tmp / "central.pw").write_text((password or "") + "\n")
            mqtt.update(username=username, password_file=str(self.tmp / "central.pw"))
        self.cfg.write_text(yaml.safe_dump({
            "database": {"url": f"sqlite:///{self.db}"}, "mqtt": mqtt,
            "ingest": dict({"batch_max": 20, "batch_linger_ms": 50}, **ingest),
        }))
        self.base = [sys.executable, "-m", "central.cli", "--config", str(self.cfg), "--log-level", log_level]
        prepare_database(self.db, model_dir)
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    def start(self) -> "CentralProcess":
        self.starts += 1
        self.proc = spawn(self.base + ["ingest", "--no-migrate"], self.tmp / f"ingest-{self.starts}.log")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def query(self, sql: str, args: Tuple[Any, ...] = ()) -> List[Tuple[Any, ...]]:
        try:
            with sqlite3.connect(self.db, timeout=10) as db:
                return db.execute(sql, args).fetchall()
        except sqlite3.Error:
            return []

    def rows(self) -> List[Tuple[str, str, int]]:
        """(frame_id, camera, seq) of every stored frame."""
        return self.query("SELECT frame_id, camera, seq FROM frames")  # type: ignore[return-value]

    def log_text(self) -> str:
        """The current run's log (``log_level`` INFO shows subscriptions and batches)."""
        try:
            return (self.tmp / f"ingest-{self.starts}.log").read_text(errors="replace")
        except OSError:
            return ""

    def subscribed(self, timeout: float = 30) -> bool:
        """Wait for this run's "subscribed" line (needs ``log_level`` INFO)."""
        return wait_for(lambda: "subscribed as group" in self.log_text(), timeout, 0.1)


class EdgeProcess:
    """The edge agent (``python -m edge_agent run``) from a configuration mapping, as a real process."""

    def __init__(self, tmp: Path, cfg: Dict[str, Any], name: str = "edge") -> None:
        self.tmp, self.name = Path(tmp), name
        self.cfg_path = self.tmp / f"{name}.yaml"
        self.cfg_path.write_text(yaml.safe_dump(cfg))
        self.health = Path(cfg["health"]["file"])
        self.outbox = Path(cfg["outbox"]["path"])
        self.log = self.tmp / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "EdgeProcess":
        self.proc = spawn([sys.executable, "-m", "edge_agent", "run", "--config", str(self.cfg_path)], self.log)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stats(self) -> Dict[str, Any]:
        return read_health(self.health)

    def outbox_stats(self) -> Dict[str, Any]:
        return self.stats().get("outbox") or {}

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30) -> Optional[int]:
        """SIGTERM and wait; the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""
