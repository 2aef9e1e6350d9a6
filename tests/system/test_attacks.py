"""Issue 9's hostile cases with real processes: Mosquitto, the edge agent (``tokenline-edge run``), central's
``ingest`` and ``serve`` on SQLite.

Rows 6-12 (files, hostile input, operations): 150 images copied slowly into a watched folder (held open half
written, appended in bursts, written under a temporary name and renamed) while the edge is SIGKILLed and restarted
reach central exactly once each and are deleted only once committed; image bombs get a 400 from their header while
``/healthz`` keeps answering during legitimate heavy decodes; a flood of garbage leaves bounded dead letters; a
leaked token is revoked from the CLI and the admin API.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Dict, List

import cv2
import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edge_agent.synthetic import draw_conveyor_frame
from tests.edge.conftest import agent_config
from tests.support.broker import Mosquitto, mosquitto_binary
from tests.support.image_bombs import jpeg_bomb, png_bomb
from tests.support.nodes import CentralNode, EdgeNode, wait_for
from tests.support.tiny_model import build_tiny_model
from tokenline import topics

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it)")


@pytest.fixture(scope="module")
def files_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("attack-model"), size=32, patch=8, dim=384)


# -- rows 6, 7, 8: a watched folder, files copied in slowly, the edge restarted ------------------------------------
def _copy_slowly(data: bytes, dest: Path, how: str, hold_s: float, burst_s: float) -> None:
    """Copy ``data`` to ``dest`` the way real writers do, never all at once."""
    thirds = [data[: len(data) // 3], data[len(data) // 3: 2 * len(data) // 3], data[2 * len(data) // 3:]]
    if how == "held":  # one writer keeps the file open, half written, longer than the settle time
        with open(dest, "wb") as fh:
            for i, part in enumerate(thirds):
                fh.write(part)
                fh.flush()
                if i < 2:
                    time.sleep(hold_s)
    elif how == "append":  # reopened for every burst, pauses shorter than the settle time
        for part in thirds:
            with open(dest, "ab") as fh:
                fh.write(part)
            time.sleep(burst_s)
    else:  # write-then-rename: written slowly under a temporary name
        tmp = dest.with_name(dest.name + ".tmp")
        for part in thirds:
            with open(tmp, "ab") as fh:
                fh.write(part)
            time.sleep(burst_s)
        os.rename(tmp, dest)


def test_folder_files_copied_in_slowly_arrive_exactly_once_across_an_edge_restart(tmp_path, files_model_dir) -> None:
    n_files, writers = 150, 10
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    images = {f"part-{i:03d}.jpg": cv2.imencode(".jpg", draw_conveyor_frame(i, 320, 240))[1].tobytes()
              for i in range(n_files)}
    broker = Mosquitto(tmp_path / "broker").start()
    central = CentralNode(tmp_path / "central", files_model_dir, broker.port)
    central.start("ingest")
    camera = {"name": "files", "line": "line-1",
              "source": {"kind": "folder", "path": str(inbox), "delete_after_read": True, "settle_s": 0.5}}
    edge = EdgeNode(tmp_path, agent_config(tmp_path, files_model_dir, broker.port, [camera])).start()
    names = sorted(images)
    methods = ("held", "append", "rename")

    def writer(k: int) -> None:
        for j, name in enumerate(names[k::writers]):
            _copy_slowly(images[name], inbox / name, methods[j % 3], hold_s=0.7, burst_s=0.15)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(writers)]
    stored = lambda: central.query("SELECT COUNT(*) FROM frames")[0][0]  # noqa: E731
    try:
        for t in threads:
            t.start()
        assert wait_for(lambda: stored() >= 40, 90), f"only {stored()} frames arrived"
        edge.kill()  # mid-stream, files in the pipeline and the outbox; the writers go on
        time.sleep(1.0)
        edge.start()
        for t in threads:
            t.join(120)
        assert wait_for(lambda: stored() >= n_files and not any(inbox.glob("*.jpg")), 120), \
            f"{stored()} stored, {len(list(inbox.glob('*.jpg')))} files left"
        time.sleep(1.0)  # anything sent twice has its chance to (wrongly) show up
        rows = central.query("SELECT frame_id, source FROM frames")
        dups = central.query("SELECT COALESCE(SUM(value), 0) FROM counters WHERE name = 'duplicates'")[0][0]
        assert edge.stop() == 0
        stats = edge.stats()
    finally:
        if edge.proc is not None and edge.proc.poll() is None:
            edge.kill()
        central.stop()
        broker.stop()
    print(f"\n{n_files} files copied slowly, edge SIGKILLed once: stored {len(rows)}, distinct frame ids "
          f"{len({r[0] for r in rows})}, distinct files {len({r[1] for r in rows})}, resends dropped by central "
          f"as duplicates {dups}, files left {len(list(inbox.iterdir()))}")
    assert len(rows) == n_files and len({r[0] for r in rows}) == n_files
    assert sorted(r[1] for r in rows) == names  # every file exactly once, by name
    assert list(inbox.iterdir()) == []  # deleted after the commit, nothing rejected, no temporary left over
    assert stats["drops"]["total"] == {} and stats["cameras"]["files"]["source"]["rejected"] == 0
    assert stats["outbox"]["pending"] == 0


# -- rows 9, 10: image bombs at central's search ------------------------------------------------------------------
def test_image_bombs_get_a_400_and_healthz_answers_during_heavy_decodes(tmp_path, files_model_dir) -> None:
    central = CentralNode(tmp_path / "central", files_model_dir, api={"image_workers": 1})
    try:
        central.start("serve", "--no-sweeper")
        viewer = {"Authorization": "Bearer " + central.token("viewer-1", "viewer")}
        with httpx.Client(base_url=central.url, headers=viewer, timeout=120) as http:
            for name, body in (("bomb.jpg", jpeg_bomb()), ("bomb.png", png_bomb())):
                r = http.post("/v1/search", files={"image": (name, body)})
                print(f"\n{name}: {len(body)} bytes -> {r.status_code} {r.json()}")
                assert r.status_code == 400 and r.json()["error"] == "too_many_pixels"
            # legitimate but heavy: 49 MP JPEGs, decoded one at a time on the image pool
            x = np.linspace(0, 255, 7000).astype(np.uint8)
            big = cv2.imencode(".jpg", np.dstack([np.tile(x, (7000, 1)), np.tile(x[:, None], (1, 7000)),
                                                  np.full((7000, 7000), 80, np.uint8)]))[1].tobytes()
            done: Dict[str, float] = {}

            def search(i: int) -> None:
                r = http.post("/v1/search", files={"image": ("big.jpg", big)}, data={"k": "3"})
                assert r.status_code == 200, r.text
                done[f"search-{i}"] = time.monotonic()

            threads = [threading.Thread(target=search, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            time.sleep(0.3)  # the first upload is in and being decoded
            with httpx.Client(base_url=central.url, timeout=60) as probe:
                assert probe.get("/healthz").status_code == 200
            done["healthz"] = time.monotonic()
            for t in threads:
                t.join(120)
        order = sorted(done, key=done.get)
        print(f"answered in this order: {order}")
        assert order[0] == "healthz"  # not behind any decode: the event loop never decodes
    finally:
        central.stop()


# -- row 11: a flood of garbage -----------------------------------------------------------------------------------
def test_a_garbage_flood_leaves_bounded_dead_letters(tmp_path, files_model_dir) -> None:
    n, size, cap = 300, 60_000, 200_000
    broker = Mosquitto(tmp_path / "broker").start()
    central = CentralNode(tmp_path / "central", files_model_dir, broker.port,
                          retention={"sweep_interval_s": 0.5, "dead_letters_max_bytes": cap})
    try:
        central.start("ingest")
        central.start("serve")  # its sweeper enforces the dead letters' retention
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flooder", protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        topic = topics.tokens_topic("plant1", "line1", "cam1")
        rng = np.random.default_rng(0)
        infos = [pub.publish(topic, bytes(rng.integers(0, 256, size, dtype=np.uint8)), qos=1) for _ in range(n)]
        for info in infos:
            info.wait_for_publish(30)
        pub.loop_stop()
        pub.disconnect()
        counted = lambda: central.query(  # noqa: E731
            "SELECT COALESCE(SUM(value), 0) FROM counters WHERE name = 'dead_letters'")[0][0]
        weight = lambda: central.query(  # noqa: E731
            "SELECT COALESCE(SUM(LENGTH(payload) + LENGTH(detail) + LENGTH(topic)), 0) FROM dead_letters")[0][0]
        assert wait_for(lambda: counted() >= n, 90), f"{counted()} dead letters counted"
        assert wait_for(lambda: weight() <= cap, 30), f"dead letters weigh {weight()} bytes"
        rows = central.query("SELECT id, LENGTH(payload), payload_len FROM dead_letters ORDER BY id")
        deleted = central.query("SELECT COALESCE(SUM(value), 0) FROM counters WHERE name = 'dead_letters_deleted'")
        top = central.query("SELECT MAX(id) FROM dead_letters")[0][0]
    finally:
        central.stop()
        broker.stop()
    print(f"\n{n} x {size} B of garbage ({n * size} B): {len(rows)} dead letters kept, {weight()} B, "
          f"{deleted[0][0]} deleted by the sweeper (cap {cap} B)")
    assert all(stored <= 1024 and length == size for _, stored, length in rows)  # garbage: only its head kept
    assert 0 < len(rows) <= cap // 1024 and deleted[0][0] >= n - len(rows)
    assert rows[-1][0] == top and [r[0] for r in rows] == list(range(rows[0][0], top + 1))  # the newest kept


# -- row 12: a leaked token ---------------------------------------------------------------------------------------
def test_a_leaked_token_is_revoked(tmp_path, files_model_dir) -> None:
    central = CentralNode(tmp_path / "central", files_model_dir)
    try:
        leaked = central.token("line3-tablet", "viewer")
        other = central.token("line4-tablet", "viewer")
        admin = central.token("ops", "admin")
        central.start("serve", "--no-sweeper")
        with httpx.Client(base_url=central.url, timeout=30) as http:
            def status(tok: str) -> int:
                return http.get("/v1/models", headers={"Authorization": "Bearer " + tok}).status_code

            assert status(leaked) == 200 and status(other) == 200
            central.cli("token", "revoke", "line3-tablet")  # from a shell, while the API runs
            assert wait_for(lambda: status(leaked) == 401, 20, step=0.5)  # the API's token cache lasts seconds
            listed = http.get("/v1/tokens", headers={"Authorization": "Bearer " + admin}).json()["tokens"]
            by_name: Dict[str, List[dict]] = {}
            for t in listed:
                by_name.setdefault(t["name"], []).append(t)
            assert by_name["line3-tablet"][0]["revoked_us"] is not None
            r = http.delete(f"/v1/tokens/{by_name['line4-tablet'][0]['id']}",
                            headers={"Authorization": "Bearer " + admin})
            assert r.status_code == 200 and status(other) == 401  # through the API: at once
            assert status(admin) == 200
    finally:
        central.stop()
