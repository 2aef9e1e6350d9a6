"""The tokenline-central CLI end to end on SQLite: migrate, register-model, create-token, search, config errors."""

from __future__ import annotations

import json

import numpy as np
from sqlalchemy.orm import Session

from central import store
from central.cli import main
from sql.db import make_engine
from tests.central.conftest import make_message, tx


def test_cli_flow(tmp_path, tiny_model_dir, tiny_manifest, capsys):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert main(["--db", url, "migrate"]) == 0
    assert main(["--db", url, "register-model", str(tiny_model_dir)]) == 0
    assert main(["--db", url, "create-token", "line3-edge", "--role", "device"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    engine = make_engine(url)
    assert tx(engine, store.lookup_token, token) == ("line3-edge", "device")
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


def test_cli_search_answers_like_the_api(tmp_path, tiny_model_dir, capsys):
    """The CLI builds queries with the API's code: no model, no text tower, several models without --model-id, an
    unknown frame are one-line errors (exit 2) with the API's words; the API answers them 404 / 400 / 400 / 404."""
    from fastapi.testclient import TestClient

    from central.api import create_app
    from tests.central.conftest import config_for
    from tests.support.tiny_model import build_tiny_model

    url = f"sqlite:///{tmp_path / 'c.db'}"
    img = tmp_path / "q.png"
    import cv2

    cv2.imwrite(str(img), np.full((20, 20, 3), 99, np.uint8))
    assert main(["--db", url, "migrate"]) == 0
    engine = make_engine(url)
    client = TestClient(create_app(config_for(tmp_path, url), engine))
    viewer = {"Authorization": "Bearer " + tx(engine, store.create_token, "qa", "viewer")}

    def cli_error(*args: str) -> str:
        capsys.readouterr()
        assert main(["--db", url, "search", *args]) == 2
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    def api_error(data: dict, files: dict | None = None) -> tuple:
        r = client.post("/v1/search", data=data, files=files, headers=viewer)
        return r.status_code, r.json()["detail"]

    png = {"image": ("q.png", img.read_bytes(), "image/png")}
    assert "no model is registered" in cli_error("--image", str(img))
    assert api_error({}, png) == (404, "no model is registered")
    assert main(["--db", url, "register-model", str(tiny_model_dir)]) == 0
    no_text = "model 'tiny-test-encoder' has no text tower; search by example image instead"
    assert no_text in cli_error("--text", "scratch")  # longer than a terminal line: still one line
    assert api_error({"q": "scratch"}) == (400, no_text)
    other = build_tiny_model(tmp_path / "m2", size=32, patch=8, dim=384, seed=7, name="other-encoder")
    assert main(["--db", url, "register-model", str(other)]) == 0
    several = "several models are registered; say which with model_id"
    assert several in cli_error("--image", str(img))
    assert several in cli_error("--text", "scratch")
    assert api_error({}, png) == (400, several)
    assert api_error({"q": "scratch"}) == (400, several)
    assert f"unknown frame '{'f' * 32}'" in cli_error("--like-frame", "f" * 32)
    assert api_error({"like_frame": "f" * 32}) == (404, f"unknown frame '{'f' * 32}'")
    capsys.readouterr()
    assert main(["--db", url, "search", "--image", str(img), "--model-id", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []  # the model is named: an answer (no frames stored yet)
