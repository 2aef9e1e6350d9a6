"""Outbox: order, per-camera seq, persistence across reopen, eviction by count and bytes, rejected rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edge_agent.outbox import Outbox, read_pending


def _put(ob: Outbox, cam: str, n: int, size: int = 100) -> None:
    ob.put_many([(cam, f"t/{cam}", lambda seq: seq.to_bytes(4, "little") + b"x" * (size - 4)) for _ in range(n)])


def test_outbox_order_seq_persistence_and_eviction(tmp_path: Path) -> None:
    p = tmp_path / "ob.sqlite"
    ob = Outbox(p, max_bytes=10_000, max_messages=5)
    _put(ob, "a", 3)
    _put(ob, "b", 1)
    rows = ob.after(0, 100)
    assert [(r.camera, r.seq) for r in rows] == [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
    assert rows[1].payload[:4] == (1).to_bytes(4, "little")
    _put(ob, "a", 4)  # 8 rows > 5: the 3 oldest go
    assert ob.count == 5 and ob.evicted == 3
    assert [(r.camera, r.seq) for r in ob.after(0, 100)] == [("b", 0), ("a", 3), ("a", 4), ("a", 5), ("a", 6)]
    assert ob.delete([r.id for r in ob.after(0, 2)]) == 2 and ob.count == 3 and ob.bytes == 300
    ob.reject(ob.after(0, 1)[0].id, "Not authorized")
    assert ob.count == 2
    ob.close()
    ob2 = Outbox(p, max_bytes=250, max_messages=100)  # reopened: counters and seqs survive, byte cap applies
    assert ob2.count == 2 and ob2.evicted == 3 and ob2.next_seqs() == {"a": 7, "b": 1}
    assert ob2.startup_max_id == max(r.id for r in ob2.after(0, 10))
    _put(ob2, "a", 1)
    assert ob2.count == 2 and ob2.bytes == 200 and ob2.evicted == 4
    assert [r.seq for r in read_pending(p)] == [6, 7]
    db = sqlite3.connect(str(p))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT reason FROM rejected").fetchone()[0] == "Not authorized"


def _token_payload(seq: int) -> bytes:
    """The head of a token message (what the outbox reads its frame id from) and a body."""
    from tokenline.frame_id import new_frame_id

    return b"TKLN" + bytes(8) + new_frame_id() + seq.to_bytes(4, "little") + b"x" * 60


def test_rows_wait_for_central_then_leave_resend_or_move_to_rejected(tmp_path: Path) -> None:
    from tokenline.acks import COMMITTED, DUPLICATE, REJECTED, Ack

    ob = Outbox(tmp_path / "ob.sqlite", max_bytes=1 << 20, max_messages=100)
    ob.put_many([("a", "t/a", _token_payload) for _ in range(4)])
    rows = ob.after(0, 10)
    fids = [r.payload[12:28] for r in rows]
    assert ob.mark_sent([r.id for r in rows], timeout_s=30, max_timeout_s=600) == 4
    assert ob.after(0, 10) == [] and ob.count == 4  # PUBACKed: kept, awaiting central, not sent again yet
    n, age = ob.awaiting()
    assert n == 4 and 0 <= age < 5 and ob.stats()["awaiting_confirmation"] == 4
    ok, bad = ob.confirm([Ack(fids[0], COMMITTED), Ack(fids[1], DUPLICATE), Ack(fids[2], REJECTED, "unknown_model"),
                          Ack(b"\x07" * 16, COMMITTED)])  # an id this outbox does not hold is ignored
    assert (ok, bad) == (2, 1) and ob.count == 1 and ob.confirmed == 2 and ob.duplicates == 1
    assert ob.rejected == 1 and ob.rejected_by_central == 1
    assert ob.requeue_due() is None  # not overdue yet
    now_us = 10**18  # far in the future: everything awaiting is overdue
    assert ob.requeue_due(now_us) == rows[3].id and ob.resent == 1
    again = ob.after(0, 10)
    assert [r.id for r in again] == [rows[3].id] and again[0].sends == 1  # sent before: goes out flagged replayed
    ob.mark_sent([rows[3].id], timeout_s=30, max_timeout_s=45)  # the second wait is doubled, capped at 45 s
    ob.close()
    db = sqlite3.connect(str(tmp_path / "ob.sqlite"))
    (due, created), = db.execute("SELECT due_us, created_us FROM outbox").fetchall()
    assert 44e6 < due - created < 50e6
    assert db.execute("SELECT reason FROM rejected").fetchall() == [("central: unknown_model",)]


def test_an_outbox_written_by_a_protocol_1_agent_is_upgraded_in_place(tmp_path: Path) -> None:
    p = tmp_path / "old.sqlite"
    old = sqlite3.connect(str(p))
    old.executescript("""
        CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
                             camera TEXT NOT NULL, seq INTEGER NOT NULL, created_us INTEGER NOT NULL);
        CREATE TABLE seqs (camera TEXT PRIMARY KEY, next_seq INTEGER NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);""")
    payloads = [_token_payload(i) for i in range(3)]
    old.executemany("INSERT INTO outbox(topic, payload, camera, seq, created_us) VALUES (?, ?, 'a', ?, 1)",
                    [("tokenline/v1/s/l/a/tokens", pl, i) for i, pl in enumerate(payloads)])
    old.execute("INSERT INTO seqs VALUES ('a', 3)")
    old.commit()
    old.close()
    ob = Outbox(p, max_bytes=1 << 20, max_messages=100)
    assert ob.count == 3 and ob.next_seqs() == {"a": 3} and [r.seq for r in ob.after(0, 10)] == [0, 1, 2]
    from tokenline.acks import COMMITTED, Ack

    assert ob.confirm([Ack(pl[12:28], COMMITTED) for pl in payloads[:2]]) == (2, 0)  # frame ids were filled in
    assert [r.seq for r in ob.after(0, 10)] == [2]
    from tokenline import topics

    assert ob.retopic(lambda t: topics.relayout(t, "dev", 2)) == 1  # what is left goes out on the v2 topics
    assert [r.topic for r in ob.after(0, 10)] == ["tokenline/v2/s/dev/tokens/l/a"]
    ob.close()
