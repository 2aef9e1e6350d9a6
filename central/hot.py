"""PostgreSQL's open segments in memory: one model's rows of the hot and sealing segments, mirrored by polling
and searched exactly with one matrix product (the growing segment of a vector database, searched exactly).

Scanning the hot segment in SQL reads every row's heap tuple (60,000 frames: 67 MB, 70-90 ms on the benchmark
machine, BENCHMARKS.md central); the mirror holds just the float32 embeddings and the filter columns.

Polling by ``id > watermark`` alone would miss rows: ingest workers allocate ids in one order and commit in
another, so a transaction with smaller ids can commit after a poll has seen larger ones. Every ingest
transaction holds the hot-segment advisory lock (shared, ``central.segments.HOT_LOCK``) from before it
allocates ids until it ends. So each sync first reads who holds that lock (``pg_locks``), then, in a later
statement (a later snapshot), the rows with ``id > low``; it records (holders, largest id seen). Once none of an
entry's holders holds the lock any more (read before a later sync's rows), every row with an id up to the
entry's largest id is committed or gone, and that later sync's read (still from the old ``low``) has seen it:
``low`` moves up to it. Rows read twice are kept once. Rows of segments that are no longer open (their ANN
index is built) leave the mirror; deletions (the ``frames_deleted`` counter moved) are applied by re-reading
the ids still there.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np
from sqlalchemy import Engine, bindparam, text
from sqlalchemy.orm import Session

from central import exact, segments
from central.store import FRAMES_DELETED

log = logging.getLogger(__name__)

# who holds the hot-segment lock, and how many frames were deleted so far: one round trip
_STATE = text("SELECT ARRAY(SELECT virtualtransaction FROM pg_locks WHERE locktype = 'advisory' AND classid = :hi "
              "AND objid = :lo AND objsubid = 1), "
              f"(SELECT COALESCE(SUM(value), 0) FROM counters WHERE name = '{FRAMES_DELETED}')")
_LOCK_KEY = {"hi": segments.HOT_LOCK >> 32, "lo": segments.HOT_LOCK & 0xFFFFFFFF}  # pg_locks' split of a bigint key
# the embedding in halfvec's binary form (int16 dim, int16 unused, dim big-endian float16): parsing the text form
# of 60,000 rows took 12 s
_ROWS = (text("SELECT id, segment, capture_us, site, line, camera, halfvec_send(global_embedding) FROM frames "
              "WHERE model_id = :m AND segment IN :segs AND id > :low ORDER BY id LIMIT :cap")
         .bindparams(bindparam("segs", expanding=True)))
RETRY_S = 60.0  # after the open segments outgrew the mirror, try again this much later


def _among(a: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """``np.isin`` for the few segment ids a query names (a comparison per value is several times faster)."""
    out = np.zeros(a.shape, bool)
    for v in values:
        out |= a == int(v)
    return out


class HotMirror:
    """One model's open-segment rows (module docstring); thread-safe; at most ``max_rows`` (beyond that
    ``sync`` returns False and the caller scans in SQL, for ``RETRY_S``)."""

    def __init__(self, engine: Engine, model_id: int, dim: int, max_rows: int) -> None:
        self.engine, self.model_id, self.dim, self.max_rows = engine, int(model_id), int(dim), int(max_rows)
        self.lock = threading.Lock()
        self.retry_at = 0.0  # after finding too many rows, the caller scans in SQL until then
        self._reset()

    def _reset(self) -> None:
        self.low = 0  # every row of an open segment with id <= low is in the mirror (or was deleted)
        self.pending: List[Tuple[FrozenSet[str], int]] = []  # (lock holders, largest id seen) per sync
        self.deletions = -1
        self.codes: Dict[str, Dict[str, int]] = exact.new_codes()
        self.n = 0
        self.ids = np.zeros(0, np.int64)
        self.seg = np.zeros(0, np.int64)
        self.ts = np.zeros(0, np.int64)
        self.place = {k: np.zeros(0, np.int32) for k in exact.PLACES}
        self._emb = np.zeros((0, self.dim), np.float32)  # capacity grows by doubling; rows [:n] are live

    @property
    def emb(self) -> np.ndarray:
        return self._emb[: self.n]

    def _keep(self, keep: np.ndarray) -> None:
        self.ids, self.seg, self.ts = self.ids[keep], self.seg[keep], self.ts[keep]
        self.place = {k: v[keep] for k, v in self.place.items()}
        emb = np.ascontiguousarray(self._emb[: self.n][keep])
        self.n = len(self.ids)
        self._emb = emb

    def _append(self, rows: Sequence[tuple]) -> None:
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        if self.n:
            fresh = ~np.isin(ids, self.ids[self.ids > self.low])  # read again while the watermark waited
            rows = [r for r, f in zip(rows, fresh) if f]
            ids = ids[fresh]
        if not rows:
            return
        m = len(rows)
        raw = b"".join(bytes(r[6]) for r in rows)
        if len(raw) != m * (4 + 2 * self.dim):
            raise ValueError(f"model {self.model_id}: open-segment embeddings are not all {self.dim}-d")
        emb = np.frombuffer(raw, ">f2").reshape(m, 2 + self.dim)[:, 2:].astype(np.float32)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        if self.n + m > len(self._emb):
            grown = np.zeros((max(2 * len(self._emb), self.n + m, 1024), self.dim), np.float32)
            grown[: self.n] = self._emb[: self.n]
            self._emb = grown
        self._emb[self.n: self.n + m] = emb
        self.ids = np.concatenate([self.ids, ids])
        self.seg = np.concatenate([self.seg, np.fromiter((r[1] for r in rows), np.int64, m)])
        self.ts = np.concatenate([self.ts, np.fromiter((r[2] for r in rows), np.int64, m)])
        for j, kind in enumerate(exact.PLACES):
            codes = np.fromiter((exact.code(self.codes, kind, r[3 + j]) for r in rows), np.int32, m)
            self.place[kind] = np.concatenate([self.place[kind], codes])
        self.n += m

    def sync(self, open_segments: Sequence[int]) -> bool:
        """Bring the mirror up to date with the rows of ``open_segments``; False when they hold more than
        ``max_rows`` rows of this model (the mirror is then emptied and the caller scans in SQL)."""
        if time.monotonic() < self.retry_at:
            return False
        segs = sorted({int(s) for s in open_segments})
        with self.lock, Session(self.engine) as s:
            held, gen = s.execute(_STATE, _LOCK_KEY).one()
            holders, gen = frozenset(held), int(gen)
            done = [e for e in self.pending if not (e[0] & holders)]
            s.commit()  # a new snapshot for the rows: everything the holders above wrote is visible or gone
            if self.n:
                gone = ~_among(self.seg, segs)
                if gen != self.deletions and self.deletions >= 0:
                    alive = np.fromiter(s.scalars(
                        text("SELECT id FROM frames WHERE model_id = :m AND segment IN :segs AND id <= :top")
                        .bindparams(bindparam("segs", expanding=True)),
                        {"m": self.model_id, "segs": segs, "top": int(self.ids.max())}), np.int64)
                    gone |= ~np.isin(self.ids, alive)
                if gone.any():
                    self._keep(~gone)
            self.deletions = gen
            if not segs:
                return True
            rows = s.execute(_ROWS, {"m": self.model_id, "segs": segs, "low": self.low,
                                     "cap": self.max_rows + 1}).all()
            if len(rows) <= self.max_rows:
                self._append(rows)
            if len(rows) > self.max_rows or self.n > self.max_rows:
                log.warning("model %d: more open-segment rows than search.hot_rows = %d; they are scanned in SQL",
                            self.model_id, self.max_rows)
                self._reset()
                self.retry_at = time.monotonic() + RETRY_S
                return False
            if done:
                self.low = max(self.low, max(e[1] for e in done))
                self.pending = [e for e in self.pending if e not in done]
            top = int(self.ids.max()) if self.n else self.low
            if self.pending and self.pending[-1][0] == holders:  # the same holders: one entry, the larger id
                self.pending[-1] = (holders, top)
            else:
                self.pending.append((holders, top))
            return True

    def knn(self, q: np.ndarray, k: int, open_segments: Sequence[int], site: Optional[str] = None,
            line: Optional[str] = None, camera: Optional[str] = None, since_us: Optional[int] = None,
            until_us: Optional[int] = None) -> List[Tuple[int, float, int]]:
        """Top ``k`` rows of ``open_segments`` passing the filters by cosine with the unit query ``q``:
        ``[(row id, cosine, segment)]``."""
        with self.lock:
            if not self.n:
                return []
            mask = exact.filter_mask(_among(self.seg, open_segments), self.codes, self.place, self.ts, site, line,
                                     camera, since_us, until_us)
            sel = np.flatnonzero(mask)
            if sel.size == 0:
                return []
            sims = (self.emb if sel.size == self.n else self.emb[sel]) @ q.astype(np.float32)
            ids, segs = self.ids[sel], self.seg[sel]
        top = exact.top_positions(sims, ids, k)
        return [(int(ids[i]), float(sims[i]), int(segs[i])) for i in top]
