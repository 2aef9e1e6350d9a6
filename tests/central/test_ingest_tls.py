"""Ingest through a secured broker: the same MQTT connection keys as the edge (TLS, password from a file), the
generated ACLs for the central service user."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from central import store
from central.config import parse_config
from central.ingest import IngestWorker
from sql.db import make_engine
from sql.migrate import upgrade
from sql.models import Frame
from tests.central.conftest import make_message, tx
from tests.deploy.test_broker_acl import Conn, secured  # noqa: F401 - the fixture is used by name
from tokenline import topics
from tokenline.wire import encode


def test_ingest_over_tls_with_a_password_file(secured, tmp_path: Path, tiny_manifest) -> None:  # noqa: F811
    broker, tls_port, ca, pw = secured
    (tmp_path / "central.pw").write_text(pw["central"] + "\n")
    cfg = parse_config({"mqtt": {"host": "127.0.0.1", "port": tls_port, "client_id": "central",
                                 "username": "central", "password_file": str(tmp_path / "central.pw"),
                                 "tls": {"enabled": True, "ca_file": str(ca)}},
                        "ingest": {"batch_linger_ms": 20}}, where="central.yaml")
    engine = make_engine(f"sqlite:///{tmp_path / 'central.db'}")
    upgrade(engine)
    tx(engine, store.register_model, tiny_manifest)
    worker = IngestWorker(engine, cfg.mqtt, cfg.ingest)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    device = Conn(tls_port, "jetson-a", pw["jetson-a"], ca).connect()
    try:
        assert worker.connected.wait(20), "the worker did not connect and subscribe through TLS"
        rng = np.random.default_rng(0)
        msgs = [make_message(tiny_manifest, rng, site="plant1", line="line1", camera="cam1", device="jetson-a",
                             seq=i) for i in range(3)]
        for m in msgs:
            assert not device.publish(topics.tokens_topic("plant1", "jetson-a", "line1", "cam1"), encode(m)).is_failure
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and worker.totals["stored"] < 3:
            time.sleep(0.05)
        with Session(engine) as s:
            stored = set(s.scalars(select(Frame.frame_id)))
            assert s.scalar(select(func.count()).select_from(Frame)) == 3
        assert stored == {m.frame_id.hex() for m in msgs}
    finally:
        device.close()
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()
