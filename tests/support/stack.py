"""The whole chain in one test process: a real Mosquitto, central (schema, model, tokens, the API served by
uvicorn on a loopback port, an ingest worker) and a real edge agent on synthetic cameras.

Used by tests that need what only the running system produces: the edge's stats at central (devices page and
gauges), ``/metrics`` of all three processes, a ``request_original`` command answered by the edge.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from sqlalchemy.orm import Session

from central import store
from central.api import create_app
from central.config import CentralConfig, parse_config
from central.ingest import IngestWorker
from sql.db import make_engine
from sql.migrate import upgrade
from tests.support.broker import Mosquitto, free_port, mosquitto_binary
from tokenline.manifest import Manifest


def wait(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


class Central:
    """central on SQLite: migrated schema, the model registered, tokens, the API on a port, one ingest worker."""

    def __init__(self, work: Path, model_dir: Path, broker: Mosquitto, **sections: Dict[str, Any]) -> None:
        self.url = f"sqlite:///{work / 'central.db'}"
        self.engine = make_engine(self.url)
        upgrade(self.engine)
        data: Dict[str, Any] = {"database": {"url": self.url}, "originals": {"root": str(work / "originals")},
                                "mqtt": {"host": broker.host, "port": broker.port, "client_id": "central-test-1",
                                         "group": "test"},
                                "ingest": {"batch_linger_ms": 50, "metrics_port": 0}}
        for k, v in sections.items():
            data.setdefault(k, {}).update(v)
        self.cfg: CentralConfig = parse_config(data)
        with Session(self.engine) as s, s.begin():
            self.model = store.register_model(s, Manifest.from_file(model_dir), model_dir)
            self.tokens = {r: store.create_token(s, f"test-{r}", r) for r in ("viewer", "device", "admin")}
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.app = create_app(self.cfg, self.engine)
        self.server: Any = None
        self.worker: Optional[IngestWorker] = None
        self._threads: List[threading.Thread] = []

    def start(self) -> "Central":
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        th = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        th.start()
        self._threads.append(th)
        wait(lambda: self.server.started, 20, "the API to listen")
        self.worker = IngestWorker(self.engine, self.cfg.mqtt, self.cfg.ingest)
        th = threading.Thread(target=self.worker.run, name="ingest", daemon=True)
        th.start()
        self._threads.append(th)
        wait(self.worker.connected.is_set, 20, "the ingest worker to subscribe")
        return self

    def headers(self, role: str = "viewer") -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def frames(self) -> int:
        with Session(self.engine) as s:
            return sum(store.table_stats(s)["frames"].values())

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.server is not None:
            self.server.should_exit = True
        for th in self._threads:
            th.join(15)
        self.engine.dispose()


def edge_config(work: Path, model_dir: Path, broker: Mosquitto, central: Central, *, frames: Optional[int] = 12,
                cameras: int = 1, policy: str = "on_request", fps: float = 20.0, **over: Any) -> Dict[str, Any]:
    cams = [{"name": f"cam-{i + 1}", "line": "line-1",
             "source": {"kind": "synthetic", "fps": fps, "seed": i, "max_frames": frames, "width": 96, "height": 64},
             "sampling": {"mode": "every_nth", "every_nth": 1}, "queue_depth": 256} for i in range(cameras)]
    upload: Dict[str, Any] = {"policy": policy}
    if policy != "none":
        upload.update(url=central.base, token=central.tokens["device"], retry_min_s=0.2, retry_max_s=1.0)
    cfg: Dict[str, Any] = {
        "device": "edge-1", "site": "plant-a", "model": {"dir": str(model_dir), "batch_size": 4}, "cameras": cams,
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "outbox": {"path": str(work / "outbox.sqlite"), "synchronous": "NORMAL"},
        "originals": {"dir": str(work / "edge-originals"), "upload": upload},
        "health": {"http_port": 0}, "stats_interval_s": 0.5, "shutdown_timeout_s": 5.0,
    }
    cfg.update(over)
    return cfg


@contextlib.contextmanager
def running_chain(work: Path, model_dir: Path, frames: int = 12) -> Iterator[Tuple[Mosquitto, Central, Any]]:
    """A started broker, central and edge agent (upload policy on_request, one synthetic camera sending ``frames``
    frames): ``(broker, central, agent)``, all stopped afterwards. Skips the test without Mosquitto."""
    import pytest

    from edge_agent.agent import Agent
    from edge_agent.config import parse_config as parse_edge_config

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed; `make test` installs Debian's 'mosquitto' package")
    broker = Mosquitto(work / "broker").start()
    central = Central(work, model_dir, broker).start()
    agent = Agent(parse_edge_config(edge_config(work, model_dir, broker, central, frames=frames)))
    agent.start()
    try:
        yield broker, central, agent
    finally:
        agent.shutdown()
        central.stop()
        broker.stop()
