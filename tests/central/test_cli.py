"""The tokenline-central CLI end to end on SQLite: migrate, register-model, create-token, search, config errors."""

from __future__ import annotations

import json

import numpy as np
from sqlalchemy.orm import Session

from central import store
from central.cli import main
from sql.db import make_engine
from tests.central.conftest import make_message


def test_cli_flow(tmp_path, tiny_model_dir, tiny_manifest, capsys):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert main(["--db", url, "migrate"]) == 0
    assert main(["--db", url, "register-model", str(tiny_model_dir)]) == 0
    assert main(["--db", url, "create-token", "line3-edge", "--role", "device"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    engine = make_engine(url)
    assert store.lookup_token(engine, token) == ("line3-edge", "device")
    rng = np.random.default_rng(0)
    msgs = [make_message(tiny_manifest, rng, seq=i) for i in range(12)]
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, 1, 0) for m in msgs])
    assert main(["--db", url, "search", "--like-frame", msgs[0].frame_id.hex(), "-k", "4", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 4 and msgs[0].frame_id.hex() not in {h["frame_id"] for h in hits}
    img = tmp_path / "q.png"
    import cv2

    cv2.imwrite(str(img), np.full((20, 20, 3), 99, np.uint8))
    assert main(["--db", url, "search", "--image", str(img), "-k", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


def test_cli_config_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("retention:\n  originals_days: 30\n  tokens_days: 7\nsearch:\n  candidatez: 3\n")
    assert main(["--config", str(bad), "migrate"]) == 2
    out = capsys.readouterr().out
    assert "search.candidatez" in out and "tokens_days must be >= originals_days" in out
