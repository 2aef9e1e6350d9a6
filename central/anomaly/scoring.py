"""Anomaly scores beside ingest and by backfill: each frame of a camera with a reference set gets its score, its
most anomalous token and that token's region, stored in ``frame_scores``.

Ingest does not score. In the transaction that stores a frame of a camera with a set, it queues the frame
(``queue``: a ``score_queue`` row, with the edge's own score when the message carried one). The scorer (``Scorer``,
in a process beside each ingest worker: ``central.anomaly.process``) takes the queue in order, scores a batch
against each camera's current bank, and in one transaction deletes the batch's queue rows and inserts their
scores; the flagged frames become alerts after that commit. Whoever deletes a queue row owns its frame's score
and alert, so two scorers never alert twice (on PostgreSQL they also claim rows with SKIP LOCKED, so they do not
score the same batch); a crash of ingest or scorer leaves each frame either unstored or queued, never unscored
for good (a frame its bank cannot score is logged and left to the backfill). The backfill scores frames stored before their camera's set existed, or scored against an older
version of it, and raises no alerts (it is history).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from sqlalchemy import Engine, and_, delete, func, or_, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from central import store
from central.anomaly import refsets
from central.config import AnomalyConfig
from central.store import ModelInfo
from sql.db import is_postgres
from sql.models import Frame, FrameScore, ReferenceSet, ScoreQueue
from tokenline.anomaly import AnomalyScore, Bank, footprint_regions, pack_masks, token_region
from tokenline.summary import Summary
from tokenline.topics import Alert

log = logging.getLogger(__name__)

Key = Tuple[int, str, str, str]  # (model_id, site, line, camera)
SCORED = "frames_scored"  # counters (tokenline_<name>_total in /metrics)
ALERTS = "anomaly_alerts"


@dataclass(frozen=True)
class FrameMeta:
    """What a score row and an alert need to know about the frame besides its summary."""

    frame_id: str
    model_id: int
    model_hash: str
    site: str
    device: str
    line: str
    camera: str
    capture_us: int
    edge_score: Optional[float] = None


@dataclass(frozen=True)
class Scored:
    row: Dict[str, Any]  # a frame_scores row
    alert: Optional[Alert]  # set when the frame is over its set's threshold


def score_frames(bank: Bank, metas: Sequence[FrameMeta], batch: Summary, grid: Tuple[int, int]) -> List[Scored]:
    """Score frames of one camera (their summaries ``batch``, batched: same K and d, in ``metas``' order) against
    its bank; one row (and maybe an alert) each."""
    if not metas:
        return []
    fs = bank.score_arrays(batch.tokens, batch.sizes,
                           batch.global_embedding if bank.info.mode != "tokens" else None)
    info = bank.info
    flagged = fs.score.astype(np.float64) > info.threshold  # as Bank.anomaly_score compares (the edge)
    boxes = np.zeros((len(metas), 4))
    masks: List[Optional[bytes]] = [None] * len(metas)
    grids: List[Tuple[Optional[int], Optional[int]]] = [(None, None)] * len(metas)
    found = np.flatnonzero(fs.token >= 0)
    if batch.footprint is not None:  # the regions from the footprints, all at once
        b, m = footprint_regions(batch.footprint[found], fs.token[found])
        boxes[found] = b
        shape = (int(batch.footprint.shape[1]), int(batch.footprint.shape[2]))
        for i, packed in zip(found, pack_masks(m)):
            masks[i], grids[i] = packed, shape
    else:
        for i in found:
            boxes[i] = token_region(batch[i], int(fs.token[i]), grid).box
    now = store.now_us()
    out = []
    for i, meta in enumerate(metas):
        score, token, box = float(fs.score[i]), int(fs.token[i]), tuple(float(v) for v in boxes[i])
        row = {"frame_id": meta.frame_id, "set_id": info.set_id, "set_version": info.set_version,
               "model_id": meta.model_id, "site": meta.site, "line": meta.line, "camera": meta.camera,
               "capture_us": meta.capture_us, "score": score, "threshold": info.threshold,
               "flagged": bool(flagged[i]), "token": token, "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3],
               "mask": masks[i], "grid_h": grids[i][0], "grid_w": grids[i][1], "edge_score": meta.edge_score,
               "scored_us": now}
        alert = None
        if flagged[i]:
            alert = Alert(frame_id=meta.frame_id, site=meta.site, device=meta.device, line=meta.line,
                          camera=meta.camera, capture_us=meta.capture_us, score=score, threshold=info.threshold,
                          reference_set=info.set_id, set_version=info.set_version, token=token, box=box,
                          source="central", model=meta.model_hash)
        out.append(Scored(row, alert))
    return out


def _insert(session: Session, table: Any, update: bool):
    stmt = store.dialect_insert(session, table)
    if update:
        cols = {c.name: stmt.excluded[c.name] for c in table.columns if c.name != "frame_id"}
        return stmt.on_conflict_do_update(index_elements=["frame_id"], set_=cols)
    return stmt.on_conflict_do_nothing(index_elements=["frame_id"])


def _executemany(session: Session, table: Any, rows: Sequence[Dict[str, Any]], sqlite_suffix: str = "") -> None:
    """Insert ``rows`` (dicts with the same keys) into ``table``: SQLite through the driver's executemany (the
    ORM's binds cost more than the insert), PostgreSQL through Core (scores: ON CONFLICT DO NOTHING)."""
    cols = list(rows[0])
    if session.get_bind().dialect.name == "sqlite":
        raw = session.connection().connection.driver_connection
        raw.executemany(f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                        f"{sqlite_suffix}", [tuple(r[c] for c in cols) for r in rows])
    elif table is FrameScore.__table__:
        session.execute(_insert(session, table, update=False), list(rows))
    else:
        session.execute(table.insert(), list(rows))


def queue(session: Session, rows: Sequence[Dict[str, Any]], edge: Dict[str, AnomalyScore]) -> int:
    """In ingest's transaction: queue the new ``frames`` rows of cameras with a reference set for the scorer, each
    with the edge's score (``edge``: by frame id) when its message carried one. Returns how many were queued."""
    if not rows:
        return 0
    sets = refsets.active_versions(session)  # in the transaction: a set committed before it sees these frames
    now = store.now_us()
    out = []
    for r in rows:
        if (r["model_id"], r["site"], r["line"], r["camera"]) in sets:
            e = edge.get(r["frame_id"])
            out.append({"frame_id": r["frame_id"], "queued_us": now,
                        "edge_set_id": None if e is None else e.set_id,
                        "edge_set_version": None if e is None else e.set_version,
                        "edge_score": None if e is None else float(e.score)})
    if out:
        _executemany(session, ScoreQueue.__table__, out)
    return len(out)


class Banks:
    """The banks of every camera with a reference set, reloaded when a set's version changes (polled per batch)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._versions: Dict[Key, Tuple[int, int]] = {}
        self._banks: Dict[Key, Bank] = {}

    def refresh(self) -> None:
        with Session(self.engine) as s:
            versions = refsets.active_versions(s)
            for key, ver in versions.items():
                if self._versions.get(key) != ver:
                    bank = refsets.load_bank(s, ver[0])
                    if bank is not None:
                        self._banks[key] = bank
                        log.info("reference set %d v%d for %s: %d bank tokens, threshold %.4f", ver[0], ver[1],
                                 "/".join(key[1:]), bank.size, bank.info.threshold)
        for key in set(self._banks) - set(versions):
            del self._banks[key]
        self._versions = versions

    def get(self, key: Key) -> Optional[Bank]:
        return self._banks.get(key)

    @property
    def need_globals(self) -> bool:
        """Whether a loaded bank scores global embeddings (mode global or both)."""
        return any(b.info.mode != "tokens" for b in self._banks.values())


_QUEUE_COLS = (ScoreQueue.id.label("queue_id"), ScoreQueue.frame_id.label("queued_frame"), ScoreQueue.edge_set_id,
               ScoreQueue.edge_set_version, ScoreQueue.edge_score, Frame.model_id, Frame.site, Frame.line,
               Frame.camera, Frame.device, Frame.capture_us, Frame.k, Frame.tokens, Frame.sizes, Frame.centroids,
               Frame.footprint)  # + Frame.global_embedding while a bank of mode global or both is loaded


class Scorer:
    """Scores the queued frames in order, a batch at a time (``step``), until the queue is empty (``drain``) or
    until stopped (``run``); ``alerts`` receives the alerts of each committed batch. Counts ``frames_scored`` and
    ``anomaly_alerts`` under ``name`` in the database's counters."""

    def __init__(self, engine: Engine, cfg: AnomalyConfig, name: str,
                 alerts: Optional[Callable[[List[Alert]], None]] = None) -> None:
        self.engine, self.cfg, self.name, self.alerts = engine, cfg, name, alerts
        self.banks = Banks(engine)
        self._models: Dict[int, ModelInfo] = {}
        self.scored = self.flagged = 0

    def _model(self, session: Session, model_id: int) -> ModelInfo:
        if model_id not in self._models:
            self._models = {m.id: m for m in store.list_models(session)}
        return self._models[model_id]

    def _select(self):  # noqa: ANN202 - a SQLAlchemy Select
        cols = _QUEUE_COLS + ((Frame.global_embedding,) if self.banks.need_globals else ())
        return (select(*cols).select_from(ScoreQueue).outerjoin(Frame, Frame.frame_id == ScoreQueue.frame_id)
                .order_by(ScoreQueue.id).limit(self.cfg.score_batch))

    def step(self) -> int:
        """Score one batch of the queue; returns how many queue rows it took (0: the queue is empty)."""
        self.banks.refresh()
        if is_postgres(self.engine):  # claim the rows for this transaction: other scorers skip them
            with Session(self.engine) as s, s.begin():
                rows = s.execute(self._select().with_for_update(of=ScoreQueue, skip_locked=True)).all()
                alerts = self._store(s, rows, self._score(s, rows))
        else:  # SQLite: read, score, then write (a read snapshot cannot become a write once ingest committed)
            with Session(self.engine) as s:
                rows = s.execute(self._select()).all()
                scored = self._score(s, rows)
            with Session(self.engine) as s, s.begin():
                alerts = self._store(s, rows, scored)
        if alerts and self.alerts is not None:
            self.alerts(alerts)
        return len(rows)

    def _score(self, session: Session, rows: Sequence[Any]) -> Dict[int, Scored]:
        """``{queue id: Scored}`` of the rows whose frame is stored and whose camera has a bank."""
        groups: Dict[Tuple[Key, int], List[Any]] = {}
        for r in rows:
            if r.model_id is None:  # retention deleted the frame meanwhile
                continue
            key = (int(r.model_id), r.site, r.line, r.camera)
            if self.banks.get(key) is not None:
                groups.setdefault((key, int(r.k)), []).append(r)
        out: Dict[int, Scored] = {}
        for (key, _), part in groups.items():
            bank, model = self.banks.get(key), self._model(session, key[0])
            info = bank.info
            try:
                batch = refsets.frame_summaries(part, model.manifest.summary, info.mode != "tokens")
                metas = []
                for r in part:
                    same = r.edge_score is not None and (r.edge_set_id, r.edge_set_version) == (info.set_id,
                                                                                                 info.set_version)
                    metas.append(FrameMeta(r.queued_frame, key[0], model.hash16, r.site, r.device, r.line,
                                           r.camera, int(r.capture_us), float(r.edge_score) if same else None))
                for r, sc in zip(part, score_frames(bank, metas, batch, tuple(model.manifest.encoder.grid))):
                    out[int(r.queue_id)] = sc
            except Exception:  # noqa: BLE001 - frames a bank cannot score must not stop the queue
                log.exception("cannot score %d frame(s) of %s; they stay unscored", len(part), "/".join(key[1:]))
        return out

    def _store(self, session: Session, rows: Sequence[Any], scored: Dict[int, Scored]) -> List[Alert]:
        """Delete the batch's queue rows and insert the scores of those this transaction deleted."""
        if not rows:
            return []
        ids = [int(r.queue_id) for r in rows]
        mine = set(session.execute(delete(ScoreQueue).where(ScoreQueue.id.in_(ids)).returning(ScoreQueue.id))
                   .scalars())
        done = [scored[i] for i in ids if i in mine and i in scored]
        if done:
            _executemany(session, FrameScore.__table__, [s.row for s in done], "ON CONFLICT (frame_id) DO NOTHING")
        alerts = [s.alert for s in done if s.alert is not None]
        store.add_counters(session, self.name, {SCORED: len(done), ALERTS: len(alerts)})
        self.scored += len(done)
        self.flagged += len(alerts)
        return alerts

    def drain(self) -> int:
        """Score until the queue is empty; returns the queue rows taken."""
        n = 0
        while True:
            got = self.step()
            n += got
            if got == 0:
                return n

    def run(self, stop: Callable[[], bool]) -> None:
        """Score until ``stop()``: after a full batch the next at once, else poll every ``score_poll_s``; a database
        outage is logged and retried with backoff, its rows left queued."""
        delay = self.cfg.score_poll_s
        while not stop():
            try:
                got = self.step()
                delay = self.cfg.score_poll_s
            except OperationalError as exc:
                log.error("scorer: database unavailable (%s); retrying in %.1fs", exc.__class__.__name__, delay)
                got, delay = 0, min(delay * 2, 30.0)
            if got < self.cfg.score_batch:
                time.sleep(delay)


# -- backfill --------------------------------------------------------------------------------------------------
@dataclass
class BackfillReport:
    sets: int = 0
    scored: int = 0
    flagged: int = 0


def _stale(row: ReferenceSet):
    """Frames of the set's camera and model without a score from its bank (none, another set's, an older bank's)."""
    fs = FrameScore.__table__.c
    return and_(Frame.model_id == row.model_id, Frame.site == row.site, Frame.line == row.line,
                Frame.camera == row.camera,
                or_(fs.frame_id.is_(None), fs.set_id != row.id, fs.set_version != row.bank_version))


def backfill(engine: Engine, set_id: Optional[int] = None, batch: int = 500,
             progress: Optional[Callable[[str, int, int], None]] = None) -> BackfillReport:
    """Score every stored frame of each set's camera (or of ``set_id``'s) that has no current score; each batch
    commits on its own. ``progress(set name, done, total)`` after each batch. No alerts are raised."""
    rep = BackfillReport()
    fs = FrameScore.__table__
    with Session(engine) as s:
        sets = list(s.scalars(select(ReferenceSet).where(ReferenceSet.id == set_id) if set_id is not None
                              else select(ReferenceSet).order_by(ReferenceSet.id)))
        for row in sets:
            s.expunge(row)
    for row in sets:
        rep.sets += 1
        with Session(engine) as s:
            bank = refsets.load_bank(s, row.id)
            model = {m.id: m for m in store.list_models(s)}[row.model_id]
            total = int(s.scalar(select(func.count()).select_from(Frame).outerjoin(
                fs, fs.c.frame_id == Frame.frame_id).where(_stale(row))) or 0)
            grid, hash16 = tuple(model.manifest.encoder.grid), model.hash16
            spec = model.manifest.summary
        if bank is None:
            continue
        done, last_id = 0, 0
        cols = [Frame.id, Frame.frame_id, Frame.device, Frame.capture_us, Frame.k, Frame.tokens, Frame.sizes,
                Frame.centroids, Frame.footprint]
        if bank.info.mode != "tokens":
            cols.append(Frame.global_embedding)
        while True:
            with Session(engine) as s, s.begin():
                rows = s.execute(select(*cols).outerjoin(fs, fs.c.frame_id == Frame.frame_id)
                                 .where(_stale(row), Frame.id > last_id).order_by(Frame.id).limit(batch)).all()
                if not rows:
                    break
                last_id = int(rows[-1].id)
                metas = [FrameMeta(r.frame_id, row.model_id, hash16, row.site, r.device, row.line, row.camera,
                                   int(r.capture_us)) for r in rows]
                scored = score_frames(bank, metas, refsets.frame_summaries(rows, spec, bank.info.mode != "tokens"), grid)
                s.execute(_insert(s, fs, update=True), [x.row for x in scored])
                store.add_counters(s, "backfill", {SCORED: len(scored)})
            done += len(rows)
            rep.scored += len(scored)
            rep.flagged += sum(1 for x in scored if x.row["flagged"])
            if progress is not None:
                progress(row.name, done, total)
        if progress is not None:
            progress(row.name, done, max(done, total))
    return rep


