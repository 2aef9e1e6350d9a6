"""Edge-side anomaly scoring end to end: a real edge agent, a real Mosquitto and a real central ingest worker.

A reference set is built at central from the agent's first frames and exported into the agent's model directory
(the CLI); a second agent run scores its frames locally against it. Every message carries the edge's score, central
scores the same frames itself, and the two must agree; flagged frames raise an alert from the edge (source "edge")
and one from central (source "central") on the camera's alert topic. A bank for another model stops the agent.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from central.cli import main as central_cli
from edge_agent.agent import Agent, AgentError
from edge_agent.config import parse_config
from sql.db import make_engine
from sql.models import Frame, FrameScore
from tests.central.test_anomaly import _ingest_worker
from tests.central.test_ingest import LogTail, _wait_for
from tests.edge.conftest import agent_config, synthetic_camera
from tests.support.mqtt_sub import Collector
from tests.support.tiny_model import build_tiny_model
from tokenline import topics
from tokenline.anomaly import Bank, bank_path
from tokenline.manifest import Manifest

FRAMES = 24


def _count(engine, table) -> int:
    with Session(engine) as s:
        return int(s.scalar(select(func.count()).select_from(table)))


def _run_agent(tmp: Path, model_dir: Path, port: int, seed: int, source=None, **over) -> Agent:
    cfg = agent_config(tmp, model_dir, port, [synthetic_camera("cam-1", seed=seed, frames=FRAMES, **(source or {}))],
                       **over)
    return Agent(parse_config(cfg)).start()


@pytest.mark.parametrize("profile", ["default", "flagging"])
def test_edge_scores_like_central_and_both_alert_the_same_frames(mosquitto, tmp_path, tiny_model_dir, capsys,
                                                                  profile):
    """``flagging``: the shape of the export for flagging (docs/anomaly.md): slic tokens with footprints, more than
    16 of them (8-bit footprint cells on the wire, K=64 here), projected to 64 dims and sent as int4."""
    model_dir = tmp_path / "model"
    if profile == "default":
        shutil.copytree(tiny_model_dir, model_dir)
        messages, good, new = {}, {"seed": 1}, {"seed": 2}
    else:  # the reference frames again, now with defects on some plates: only frames showing one are unusual
        build_tiny_model(model_dir, size=64, patch=8, dim=384, head="slic", token_dim=64)
        messages = {"messages": {"token_dtype": "int4"}}
        good, new = {"seed": 1, "source": {"defect_rate": 0.0}}, {"seed": 1, "source": {"defect_rate": 0.5}}
    k = Manifest.from_file(model_dir).summary.k
    url = f"sqlite:///{tmp_path / 'central.db'}"
    assert central_cli(["--db", url, "migrate"]) == 0
    assert central_cli(["--db", url, "register-model", str(model_dir)]) == 0
    engine = make_engine(url)
    worker = _ingest_worker(tmp_path, url, mosquitto)
    log = LogTail(worker)
    alerts = Collector(mosquitto.host, mosquitto.port, topic=topics.ALERTS_FILTER)
    try:
        log.wait("subscribed as group", 1, timeout=120)  # a loaded machine starts it slowly
        # 1. good frames, no local scoring: central stores them, then a reference set of all of them, exported
        agent = _run_agent(tmp_path / "run1", model_dir, mosquitto.port, **good, **messages)
        try:
            assert _wait_for(lambda: _count(engine, Frame) == FRAMES, 60), "".join(log.lines[-20:])
        finally:
            assert agent.shutdown()
        with Session(engine) as s:
            ids = list(s.scalars(select(Frame.frame_id)))
        ids_file = tmp_path / "ids.txt"
        ids_file.write_text("\n".join(ids))
        assert central_cli(["--db", url, "reference-set", "create", "good", "--frames-file", str(ids_file),
                            "--quantile", "0.5"]) == 0
        assert central_cli(["--db", url, "reference-set", "export", "1", "--model-dir", str(model_dir)]) == 0
        capsys.readouterr()
        bank = Bank.load(bank_path(model_dir, "site-a", "line-1", "cam-1"))
        assert (bank.info.set_id, bank.info.set_version) == (1, 1)
        # flagging: 24 x 64 tokens of 64 dims, enough to whiten by (central's default); default: 384 tokens of 384
        # dims, a cosine bank (central.anomaly.bank.WHITEN_MIN_TOKENS_PER_DIM)
        assert bank.info.metric == ("whitened" if profile == "flagging" else "cosine")

        # 2. new frames scored on the edge; central scores them too
        agent = _run_agent(tmp_path / "run2", model_dir, mosquitto.port, anomaly={"enabled": True}, **new,
                           **messages)
        sub = Collector(mosquitto.host, mosquitto.port, confirm=False)  # sees the messages; central confirms
        try:
            assert _wait_for(lambda: _count(engine, FrameScore) == FRAMES, 60), "".join(log.lines[-20:])
            assert _wait_for(lambda: agent.outbox.count == 0, 30)
            stats = agent.snapshot()["anomaly"]
        finally:
            assert agent.shutdown()
        with Session(engine) as s:
            rows = {r.frame_id: r for r in s.scalars(select(FrameScore))}
        edge = {m.frame_id_hex: m.anomaly for m in sub.messages}
        assert all(m.token_dtype == ("int4" if profile == "flagging" else "int8") and len(m.summary.tokens) == k
                   for m in sub.messages)
        if profile == "flagging":
            assert k == 64 and all(m.summary.footprint is not None and m.summary.footprint.max() >= 16
                                   for m in sub.messages)  # footprint cells name tokens past 15: 8 bits a cell
        sub.close()
        assert len(rows) == FRAMES and set(edge) == set(rows)
        # frames next to a bank frame included: whitened distances are computed directly, not from rounded products
        for fid, r in rows.items():
            a = edge[fid]
            assert a is not None and (a.set_id, a.set_version) == (r.set_id, r.set_version) == (1, 1)
            assert r.edge_score == pytest.approx(a.score, abs=1e-6)  # stored as it travelled
            assert r.score == pytest.approx(a.score, abs=1e-5)  # central's own score: the same
            assert (a.flagged, a.token, a.threshold) == (r.flagged, r.token, pytest.approx(r.threshold, abs=1e-6))
        flagged = sorted(fid for fid, r in rows.items() if r.flagged)
        assert 0 < len(flagged) < FRAMES, [round(r.score, 4) for r in rows.values()]
        assert (stats["scored"], stats["flagged"], stats["alerts_published"], stats["errors"]) == \
            (FRAMES, len(flagged), len(flagged), 0)
        assert stats["cameras"] == ["cam-1"]

        assert alerts.wait_for(lambda c: len(c.raw) >= 2 * len(flagged), 20)
        got = [(t, topics.parse_alert(p)) for t, p, _ in alerts.raw]
        topic = topics.alert_topic("site-a", "edge-test", "line-1", "cam-1")
        assert all(t == topic for t, _ in got)
        for source in ("edge", "central"):
            mine = [a for _, a in got if a.source == source]
            assert sorted(a.frame_id for a in mine) == flagged, source
            for a in mine:
                r = rows[a.frame_id]
                assert a.device == "edge-test" and a.score == pytest.approx(r.score, abs=1e-5)
                assert a.token == r.token and np.allclose(a.box, (r.x0, r.y0, r.x1, r.y1), atol=1e-3)
    finally:
        worker.terminate()
        worker.wait(10)
        alerts.close()


def test_a_bank_for_another_model_or_a_corrupt_one_stops_the_agent(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    rng = np.random.default_rng(0)
    d = Manifest.from_file(model_dir).embedding_dim
    from central.anomaly.bank import SetFrames, build_bank
    from tokenline.anomaly import BankInfo

    tokens = rng.standard_normal((4, 16, d)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
    frames = SetFrames(tokens, np.ones((4, 16), np.float32), tokens[:, 0])
    info = BankInfo(1, 1, "x", "site-a", "line-1", "cam-1", "0" * 32, nprobe=4)
    path = bank_path(model_dir, "site-a", "line-1", "cam-1")
    build_bank(frames, info, 100, 0.9).bank.save(path)
    cfg = parse_config(agent_config(tmp_path, model_dir, 1, [synthetic_camera("cam-1")], anomaly={"enabled": True}))
    with pytest.raises(AgentError, match="bank is for model 0{32}"):
        Agent(cfg)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(AgentError, match="anomaly: "):
        Agent(cfg)
    path.unlink()  # no bank for the camera: it is simply not scored
    agent = Agent(cfg)
    assert agent.anomaly is not None and agent.anomaly.stats()["cameras"] == []
