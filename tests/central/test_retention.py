"""Originals and retention on SQLite and PostgreSQL: the upload contract's store side, age, size cap,
per-line overrides, legal hold, shared blobs, token retention, and crash consistency (incl. SIGKILL)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from central import store
from central.api.errors import http_status
from central.blobs import BlobStore
from central.config import parse_config
from central.errors import CentralError
from central.originals import DAY_US, read_original, store_original
from central.retention import sweep
from sql.models import Frame, Original
from tests.central.conftest import make_message, tx

ROOT = Path(__file__).resolve().parents[2]


def jpeg(seed: int, size: int = 24) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    return buf.tobytes()


def put(engine, blobs, ret, fid: str, body: bytes, max_bytes: int = 1 << 20):
    with Session(engine) as s:
        return store_original(s, blobs, ret, fid, body, hashlib.sha256(body).hexdigest(), max_bytes)


def ret_cfg(**kw):
    return parse_config({"retention": kw}).retention


def fid(i: int) -> str:
    return f"{i:032x}"


def set_stored(engine, frame_id: str, stored_us: int) -> None:
    with Session(engine) as s, s.begin():
        o = s.get(Original, frame_id)
        o.stored_us = stored_us
        o.expires_us = stored_us  # recomputed by the sweeper from the policy


def test_upload_contract(engine, tmp_path):
    blobs, ret = BlobStore(tmp_path / "o"), ret_cfg()
    body = jpeg(1)
    r = put(engine, blobs, ret, fid(1), body)
    assert r.created and tx(engine, read_original, blobs, fid(1)) == body
    assert not put(engine, blobs, ret, fid(1), body).created  # idempotent retry
    cases = [("G" * 32, body, None, 400), (fid(2), b"not a jpeg at all", None, 400),
             (fid(1), jpeg(2), None, 409), (fid(3), body, "0" * 64, 422), (fid(4), body + b"\0" * 100, None, 413)]
    for frame_id, data, sha, status in cases:
        with Session(engine) as s, pytest.raises(CentralError) as ei:
            store_original(s, blobs, ret, frame_id, data, sha or hashlib.sha256(data).hexdigest(), len(body) + 50)
        assert http_status(ei.value) == status, (frame_id, status, ei.value.detail)
    with pytest.raises(CentralError) as ei:
        tx(engine, read_original, blobs, fid(9))
    assert http_status(ei.value) == 404
    # content addressing: same bytes for two frames share one blob
    assert put(engine, blobs, ret, fid(5), body).created
    assert len(list(blobs.iter_blobs())) == 1


def test_age_overrides_hold_and_410(engine, tmp_path, tiny_manifest):
    blobs = BlobStore(tmp_path / "o")
    ret = ret_cfg(originals_days=10, tokens_days=100,
                  lines=[{"site": "s1", "line": "fast", "originals_days": 1, "tokens_days": 2}])
    model = tx(engine, store.register_model, tiny_manifest)
    rng = np.random.default_rng(0)
    now = store.now_us()
    msgs = {name: make_message(tiny_manifest, rng, line=line, ts_us=now - age * DAY_US)
            for name, line, age in [("old_default", "l1", 11), ("young_default", "l1", 5),
                                    ("old_fast", "fast", 1.5), ("young_fast", "fast", 0.5), ("held", "l1", 20),
                                    ("ancient", "l1", 150), ("ancient_fast", "fast", 3)]}
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, model.id, now) for m in msgs.values()])
    for i, (name, m) in enumerate(msgs.items()):
        if name.startswith("ancient"):
            continue
        f = m.frame_id.hex()
        with pytest.raises(CentralError) if name in ("old_default", "old_fast", "held") else _nullctx():
            put(engine, blobs, ret, f, jpeg(i))  # already too old to keep -> 410 at upload
        if name in ("old_default", "old_fast", "held"):
            # stored earlier, when it was young
            put(engine, blobs, ret_cfg(originals_days=1000, tokens_days=1000), f, jpeg(i))
        set_stored(engine, f, m.capture_ts_us)
    assert tx(engine, store.set_legal_hold, msgs["held"].frame_id.hex(), True)

    rep = sweep(engine, blobs, ret, now=now)
    assert rep.expired == 2 and rep.tokens_deleted == 2
    state = {n: _state(engine, m.frame_id.hex()) for n, m in msgs.items()}
    assert state == {"old_default": "deleted", "young_default": "kept", "old_fast": "deleted", "young_fast": "kept",
                     "held": "kept", "ancient": None, "ancient_fast": None}
    for n in ("old_default", "old_fast"):
        with pytest.raises(CentralError) as ei:
            tx(engine, read_original, blobs, msgs[n].frame_id.hex())
        assert http_status(ei.value) == 410
        with pytest.raises(CentralError) as ei:  # a retried upload of a deleted original is 410 too
            put(engine, blobs, ret, msgs[n].frame_id.hex(), jpeg(99))
        assert http_status(ei.value) == 410
    assert tx(engine, read_original, blobs, msgs["held"].frame_id.hex())
    with Session(engine) as s:
        left = set(s.scalars(select(Frame.frame_id)))
    assert msgs["ancient"].frame_id.hex() not in left and msgs["ancient_fast"].frame_id.hex() not in left
    assert msgs["held"].frame_id.hex() in left
    # releasing the hold lets the next sweep delete it
    tx(engine, store.set_legal_hold, msgs["held"].frame_id.hex(), False)
    assert sweep(engine, blobs, ret, now=now).expired == 1
    assert _blob_set(blobs) == _live_shas(engine)


def test_size_cap_oldest_first_skips_holds_and_shared_blobs(engine, tmp_path):
    blobs = BlobStore(tmp_path / "o")
    ret = ret_cfg(originals_days=1000, tokens_days=1000)
    bodies = [jpeg(i, size=32) for i in range(8)]
    now = store.now_us()
    for i, b in enumerate(bodies):
        put(engine, blobs, ret, fid(i), b)
        set_stored(engine, fid(i), now - 1_000_000 * (60 - i))
    put(engine, blobs, ret, fid(100), bodies[1])  # newest, shares blob of frame 1
    set_stored(engine, fid(100), now - 1_000_000)
    tx(engine, store.set_legal_hold, fid(0), True)  # oldest but held (no frame row: hold set on the original)
    sizes = [len(b) for b in bodies]
    total = sum(sizes) + sizes[1]
    cap = total - sizes[1] - sizes[2] - sizes[3] + 1  # needs frames 1..3 gone (0 is held)
    rep = sweep(engine, blobs, ret_cfg(originals_days=1000, tokens_days=1000, originals_max_bytes=cap))
    assert rep.capped == 3 and rep.kept_bytes <= cap
    assert [_state(engine, fid(i)) for i in range(8)] == ["kept", "deleted", "deleted", "deleted"] + ["kept"] * 4
    assert tx(engine, read_original, blobs, fid(100)) == bodies[1]  # shared blob survived its twin's deletion
    assert _blob_set(blobs) == _live_shas(engine)


def test_crash_states_are_finished_by_next_sweep(engine, tmp_path):
    """The durable states a crash can leave: 'deleting' rows (blob still there), and orphan blobs/temporaries."""
    blobs = BlobStore(tmp_path / "o")
    ret = ret_cfg(originals_days=1000, tokens_days=1000, orphan_grace_s=0)
    for i in range(3):
        put(engine, blobs, ret, fid(i), jpeg(i))
    with Session(engine) as s, s.begin():  # crash after step 1 of a deletion
        s.get(Original, fid(0)).state = "deleting"
    with pytest.raises(CentralError) as ei:
        tx(engine, read_original, blobs, fid(0))
    assert http_status(ei.value) == 410
    orphan_key, _ = blobs.put(jpeg(50))  # crash between blob write and row commit of an upload
    (blobs.tmp / "dead.123.part").write_bytes(b"partial")  # crash during the write itself
    old = time.time() - 10
    os.utime(blobs.path(orphan_key), (old, old))
    os.utime(blobs.tmp / "dead.123.part", (old, old))
    rep = sweep(engine, blobs, ret)
    assert rep.resumed == 1 and rep.orphans_removed == 2
    assert _state(engine, fid(0)) == "deleted"
    assert _blob_set(blobs) == _live_shas(engine) and len(_blob_set(blobs)) == 2


def test_sigkill_mid_sweep_keeps_blobs_and_rows_consistent(tmp_path, tiny_manifest):
    """A real sweeper process is SIGKILLed at several points; after a final sweep nothing is inconsistent."""
    from sql.db import make_engine
    from sql.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'c.db'}"
    engine = make_engine(url)
    upgrade(engine)
    blobs = BlobStore(tmp_path / "o")
    n = 400
    now = store.now_us()
    with Session(engine) as s, s.begin():
        for i in range(n):
            key, sha = blobs.put(jpeg(i, size=8))
            s.add(Original(frame_id=fid(i), sha256=sha, location=key, bytes=10, stored_us=now - i,
                           expires_us=now, legal_hold=False, state="kept"))
    cfg = tmp_path / "central.yaml"
    cfg.write_text(f"database: {{url: '{url}'}}\noriginals: {{root: '{tmp_path / 'o'}'}}\n"
                   "retention: {originals_days: 0, tokens_days: 0, batch: 5, orphan_grace_s: 0}\n")
    kills = 0
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-m", "central.cli", "--config", str(cfg), "--log-level", "DEBUG",
                              "sweep"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in p.stderr:  # kill as soon as it is provably mid-sweep
            if "tombstoned" in line:
                p.send_signal(signal.SIGKILL)
                kills += 1
                break
        p.wait()
        with Session(engine) as s:  # invariant at every crash point: a kept row has its blob
            kept = s.execute(select(Original.location).where(Original.state == "kept")).scalars().all()
        assert all(blobs.exists(k) for k in kept)
        assert 0 < len(kept) < n
    assert kills == 3
    rep = sweep(engine, blobs, parse_config({"retention": {"originals_days": 0, "tokens_days": 0,
                                                           "orphan_grace_s": 0}}).retention)
    with Session(engine) as s:
        states = dict(s.execute(select(Original.state, func.count()).group_by(Original.state)).all())
    assert states == {"deleted": n}, (states, rep)
    assert _blob_set(blobs) == set()


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _state(engine, frame_id: str):
    with Session(engine) as s:
        o = s.get(Original, frame_id)
        return None if o is None else o.state


def _blob_set(blobs: BlobStore) -> set:
    return {k.rsplit("/", 1)[1] for k, _ in blobs.iter_blobs()}


def _live_shas(engine) -> set:
    with Session(engine) as s:
        return set(s.scalars(select(Original.sha256).where(Original.state == "kept")))
