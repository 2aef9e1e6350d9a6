"""Durable outbox: every message is committed to SQLite before it is published and deleted after PUBACK.

Durability settings (see docs/edge.md): ``journal_mode=WAL`` and ``synchronous=FULL`` by default - a committed
message survives ``kill -9`` and power loss (with ``NORMAL`` it survives a process crash but the last commits
may be lost on power loss). Rows are replayed in insertion order (``id``). The outbox is bounded by payload
bytes and by message count; beyond either, the oldest rows are evicted and counted (``evicted``, persisted).
Per-camera sequence numbers live in the same database and advance in the same transaction as the insert.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    camera TEXT NOT NULL,
    seq INTEGER NOT NULL,
    created_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS seqs (camera TEXT PRIMARY KEY, next_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL, camera TEXT NOT NULL,
    seq INTEGER NOT NULL, reason TEXT NOT NULL, rejected_us INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Row:
    id: int
    topic: str
    payload: bytes
    camera: str
    seq: int


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
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), COALESCE(MAX(id), 0) "
                               "FROM outbox").fetchone()
        self.count, self.bytes = int(row[0]), int(row[1])
        self.startup_max_id = int(row[2])  # rows up to here predate this process: replayed (historical)
        self.evicted = self._meta("evicted")
        self.acked = 0
        self.inserted = 0
        self.rejected = 0

    def _meta(self, key: str) -> int:
        r = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(r[0]) if r else 0

    def put_many(self, items: Sequence[Tuple[str, str, Callable[[int], bytes]]]) -> List[Tuple[int, int]]:
        """Insert messages in one transaction; returns [(row id, seq)].

        Each item is (camera, topic, build) where ``build(seq)`` returns the payload for the camera's next
        sequence number (so the number is assigned and persisted atomically with the message).
        """
        out: List[Tuple[int, int]] = []
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                added = 0
                for camera, topic, build in items:
                    r = db.execute("SELECT next_seq FROM seqs WHERE camera=?", (camera,)).fetchone()
                    seq = int(r[0]) if r else 0
                    payload = build(seq)
                    cur = db.execute("INSERT INTO outbox(topic, payload, camera, seq, created_us) VALUES (?,?,?,?,?)",
                                     (topic, sqlite3.Binary(payload), camera, seq, time.time_ns() // 1000))
                    db.execute("INSERT INTO seqs(camera, next_seq) VALUES (?, ?) ON CONFLICT(camera) "
                               "DO UPDATE SET next_seq=excluded.next_seq", (camera, (seq + 1) % (1 << 32)))
                    out.append((int(cur.lastrowid), seq))
                    added += len(payload)
                evicted = self._evict_locked(self.count + len(items), self.bytes + added)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                    db.execute("ROLLBACK")
                raise
            self.count += len(items) - evicted[0]
            self.bytes += added - evicted[1]
            self.inserted += len(items)
        return out

    def _evict_locked(self, count: int, nbytes: int) -> Tuple[int, int]:
        """Delete oldest rows until within both caps (inside the caller's transaction)."""
        if count <= self.max_messages and nbytes <= self.max_bytes:
            return 0, 0
        n_del, b_del = 0, 0
        cur = self._db.execute("SELECT id, LENGTH(payload) FROM outbox ORDER BY id")
        ids = []
        for rid, ln in cur:
            if count - n_del <= self.max_messages and nbytes - b_del <= self.max_bytes:
                break
            ids.append(rid)
            n_del += 1
            b_del += int(ln)
        cur.close()
        self._db.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in ids])
        self.evicted += n_del
        self._db.execute("INSERT INTO meta(key, value) VALUES ('evicted', ?) ON CONFLICT(key) "
                         "DO UPDATE SET value=excluded.value", (self.evicted,))
        log.warning("outbox full: evicted %d oldest message(s) (%d bytes); %d evicted in total",
                    n_del, b_del, self.evicted)
        return n_del, b_del

    def after(self, last_id: int, limit: int) -> List[Row]:
        """Rows with id > last_id in order (the publisher's cursor)."""
        with self._lock:
            rows = self._db.execute("SELECT id, topic, payload, camera, seq FROM outbox WHERE id > ? ORDER BY id "
                                    "LIMIT ?", (last_id, limit)).fetchall()
        return [Row(int(r[0]), r[1], bytes(r[2]), r[3], int(r[4])) for r in rows]

    def delete(self, ids: Iterable[int]) -> int:
        """Delete acknowledged rows (ids already evicted are ignored)."""
        ids = list(ids)
        if not ids:
            return 0
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                q = ",".join("?" * len(ids))
                r = db.execute(f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox WHERE id IN ({q})",
                               ids).fetchone()
                db.execute(f"DELETE FROM outbox WHERE id IN ({q})", ids)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                    db.execute("ROLLBACK")
                raise
            self.count -= int(r[0])
            self.bytes -= int(r[1])
            self.acked += int(r[0])
        return int(r[0])

    def reject(self, row_id: int, reason: str) -> None:
        """Move a row the broker refused (PUBACK reason code >= 0x80) to ``rejected``, kept for inspection."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                r = db.execute("SELECT LENGTH(payload) FROM outbox WHERE id=?", (row_id,)).fetchone()
                db.execute("INSERT OR REPLACE INTO rejected SELECT id, topic, payload, camera, seq, ?, ? FROM outbox "
                           "WHERE id=?", (reason, time.time_ns() // 1000, row_id))
                db.execute("DELETE FROM outbox WHERE id=?", (row_id,))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                    db.execute("ROLLBACK")
                raise
            if r:
                self.count -= 1
                self.bytes -= int(r[0])
                self.rejected += 1

    def max_id(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM outbox").fetchone()[0])

    def next_seqs(self) -> Dict[str, int]:
        with self._lock:
            return {r[0]: int(r[1]) for r in self._db.execute("SELECT camera, next_seq FROM seqs")}

    def stats(self) -> Dict[str, int]:
        return {"pending": self.count, "bytes": self.bytes, "evicted": self.evicted, "inserted": self.inserted,
                "acked": self.acked, "rejected": self.rejected}

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
