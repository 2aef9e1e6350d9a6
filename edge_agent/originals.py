"""Originals: JPEG store kept by age and size cap, and the persistent HTTP upload queue to central.

Files live under ``<dir>/<first 8 hex of the frame id>/<frame id>.jpg``; an SQLite index (WAL) next to them
records each file and each queued upload. Uploads follow the HTTP contract in docs/protocol.md: 200/201 are
done, 408/429/5xx/connection errors are retried with exponential backoff, other 4xx are final (logged,
counted, the row kept with its status for inspection). ``upload_decision`` is the pure policy function.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from edge_agent.config import OriginalsConfig
from tokenline.config import read_secret
from tokenline.frame_id import frame_id_str

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS originals (frame_id TEXT PRIMARY KEY, path TEXT NOT NULL, bytes INTEGER NOT NULL,
                                      created_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS uploads (frame_id TEXT PRIMARY KEY, state TEXT NOT NULL, attempts INTEGER NOT NULL,
                                    next_try_s REAL NOT NULL, last_status INTEGER, last_error TEXT);
CREATE INDEX IF NOT EXISTS uploads_due ON uploads(state, next_try_s);
"""
RETRY_STATUSES = {408, 429}


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def upload_decision(policy: str, every_nth: int, counter: int) -> bool:
    """Whether the ``counter``-th stored frame (0-based) is queued for upload by policy (requests aside)."""
    if policy == "all":
        return True
    if policy == "every_nth":
        return counter % every_nth == 0
    return False


def classify_status(status: int) -> str:
    """'done', 'retry' or 'final' for an HTTP status of PUT /v1/originals/{id}."""
    if status in (200, 201):
        return "done"
    if status in RETRY_STATUSES or status >= 500:
        return "retry"
    return "final"


