"""Operating central: bearer tokens listed and revoked (CLI and admin API), dead letters kept within their age and
size cap by the sweeper (oldest first), and replayed through the ingest's validation after a fix."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from central import store
from central.api import create_app
from central.cli import main
from central.config import IngestConfig, RetentionConfig
from central.dead_letters import replay
from central.ingest import Incoming, Ingestor
from central.retention import sweep_dead_letters
from sql.db import make_engine
from sql.models import DeadLetter, Frame
from tests.central.conftest import config_for, make_message, tx
from tokenline import topics
from tokenline.wire import encode


def test_tokens_listed_and_revoked_from_the_cli(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert main(["--db", url, "migrate"]) == 0
    assert main(["--db", url, "token", "create", "line3-edge", "--role", "device"]) == 0
    leaked = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["--db", url, "create-token", "qa", "--role", "viewer"]) == 0  # the older spelling still works
    capsys.readouterr()
    assert main(["--db", url, "token", "list", "--json"]) == 0
    tokens = json.loads(capsys.readouterr().out)
    assert [(t["id"], t["name"], t["role"], t["revoked_us"]) for t in tokens] == \
        [(1, "line3-edge", "device", None), (2, "qa", "viewer", None)]
    assert all(leaked[:6] not in json.dumps(t) for t in tokens)  # never the secret
    engine = make_engine(url)
    assert tx(engine, store.lookup_token, leaked) == ("line3-edge", "device")
    assert main(["--db", url, "token", "revoke", "line3-edge"]) == 0
    assert tx(engine, store.lookup_token, leaked) is None
    assert main(["--db", url, "token", "revoke", "line3-edge"]) == 2  # nothing left to revoke: said so
    assert "no unrevoked token named 'line3-edge'" in capsys.readouterr().err
    assert main(["--db", url, "token", "revoke", "--id", "2"]) == 0
    assert main(["--db", url, "token", "revoke"]) == 2
    assert main(["--db", url, "token", "list"]) == 0
    assert "line3-edge" in capsys.readouterr().out


def test_admin_api_lists_and_revokes_tokens_at_once(engine, db_url, tmp_path):
    client = TestClient(create_app(config_for(tmp_path, db_url), engine))
    admin = {"Authorization": "Bearer " + tx(engine, store.create_token, "root", "admin")}
    viewer_tok = tx(engine, store.create_token, "leaky", "viewer")
    viewer = {"Authorization": "Bearer " + viewer_tok}
    assert client.get("/v1/models", headers=viewer).status_code == 200  # cached as valid now
    assert client.get("/v1/tokens", headers=viewer).status_code == 403
    listed = client.get("/v1/tokens", headers=admin).json()["tokens"]
    tid = next(t["id"] for t in listed if t["name"] == "leaky")
    r = client.delete(f"/v1/tokens/{tid}", headers=admin)
    assert r.status_code == 200 and r.json()["revoked_us"] is not None
    assert client.get("/v1/models", headers=viewer).status_code == 401  # at once: the cache was cleared
    assert client.delete(f"/v1/tokens/{tid}", headers=admin).json()["revoked_us"] == r.json()["revoked_us"]
    assert client.delete("/v1/tokens/999", headers=admin).status_code == 404


def test_dead_letters_are_kept_within_age_and_size_oldest_first(engine):
    now = store.now_us()
    day = 86_400_000_000
    rows = [store.dead_letter_row("t/x", bytes([i]) * 1000, "bad_crc", "d", 400) for i in range(10)]
    for i, r in enumerate(rows):
        r["received_us"] = now - (10 - i) * day  # the first ones are the oldest
    with Session(engine) as s, s.begin():
        store.insert_dead_letters(s, rows)
    assert all(len(r["payload"]) == 400 for r in rows)  # garbage: only the head is kept
    cfg = RetentionConfig(dead_letters_days=8.5, dead_letters_max_bytes=10_000)
    assert sweep_dead_letters(engine, cfg, now) == 2  # 10 and 9 days old
    size = 400 + len("d") + len("t/x")
    cfg = RetentionConfig(dead_letters_days=30, dead_letters_max_bytes=3 * size)
    assert sweep_dead_letters(engine, cfg, now) == 5
    with Session(engine) as s:
        left = list(s.scalars(select(DeadLetter.received_us).order_by(DeadLetter.id)))
        deleted = store.counter_total(s, "dead_letters_deleted")
    assert left == [now - 3 * day, now - 2 * day, now - 1 * day] and deleted == 7


def test_replay_after_registering_the_model(engine, tiny_manifest, tiny_model_dir, db_url, tmp_path, capsys):
    rng = np.random.default_rng(0)
    msgs = [make_message(tiny_manifest, rng, seq=i) for i in range(5)]
    msgs[4] = replace(msgs[4], token_dtype="fp16")
    cfg = IngestConfig(allowed_token_dtypes=["int8"])
    ing = Ingestor(engine, cfg, "w1")
    items = [Incoming(i, 1, topics.tokens_topic(m.site, m.device, m.line, m.camera), encode(m))
             for i, m in enumerate(msgs)]
    items.append(Incoming(9, 1, topics.tokens_topic("s1", "d1", "l1", "c1"), b"\x00garbage" * 8000))
    res = ing.process(items)  # no model registered yet
    assert res.dead == 6 and res.reasons == {"unknown_model": 5, "bad_magic": 1}
    with Session(engine) as s:
        kept = {d["reason"]: d for d in store.list_dead_letters(s)}
    assert kept["unknown_model"]["replayable"] and not kept["bad_magic"]["replayable"]
    tx(engine, store.register_model, tiny_manifest, tiny_model_dir)  # the fix
    rep = replay(engine, cfg)
    assert (rep.committed, rep.duplicates, rep.not_replayable, rep.still_failing) == \
        (4, 0, 1, {"dtype_not_allowed": 1})
    with Session(engine) as s:
        reasons = sorted(d.reason for d in s.scalars(select(DeadLetter)))
        stored = s.scalar(select(func.count()).select_from(Frame))
    assert reasons == ["bad_magic", "dtype_not_allowed"] and stored == 4  # one dead letter per failing message
    # after allowing fp16, the CLI replays the last one (the same validation, the configured dtypes)
    (tmp_path / "c.yaml").write_text(json.dumps({"database": {"url": db_url}}))
    assert main(["--config", str(tmp_path / "c.yaml"), "dead-letters", "replay", "--reason", "dtype_not_allowed"]) == 0
    assert "committed 1" in capsys.readouterr().out
    assert main(["--config", str(tmp_path / "c.yaml"), "dead-letters", "list"]) == 0
    out = capsys.readouterr().out
    assert "bad_magic" in out and "dtype_not_allowed" not in out
    did = tx(engine, lambda s: s.scalar(select(DeadLetter.id)))
    assert main(["--config", str(tmp_path / "c.yaml"), "dead-letters", "show", str(did)]) == 0
    assert "first 1024 kept" in capsys.readouterr().out
