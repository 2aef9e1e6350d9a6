"""Durable outbox: every message is committed to SQLite before it is published and kept until it is delivered.

Delivered means confirmed by central (protocol v2: a commit acknowledgement names the frame id) or, with
protocol 1 (``mqtt.protocol: 1``, for a central that predates v2), PUBACKed by the broker. Under v2 a PUBACKed row
stays as *awaiting confirmation* (``due_us`` set: the time it is sent again unless confirmed); ``requeue_due``
hands overdue rows back to the publisher. Durability settings (see docs/edge.md): ``journal_mode=WAL`` and
``synchronous=FULL`` by default - a committed message survives ``kill -9`` and power loss (with ``NORMAL`` it
survives a process crash but the last commits may be lost on power loss). Rows are sent in insertion order
(``id``). The outbox is bounded by payload bytes and by message count; beyond either, the oldest rows (sent or
not) are evicted and counted (``evicted``, persisted). Per-camera sequence numbers live in the same database and
advance in the same transaction as the insert.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar

from tokenline.acks import DUPLICATE, Ack
from tokenline.wire import peek_frame_id

T = TypeVar("T")
log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    camera TEXT NOT NULL,
    seq INTEGER NOT NULL,
    created_us INTEGER NOT NULL,
    frame_id BLOB,
    due_us INTEGER,
    sends INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS seqs (camera TEXT PRIMARY KEY, next_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL, camera TEXT NOT NULL,
    seq INTEGER NOT NULL, reason TEXT NOT NULL, rejected_us INTEGER NOT NULL
);
"""
# Columns an outbox written by an agent of protocol v1 lacks (added, and frame ids filled in, at open).
ADDED_COLUMNS = (("frame_id", "BLOB"), ("due_us", "INTEGER"), ("sends", "INTEGER NOT NULL DEFAULT 0"))
INDEXES = """
CREATE INDEX IF NOT EXISTS outbox_frame_id ON outbox(frame_id);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(due_us);
"""


@dataclass(frozen=True)
class Row:
    id: int
    topic: str
    payload: bytes
    camera: str
    seq: int
    sends: int = 0  # how often it was PUBACKed before (> 0: a resend after a missing confirmation)


def _chunks(values: Sequence[T], size: int = 500) -> List[List[T]]:
    """Parameter lists short enough for any SQLite (older builds allow 999 host parameters per statement)."""
    return [list(values[i:i + size]) for i in range(0, len(values), size)]


def _marks(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))


