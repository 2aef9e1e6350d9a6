"""docs/own-images.md, followed to the letter: its `sh` blocks run in bash as written (step 2 with this test's
model, folder, work directory and ports), with the real programs on PATH and a real Mosquitto; a folder of
images ends up searchable, labelled by sub-folder, and a search by one of them finds it first."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import func, select

from sql.db import make_engine
from sql.models import Frame
from tests.support.broker import free_port, mosquitto_binary

DOC = Path(__file__).resolve().parents[2] / "docs" / "own-images.md"


def blocks() -> list:
    return re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S)


def bash(script: str, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_the_walkthrough_runs_as_written(tmp_path, tiny_model_dir):
    broker = mosquitto_binary()
    if broker is None:
        pytest.skip("mosquitto is not installed; `make test` installs Debian's 'mosquitto' package")
    setup, *steps = blocks()
    assert "export MODEL=" in setup and len(steps) == 5, "docs/own-images.md: step 2 first, then five blocks"
    start, models_list, search = "\n".join(steps[:3]), steps[3], steps[4]
    images = tmp_path / "my-images"
    rng = np.random.default_rng(3)
    for folder in ("dots", "stripes"):
        (images / folder).mkdir(parents=True)
        for i in range(4):
            img = (rng.random((64, 96, 3)) * 255).astype(np.uint8)
            cv2.imwrite(str(images / folder / f"part-{i}.jpg"), img)
    work = tmp_path / "work"
    mine = (f"export MODEL={tiny_model_dir} IMAGES={images} WORK={work}\n"
            f"export MQTT_PORT={free_port()} API_PORT={free_port()}\n")
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), str(Path(broker).parent),
                                                  os.environ.get("PATH", "")]))
    # whatever happens, the daemons the blocks start are written down, so that the test stops them
    ran = bash(mine + 'mkdir -p "$WORK"; trap \'jobs -p > "$WORK/pids"\' EXIT\n' + start, env, tmp_path)
    pids = [int(p) for p in (work / "pids").read_text().split()] if (work / "pids").exists() else []
    try:
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert len(pids) == 4 and "page: http://127.0.0.1:" in ran.stdout and "token: tl_" in ran.stdout
        engine = make_engine(f"sqlite:///{work / 'central.db'}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with engine.connect() as c:
                if c.scalar(select(func.count()).select_from(Frame)) == 8:
                    break
            time.sleep(0.5)
        else:
            logs = {n: (work / n).read_text()[-2000:] for n in ("edge.log", "ingest.log") if (work / n).exists()}
            raise AssertionError(f"8 frames never arrived: {logs}")
        listed = bash(mine + models_list, env, tmp_path)
        assert listed.returncode == 0 and "tiny-test-encoder" in listed.stdout, listed.stdout + listed.stderr
        found = bash(mine + search, env, tmp_path)
        assert found.returncode == 0, found.stdout + found.stderr
        rows = [ln for ln in found.stdout.splitlines() if re.search(r"\b[0-9a-f]{32}\b", ln)]
        assert len(rows) == 5, found.stdout
        assert "dots/part-0.jpg" in rows[0] and "folder=dots" in rows[0], found.stdout  # the query's own frame
        assert "UTC" in rows[0]
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in pids:
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
