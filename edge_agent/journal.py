"""File journal: which source files (folder images, video files) were read and committed, kept across restarts.

A small SQLite database next to the outbox (``<outbox stem>.files.sqlite``). A folder image is recorded as
``reading`` with the frame id and capture time it was given *before* its frame enters the pipeline, and
becomes ``done`` once that frame is committed to the outbox (``skipped`` when sampling passed it over). After a
crash a ``reading`` file is read again under the same frame id, so central, which keeps one row per frame id,
stores it once whichever copy arrives; a ``done`` file is never read again. Rows of files that left the folder
are forgotten at the next scan, so the journal holds at most one row per file in the watched folders. A video
file keeps its identity, a seed for its frames' ids and how far its frames are committed.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    camera TEXT NOT NULL, name TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    state TEXT NOT NULL, frame_id BLOB NOT NULL, capture_us INTEGER NOT NULL, updated_us INTEGER NOT NULL,
    PRIMARY KEY (camera, name)
);
CREATE TABLE IF NOT EXISTS videos (
    camera TEXT PRIMARY KEY, path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    seed BLOB NOT NULL, started_us INTEGER NOT NULL, next_index INTEGER NOT NULL, done INTEGER NOT NULL
);
"""

READING, DONE, SKIPPED = "reading", "done", "skipped"


def journal_path(outbox_path: Path) -> Path:
    """Where the journal of an agent whose outbox is ``outbox_path`` lives (same folder, same stem)."""
    p = Path(outbox_path)
    return p.with_name(p.stem + ".files.sqlite")


@dataclass(frozen=True)
class FileEntry:
    size: int
    mtime_ns: int
    state: str
    frame_id: bytes
    capture_us: int

    def same_file(self, size: int, mtime_ns: int) -> bool:
        return (self.size, self.mtime_ns) == (size, mtime_ns)


@dataclass(frozen=True)
class VideoEntry:
    path: str
    size: int
    mtime_ns: int
    seed: bytes
    started_us: int
    next_index: int
    done: bool


class FileJournal:
    """Thread-safe (one connection, one lock); ``path`` ``:memory:`` keeps it in memory (tests, no outbox)."""

    def __init__(self, path: Path | str, synchronous: str = "FULL") -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
        self._db.executescript(SCHEMA)

    # -- folder images ----------------------------------------------------------------------------------------
    def files(self, camera: str) -> Dict[str, FileEntry]:
        with self._lock:
            rows = self._db.execute("SELECT name, size, mtime_ns, state, frame_id, capture_us FROM files "
                                    "WHERE camera=?", (camera,)).fetchall()
        return {r[0]: FileEntry(int(r[1]), int(r[2]), r[3], bytes(r[4]), int(r[5])) for r in rows}

    def begin(self, camera: str, name: str, entry: FileEntry) -> None:
        """Record that ``name`` is being read under ``entry.frame_id`` (durable before its frame moves on)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?)",
                             (camera, name, entry.size, entry.mtime_ns, entry.state, entry.frame_id,
                              entry.capture_us, time.time_ns() // 1000))

    def finish(self, camera: str, name: str, state: str) -> None:
        with self._lock:
            self._db.execute("UPDATE files SET state=?, updated_us=? WHERE camera=? AND name=?",
                             (state, time.time_ns() // 1000, camera, name))

    def forget(self, camera: str, names: Iterable[str]) -> int:
        rows = [(camera, n) for n in names]
        if not rows:
            return 0
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM files WHERE camera=? AND name=?", rows)
            self._db.execute("COMMIT")
        return len(rows)

    def count(self, camera: Optional[str] = None) -> int:
        with self._lock:
            if camera is None:
                return int(self._db.execute("SELECT COUNT(*) FROM files").fetchone()[0])
            return int(self._db.execute("SELECT COUNT(*) FROM files WHERE camera=?", (camera,)).fetchone()[0])

    # -- video files ------------------------------------------------------------------------------------------
    def video(self, camera: str) -> Optional[VideoEntry]:
        with self._lock:
            r = self._db.execute("SELECT path, size, mtime_ns, seed, started_us, next_index, done FROM videos "
                                 "WHERE camera=?", (camera,)).fetchone()
        return None if r is None else VideoEntry(r[0], int(r[1]), int(r[2]), bytes(r[3]), int(r[4]), int(r[5]),
                                                 bool(r[6]))

    def set_video(self, camera: str, entry: VideoEntry) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO videos VALUES (?,?,?,?,?,?,?,?)",
                             (camera, entry.path, entry.size, entry.mtime_ns, entry.seed, entry.started_us,
                              entry.next_index, int(entry.done)))

    def close(self) -> None:
        with self._lock:
            self._db.close()