class OriginalsStore:
    """JPEG files + SQLite index + upload queue, with an uploader thread."""

    def __init__(self, cfg: OriginalsConfig) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.dir / "index.sqlite"), check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self.total_bytes = int(self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM originals").fetchone()[0])
        self.counter = 0
        self.stored = 0
        self.pruned = 0
        self.uploaded = 0
        self.upload_failed = 0
        self.upload_retries = 0
        up = cfg.upload
        self.token = read_secret(up.token, up.token_file, "originals.upload.token_file")
        self._ssl = ssl.create_default_context(cafile=str(up.ca_file)) if up.ca_file else None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- store ------------------------------------------------------------------------------------------------
    def path_for(self, fid_hex: str) -> Path:
        return self.dir / fid_hex[:8] / f"{fid_hex}.jpg"

    def put(self, frame_id: bytes, jpeg: bytes, now: Optional[float] = None) -> None:
        """Store one JPEG, queue its upload per policy, prune by age and size."""
        now = time.time() if now is None else now
        fid = frame_id_str(frame_id)
        path = self.path_for(fid)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(jpeg)
        tmp.replace(path)
        upload = upload_decision(self.cfg.upload.policy, self.cfg.upload.every_nth, self.counter)
        self.counter += 1
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO originals VALUES (?,?,?,?)", (fid, str(path), len(jpeg), now))
            if upload:
                self._db.execute("INSERT OR IGNORE INTO uploads VALUES (?, 'pending', 0, ?, NULL, NULL)", (fid, now))
            self._db.execute("COMMIT")
            self.total_bytes += len(jpeg)
            self.stored += 1
        self.prune(now)
        if upload:
            self._wake.set()

    def request(self, fid_hex: str) -> bool:
        """Queue an upload on request (command ``request_original``); False when the JPEG is not kept."""
        with self._lock:
            if self._db.execute("SELECT 1 FROM originals WHERE frame_id=?", (fid_hex,)).fetchone() is None:
                return False
            self._db.execute("INSERT INTO uploads VALUES (?, 'pending', 0, ?, NULL, NULL) ON CONFLICT(frame_id) DO "
                             "UPDATE SET state='pending', next_try_s=excluded.next_try_s WHERE state != 'done'",
                             (fid_hex, time.time()))
        self._wake.set()
        return True

    def prune(self, now: Optional[float] = None) -> int:
        """Delete originals older than max_age_s, then the oldest until within max_bytes. Returns the count."""
        now = time.time() if now is None else now
        victims: List[Tuple[str, str, int]] = []
        with self._lock:
            victims += self._db.execute("SELECT frame_id, path, bytes FROM originals WHERE created_s < ?",
                                        (now - self.cfg.max_age_s,)).fetchall()
            over = self.total_bytes - sum(v[2] for v in victims) - self.cfg.max_bytes
            if over > 0:
                old = {v[0] for v in victims}
                for fid, path, nb in self._db.execute("SELECT frame_id, path, bytes FROM originals ORDER BY frame_id"):
                    if over <= 0:
                        break
                    if fid in old:
                        continue
                    victims.append((fid, path, nb))
                    over -= nb
            if not victims:
                return 0
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM originals WHERE frame_id=?", [(v[0],) for v in victims])
            self._db.executemany("UPDATE uploads SET state='pruned' WHERE frame_id=? AND state='pending'",
                                 [(v[0],) for v in victims])
            self._db.execute("COMMIT")
            self.total_bytes -= sum(v[2] for v in victims)
            self.pruned += len(victims)
        for _, path, _ in victims:
            try:
                Path(path).unlink()
            except OSError:
                pass
        return len(victims)

    # -- uploads ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.cfg.upload.policy == "none" and self.cfg.upload.url is None:
            return
        self._thread = threading.Thread(target=self._uploader, name="originals-uploader", daemon=True)
        self._thread.start()

    def _due(self, limit: int = 16) -> List[Tuple[str, int]]:
        with self._lock:
            return [(r[0], int(r[1])) for r in self._db.execute(
                "SELECT frame_id, attempts FROM uploads WHERE state='pending' AND next_try_s <= ? "
                "ORDER BY frame_id LIMIT ?", (time.time(), limit))]

    def _set(self, fid: str, state: str, attempts: int, next_try: float, status: Optional[int], err: str) -> None:
        with self._lock:
            self._db.execute("UPDATE uploads SET state=?, attempts=?, next_try_s=?, last_status=?, last_error=? "
                             "WHERE frame_id=?", (state, attempts, next_try, status, err[:500], fid))

    def put_original(self, fid: str, body: bytes) -> Tuple[Optional[int], str]:
        """One PUT per the contract; returns (HTTP status or None for a connection error, error text)."""
        url = f"{self.cfg.upload.url.rstrip('/')}/v1/originals/{fid}"  # type: ignore[union-attr]
        headers = {"Content-Type": "image/jpeg", "X-Tokenline-Sha256": hashlib.sha256(body).hexdigest()}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=body, method="PUT", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.upload.timeout_s, context=self._ssl) as resp:
                return int(resp.status), ""
        except urllib.error.HTTPError as exc:
            try:
                detail = exc.read(300).decode("utf-8", "replace")
            except Exception:  # noqa: BLE001
                detail = ""
            return int(exc.code), detail or str(exc.reason)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            return None, str(getattr(exc, "reason", exc))

    def upload_once(self) -> int:
        """Try every due upload once; returns how many were attempted."""
        due = self._due()
        for fid, attempts in due:
            path = self.path_for(fid)
            try:
                body = path.read_bytes()
            except OSError:
                self._set(fid, "pruned", attempts, 0, None, "JPEG no longer in the local store")
                continue
            status, err = self.put_original(fid, body)
            verdict = "retry" if status is None else classify_status(status)
            if verdict == "done":
                self.uploaded += 1
                self._set(fid, "done", attempts + 1, 0, status, "")
            elif verdict == "retry":
                self.upload_retries += 1
                up = self.cfg.upload
                delay = min(up.retry_min_s * (2 ** min(attempts, 20)), up.retry_max_s)
                self._set(fid, "pending", attempts + 1, time.time() + delay, status, err)
                log.info("upload of %s: %s; retry in %.1fs", fid, status or err, delay)
            else:
                self.upload_failed += 1
                self._set(fid, "gone" if status == 410 else "failed", attempts + 1, 0, status, err)
                log.warning("upload of %s refused with %s: %s (final; kept in the upload queue)", fid, status, err)
        return len(due)

    def _uploader(self) -> None:
        while not self._stop.is_set():
            try:
                n = self.upload_once()
            except Exception:  # noqa: BLE001 - the uploader must keep running
                log.exception("uploader error")
                n = 0
            if not n:
                self._wake.wait(0.5)
                self._wake.clear()

    def queue_counts(self) -> Dict[str, int]:
        with self._lock:
            return {r[0]: int(r[1]) for r in self._db.execute("SELECT state, COUNT(*) FROM uploads GROUP BY state")}

    def upload_row(self, fid: str) -> Optional[Tuple[str, int, Optional[int]]]:
        with self._lock:
            r = self._db.execute("SELECT state, attempts, last_status FROM uploads WHERE frame_id=?", (fid,)).fetchone()
        return (r[0], int(r[1]), r[2]) if r else None

    def stats(self) -> Dict[str, int]:
        q = self.queue_counts()
        return {"stored": self.stored, "store_bytes": self.total_bytes, "pruned": self.pruned,
                "upload_pending": q.get("pending", 0), "uploaded": self.uploaded, "upload_failed": self.upload_failed,
                "upload_retries": self.upload_retries}

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            self._db.close()
