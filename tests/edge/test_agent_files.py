"""The agent with a folder camera: every file once, through queues far smaller than the folder, never dropped;
file names and labels in each message's metadata; a full outbox makes the folder wait, it evicts nothing."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import pytest

from edge_agent.agent import Agent, file_source_room
from edge_agent.config import parse_config
from edge_agent.journal import journal_path
from edge_agent.synthetic import draw_conveyor_frame
from tokenline.manifest import Manifest
from tests.edge.conftest import agent_config
from tests.support.broker import free_port
from tests.support.mqtt_sub import Collector
from tests.support.nodes import wait_for


def fill(d: Path, n: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(d / f"part-{i:03d}.jpg"), draw_conveyor_frame(i, 64, 48))


def folder_camera(d: Path, **source) -> dict:
    return {"name": "files", "line": "line-1", "labels": {"station": "7"}, "queue_depth": 1,
            "source": dict({"kind": "folder", "path": str(d), "settle_s": 0.05, "poll_s": 0.02}, **source)}


def test_every_file_once_through_tiny_queues_with_its_metadata(mosquitto, tmp_path, tiny_model_dir) -> None:
    d = tmp_path / "in"
    fill(d, 60)
    sub = Collector(mosquitto.host, mosquitto.port)
    cfg = agent_config(tmp_path, tiny_model_dir, mosquitto.port,
                       [folder_camera(d, delete_after_read=True, path_labels=r"part-(?P<part>\d+)")],
                       messages={"results_queue": 1})
    agent = Agent(parse_config(cfg)).start()
    try:
        assert wait_for(lambda: sub.count() >= 60 and not any(d.glob("*.jpg")), 60), \
            f"{sub.count()} messages, {len(list(d.glob('*.jpg')))} files left"
        snap = agent.snapshot()
    finally:
        assert agent.shutdown()
    sub.close()
    msgs = sub.messages
    assert len(msgs) == 60 and len({m.frame_id for m in msgs}) == 60
    assert sorted(m.metadata["source"] for m in msgs) == [f"part-{i:03d}.jpg" for i in range(60)]
    assert all(m.metadata["labels"] == {"station": "7", "part": m.metadata["source"][5:8]} for m in msgs)
    assert snap["drops"]["total"] == {} and snap["queues"]["frames"]["dropped"] == 0
    assert snap["cameras"]["files"]["source"]["committed"] == 60 and snap["cameras"]["files"]["source"]["deleted"] == 60
    assert not (d / "rejected").exists()


@pytest.mark.parametrize("folders", [1, 2])
def test_a_full_outbox_makes_the_folder_wait_instead_of_evicting(tmp_path, tiny_model_dir, folders) -> None:
    dirs = [tmp_path / f"in-{i}" for i in range(folders)]
    for d in dirs:
        fill(d, 40)

    def config(max_messages: int) -> dict:
        cams = [dict(folder_camera(d, delete_after_read=True), name=f"files-{i}") for i, d in enumerate(dirs)]
        return agent_config(tmp_path, tiny_model_dir, free_port(), cams, messages={"results_queue": 2},
                            model={"dir": str(tiny_model_dir), "batch_size": 2}, outbox={"max_messages": max_messages})

    # the smallest outbox the agent accepts: exactly the room file sources keep free before they read
    room, _ = file_source_room(parse_config(config(1000)), Manifest.from_file(tiny_model_dir))
    agent = Agent(parse_config(config(room))).start()  # no broker: nothing leaves the outbox
    try:
        assert wait_for(lambda: agent.outbox.count > 0, 30)
        time.sleep(1.5)
        snap = agent.snapshot()
    finally:
        agent.shutdown()
    assert 0 < snap["outbox"]["pending"] <= room and snap["outbox"]["evicted"] == 0 and snap["drops"]["total"] == {}
    left = sum(len(list(d.glob("*.jpg"))) for d in dirs)
    assert left == 40 * folders - snap["outbox"]["inserted"]  # a file is deleted only once its frame is in the outbox
    assert journal_path(tmp_path / "outbox.sqlite").exists()