class Outbox:
    """Thread-safe SQLite outbox (one connection, one lock)."""

    def __init__(self, path: Path, max_bytes: int, max_messages: int, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._db.executescript(INDEXES)
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), COALESCE(MAX(id), 0) "
                               "FROM outbox").fetchone()
        self.count, self.bytes = int(row[0]), int(row[1])
        self.startup_max_id = int(row[2])  # rows up to here predate this process: replayed (historical)
        self.evicted = self._meta("evicted")
        self.acked = 0  # PUBACKed by the broker
        self.confirmed = 0  # confirmed by central (committed now, or a duplicate of a committed frame)
        self.duplicates = 0  # of those, the ones central already had
        self.resent = 0  # handed back to the publisher because no confirmation came in time
        self.inserted = 0
        self.rejected = 0
        self.rejected_by_central = 0

    def _migrate(self) -> None:
        """Add the protocol v2 columns to an outbox written before them; frame ids come from the payloads."""
        have = {r[1] for r in self._db.execute("PRAGMA table_info(outbox)")}
        missing = [(n, t) for n, t in ADDED_COLUMNS if n not in have]
        if not missing:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for name, decl in missing:
                self._db.execute(f"ALTER TABLE outbox ADD COLUMN {name} {decl}")
            rows = self._db.execute("SELECT id, payload FROM outbox WHERE frame_id IS NULL").fetchall()
            self._db.executemany("UPDATE outbox SET frame_id=? WHERE id=?",
                                 [(peek_frame_id(bytes(p)), i) for i, p in rows])
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        log.info("outbox %s: added %s for protocol v2 (%d row(s) kept)", self.path, [n for n, _ in missing], len(rows))

    def _meta(self, key: str) -> int:
        r = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(r[0]) if r else 0

    def put_many(self, items: Sequence[Tuple[str, str, Callable[[int], bytes]]]) -> List[Tuple[int, int]]:
        """Insert messages in one transaction; returns [(row id, seq)].

        Each item is (camera, topic, build) where ``build(seq)`` returns the payload for the camera's next
        sequence number (so the number is assigned and persisted atomically with the message).
        """
        def insert(db: sqlite3.Connection) -> List[Tuple[int, int]]:
            out: List[Tuple[int, int]] = []
            added = 0
            for camera, topic, build in items:
                r = db.execute("SELECT next_seq FROM seqs WHERE camera=?", (camera,)).fetchone()
                seq = int(r[0]) if r else 0
                payload = build(seq)
                cur = db.execute("INSERT INTO outbox(topic, payload, camera, seq, created_us, frame_id) "
                                 "VALUES (?,?,?,?,?,?)", (topic, sqlite3.Binary(payload), camera, seq,
                                                          time.time_ns() // 1000, peek_frame_id(payload)))
                db.execute("INSERT INTO seqs(camera, next_seq) VALUES (?, ?) ON CONFLICT(camera) "
                           "DO UPDATE SET next_seq=excluded.next_seq", (camera, (seq + 1) % (1 << 32)))
                out.append((int(cur.lastrowid), seq))
                added += len(payload)
            self.count += len(items)
            self.bytes += added
            self._evict_locked()
            return out

        out = self._write(insert)
        self.inserted += len(items)
        return out

    def _evict_locked(self) -> None:
        """Delete oldest rows until within both caps (inside the caller's transaction)."""
        if self.count <= self.max_messages and self.bytes <= self.max_bytes:
            return
        n_del, b_del = 0, 0
        cur = self._db.execute("SELECT id, LENGTH(payload) FROM outbox ORDER BY id")
        ids = []
        for rid, ln in cur:
            if self.count - n_del <= self.max_messages and self.bytes - b_del <= self.max_bytes:
                break
            ids.append(rid)
            n_del += 1
            b_del += int(ln)
        cur.close()
        self._db.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in ids])
        self.count -= n_del
        self.bytes -= b_del
        self.evicted += n_del
        self._db.execute("INSERT INTO meta(key, value) VALUES ('evicted', ?) ON CONFLICT(key) "
                         "DO UPDATE SET value=excluded.value", (self.evicted,))
        log.warning("outbox full: evicted %d oldest message(s) (%d bytes); %d evicted in total",
                    n_del, b_del, self.evicted)

    def after(self, last_id: int, limit: int) -> List[Row]:
        """Rows to send with id > last_id in order (the publisher's cursor); rows awaiting central's
        confirmation are not among them until ``requeue_due`` hands them back."""
        with self._lock:
            rows = self._db.execute("SELECT id, topic, payload, camera, seq, sends FROM outbox WHERE id > ? AND "
                                    "due_us IS NULL ORDER BY id LIMIT ?", (last_id, limit)).fetchall()
        return [Row(int(r[0]), r[1], bytes(r[2]), r[3], int(r[4]), int(r[5])) for r in rows]

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(db)`` in one immediate transaction, under the lock (the caller holds no lock). ``fn`` updates the
        in-memory gauges as it goes; a failed transaction reads them back from the database."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                    db.execute("ROLLBACK")
                self._recount()
                raise
            return out

    def _recount(self) -> None:
        try:
            r = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
            self.count, self.bytes = int(r[0]), int(r[1])
            self.evicted = self._meta("evicted")
        except sqlite3.Error:
            pass

    def _delete_locked(self, db: sqlite3.Connection, where: str, args: Sequence[object]) -> int:
        r = db.execute(f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox WHERE {where}", args).fetchone()
        db.execute(f"DELETE FROM outbox WHERE {where}", args)
        self.count -= int(r[0])
        self.bytes -= int(r[1])
        return int(r[0])

    def delete(self, ids: Iterable[int]) -> int:
        """Delete delivered rows (protocol 1: on PUBACK); ids already evicted are ignored."""
        ids = list(ids)
        if not ids:
            return 0
        n = self._write(lambda db: sum(self._delete_locked(db, f"id IN ({_marks(c)})", c) for c in _chunks(ids)))
        self.acked += n
        return n

    def mark_sent(self, ids: Iterable[int], timeout_s: float, max_timeout_s: float) -> int:
        """PUBACKed rows (protocol v2): keep them, awaiting confirmation, until ``timeout_s`` from now, doubled
        for each earlier send up to ``max_timeout_s``. Rows already confirmed or evicted are ignored."""
        ids = list(ids)
        if not ids:
            return 0
        now = time.time_ns() // 1000
        base, cap = int(timeout_s * 1e6), int(max_timeout_s * 1e6)
        n = self._write(lambda db: sum(db.execute(
            f"UPDATE outbox SET due_us = ? + MIN(?, ? * (1 << MIN(sends, 30))), sends = sends + 1 "
            f"WHERE id IN ({_marks(c)})", [now, cap, base, *c]).rowcount for c in _chunks(ids)))
        self.acked += n
        return n

    def confirm(self, acks: Sequence[Ack]) -> Tuple[int, int]:
        """Apply central's acknowledgements: confirmed frames leave the outbox, rejected ones move to
        ``rejected`` with central's reason. Frame ids the outbox does not hold (confirmed before, evicted, another
        agent's) are ignored. Returns (confirmed, rejected) rows."""
        done = [bytes(a.frame_id) for a in acks if a.confirmed]
        dups = {bytes(a.frame_id) for a in acks if a.status == DUPLICATE}
        refused = [(f"central: {a.reason}", bytes(a.frame_id)) for a in acks if not a.confirmed]
        if not done and not refused:
            return 0, 0

        def apply(db: sqlite3.Connection) -> Tuple[int, int, int]:
            n_dup = sum(int(db.execute(f"SELECT COUNT(*) FROM outbox WHERE frame_id IN ({_marks(c)})", c).fetchone()[0])
                        for c in _chunks(list(dups)))
            n_ok = sum(self._delete_locked(db, f"frame_id IN ({_marks(c)})", c) for c in _chunks(done))
            n_bad = 0
            for reason, fid in refused:
                n_bad += self._reject_locked(db, "frame_id = ?", (fid,), reason)
            return n_ok, n_dup, n_bad

        n_ok, n_dup, n_bad = self._write(apply)
        self.confirmed += n_ok
        self.duplicates += n_dup
        self.rejected_by_central += n_bad
        return n_ok, n_bad

    def requeue_due(self, now_us: Optional[int] = None) -> Optional[int]:
        """Hand rows whose confirmation is overdue back to the publisher (they are sent again, flagged
        replayed); returns the smallest such id (the publisher rewinds its cursor there) or None."""
        now = time.time_ns() // 1000 if now_us is None else now_us

        def requeue(db: sqlite3.Connection) -> Tuple[Optional[int], int]:
            first, n = db.execute("SELECT MIN(id), COUNT(*) FROM outbox WHERE due_us <= ?", (now,)).fetchone()
            if n:
                db.execute("UPDATE outbox SET due_us = NULL WHERE due_us <= ?", (now,))
            return first, int(n)

        with self._lock:  # cheap check first: most calls find nothing due
            r = self._db.execute("SELECT 1 FROM outbox WHERE due_us <= ? LIMIT 1", (now,)).fetchone()
        if r is None:
            return None
        first, n = self._write(requeue)
        self.resent += n
        return None if first is None else int(first)

    def awaiting(self) -> Tuple[int, float]:
        """(rows awaiting central's confirmation, age in seconds of the oldest of them, 0 when none)."""
        with self._lock:
            n = int(self._db.execute("SELECT COUNT(*) FROM outbox WHERE due_us IS NOT NULL").fetchone()[0])
            r = self._db.execute("SELECT created_us FROM outbox WHERE due_us IS NOT NULL ORDER BY id LIMIT 1").fetchone() \
                if n else None
        return n, (max(0.0, time.time() - int(r[0]) / 1e6) if r else 0.0)

    def oldest_age_s(self) -> float:
        """Age in seconds of the oldest row in the outbox (sent or not): how far delivery lags; 0 when empty."""
        with self._lock:
            r = self._db.execute("SELECT created_us FROM outbox ORDER BY id LIMIT 1").fetchone()
        return max(0.0, time.time() - int(r[0]) / 1e6) if r else 0.0

    def _reject_locked(self, db: sqlite3.Connection, where: str, args: Sequence[object], reason: str) -> int:
        db.execute(f"INSERT OR REPLACE INTO rejected SELECT id, topic, payload, camera, seq, ?, ? FROM outbox "
                   f"WHERE {where}", (reason, time.time_ns() // 1000, *args))
        n = self._delete_locked(db, where, args)
        self.rejected += n
        return n

    def reject(self, row_id: int, reason: str) -> None:
        """Move a row the broker refused (PUBACK reason code >= 0x80) to ``rejected``, kept for inspection."""
        self._write(lambda db: self._reject_locked(db, "id = ?", (row_id,), reason))

    def retopic(self, convert: Callable[[str], str]) -> int:
        """Move rows to the topic ``convert`` gives for their current one (a protocol upgrade); returns how many."""
        with self._lock:
            old = [r[0] for r in self._db.execute("SELECT DISTINCT topic FROM outbox")]
        moves = [(convert(t), t) for t in old]
        moves = [(new, t) for new, t in moves if new != t]
        if not moves:
            return 0
        return self._write(lambda db: sum(db.execute("UPDATE outbox SET topic=? WHERE topic=?", m).rowcount
                                          for m in moves))

    def max_id(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM outbox").fetchone()[0])

    def next_seqs(self) -> Dict[str, int]:
        with self._lock:
            return {r[0]: int(r[1]) for r in self._db.execute("SELECT camera, next_seq FROM seqs")}

    def stats(self) -> Dict[str, int]:
        waiting, oldest = self.awaiting()
        return {"pending": self.count, "bytes": self.bytes, "evicted": self.evicted, "inserted": self.inserted,
                "acked": self.acked, "confirmed": self.confirmed, "duplicates": self.duplicates,
                "awaiting_confirmation": waiting, "oldest_awaiting_s": round(oldest, 1),
                "oldest_pending_s": round(self.oldest_age_s(), 1), "resent": self.resent,
                "rejected": self.rejected, "rejected_by_central": self.rejected_by_central}

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                pass
            self._db.close()


def read_pending(path: Path) -> List[Row]:
    """Rows of an outbox file (read-only; for tests and `tokenline-edge` inspection)."""
    db = sqlite3.connect(str(path))
    try:
        return [Row(int(r[0]), r[1], bytes(r[2]), r[3], int(r[4]))
                for r in db.execute("SELECT id, topic, payload, camera, seq FROM outbox ORDER BY id")]
    finally:
        db.close()
