"""The tokenline-central CLI end to end on SQLite: migrate, register-model, create-token, search, models, and the
conventions of runtime.cli: options anywhere, one-line errors with exit code 2 and no traceback, quiet output."""

from __future__ import annotations

import json

import numpy as np
from sqlalchemy.orm import Session

from central import segments, store
from central.cli import main
from central.config import SegmentsConfig
from sql.db import make_engine
from tests.central.conftest import make_message, tx


def test_cli_flow(tmp_path, tiny_model_dir, tiny_manifest, capsys):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert main(["--db", url, "migrate"]) == 0
    assert main(["--db", url, "register-model", str(tiny_model_dir)]) == 0
    capsys.readouterr()
    assert main(["--db", url, "create-token", "line3-edge", "--role", "device"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("tl_")  # only the token on stdout: TOKEN=$(... create-token ...)
    token = out.strip()
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
    err = capsys.readouterr().err
    assert "search.candidatez" in err and "tokens_days must be >= originals_days" in err
    assert err.count("\n") == 1 and err.startswith("error: ")  # several bad keys, still one line


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
        lines = capsys.readouterr().err.strip().splitlines()
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


def _one_line_error(capsys, argv: list) -> str:
    """Run the CLI, expect exit code 2 and exactly one line on stderr, no traceback; returns that line."""
    capsys.readouterr()
    assert main(argv) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    assert "Traceback" not in cap.err + cap.out
    return lines[0]


def test_cli_expected_errors_are_one_line(tmp_path, tiny_model_dir, tiny_manifest, capsys):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    line = _one_line_error(capsys, ["--db", f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'c.db'}", "migrate"])
    assert f"the directory {tmp_path / 'no' / 'such' / 'dir'} does not exist" in line  # the fix, not SQLAlchemy's text
    assert "not a database URL" in _one_line_error(capsys, ["--db", "nosuchdb://x", "migrate"])
    assert main(["migrate", "--db", url]) == 0  # options after the subcommand, too
    assert main(["register-model", str(tiny_model_dir), "--db", url]) == 0
    notimg = tmp_path / "notes.txt"
    notimg.write_text("not an image")
    assert "query image" in _one_line_error(capsys, ["search", "--image", str(notimg), "--db", url])
    assert "--image" in _one_line_error(capsys, ["search", "--image", str(tmp_path / "missing.png"), "--db", url])
    assert "no model with id 9" in _one_line_error(capsys, ["--db", url, "models", "remove", "9"])
    assert "label" in _one_line_error(capsys, ["search", "--like-frame", "0" * 32, "--label", "a b", "--db", url])
    assert "no unrevoked token named 'nobody'" in _one_line_error(capsys, ["--db", url, "token", "revoke", "nobody"])
    assert "NAME or --id" in _one_line_error(capsys, ["--db", url, "token", "revoke"])
    assert "no dead letter with id 99" in _one_line_error(capsys, ["--db", url, "dead-letters", "show", "99"])
    assert "not-a-model" in _one_line_error(capsys, ["--db", url, "register-model", str(tmp_path / "not-a-model")])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"database: {{url: '{url}'}}\n")
    # --config anywhere, even after a nested subcommand
    assert main(["models", "list", "--json", "--config", str(cfg)]) == 0
    # --debug: the same error with its traceback
    capsys.readouterr()
    assert main(["--db", url, "--debug", "models", "remove", "9"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_cli_models_list_and_remove(tmp_path, db_url, tiny_model_dir, tiny_manifest, capsys):
    from tests.support.tiny_model import build_tiny_model

    url = db_url
    assert main(["--db", url, "migrate"]) == 0
    other = build_tiny_model(tmp_path / "m2", size=32, patch=8, dim=384, seed=7, name=tiny_manifest.name)
    assert main(["--db", url, "register-model", str(tiny_model_dir)]) == 0
    assert main(["--db", url, "register-model", str(other)]) == 0
    engine = make_engine(url)
    rng = np.random.default_rng(0)
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(make_message(tiny_manifest, rng, seq=i), 1, 0) for i in range(5)])
    postgres = url.startswith("postgresql")
    if postgres:  # the frames' segment sealed and indexed: removing the model drops its HNSW index
        segments.seal(engine)
        assert segments.build_indexes(engine, SegmentsConfig(), kind="halfvec")
        assert _ann_indexes(engine, 1)
    capsys.readouterr()
    assert main(["--db", url, "models", "list", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)
    assert [(m["id"], m["name"], m["frames"]) for m in models] == [(1, tiny_manifest.name, 5), (2, tiny_manifest.name, 0)]
    assert models[0]["short_hash"] != models[1]["short_hash"]  # same name, told apart by hash and date
    assert main(["--db", url, "models", "list"]) == 0
    table = capsys.readouterr().out
    assert models[0]["short_hash"] in table and models[1]["short_hash"] in table and " UTC" in table
    line = _one_line_error(capsys, ["--db", url, "models", "remove", "1"])
    assert "has 5 frame(s)" in line and "--delete-frames" in line
    assert main(["--db", url, "models", "remove", "2"]) == 0
    assert main(["--db", url, "models", "remove", "1", "--delete-frames"]) == 0
    capsys.readouterr()
    assert main(["--db", url, "models", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert tx(engine, store.counter_total, store.FRAMES_DELETED) == 5  # search indexes drop the deleted frames
    if postgres:
        assert _ann_indexes(engine, 1) == []


def _ann_indexes(engine, model_id: int) -> list:
    """Names of the per-segment HNSW indexes of ``model_id`` on PostgreSQL."""
    from sqlalchemy import text

    with engine.connect() as c:
        return c.execute(text("SELECT indexname FROM pg_indexes WHERE indexname LIKE :p"),
                         {"p": f"ix_frames_s%_ann_m{model_id}"}).scalars().all()


def test_cli_is_quiet_by_default(tmp_path):
    """A real process: no alembic INFO chatter, only the human summary on stderr; -v brings the log records."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'c.db'}"
    quiet = subprocess.run([sys.executable, "-m", "central.cli", "migrate", "--db", url], capture_output=True,
                           text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stdout == ""
    assert quiet.stderr.strip().splitlines() == [quiet.stderr.strip()] and "schema at revision" in quiet.stderr
    loud = subprocess.run([sys.executable, "-m", "central.cli", "migrate", "-v", "--db", url], capture_output=True,
                          text=True, timeout=120)
    assert loud.returncode == 0 and "alembic" in loud.stderr
