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
