"""Anomaly scores at ingest and by backfill: each frame of a camera with a reference set gets its score, its most
anomalous token and that token's region, stored in ``frame_scores``.

At ingest (``Scorer``, one per worker) the scores are computed from the decoded messages before the batch's
transaction, inserted in it with the frames (``record``), and the flagged frames become alerts the worker
publishes after the commit. A message whose frame is already scored (a redelivery) adds nothing. The backfill
scores frames stored before their camera's set existed, or scored against an older version of it, and raises
no alerts (it is history).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from sqlalchemy import Engine, and_, func, or_, select
from sqlalchemy.orm import Session

from central import store
from central.anomaly import refsets
from central.config import AnomalyConfig
from central.store import ModelInfo
from sql.models import Frame, FrameScore, ReferenceSet
from sql.types import unpack_token_rows
from tokenline.anomaly import Bank, footprint_regions, pack_masks, token_region
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


def score_frames(bank: Bank, frames: Sequence[Tuple[FrameMeta, Summary]], grid: Tuple[int, int]) -> List[Scored]:
    """Score frames of one camera (same K and d) against its bank; one row (and maybe an alert) each."""
    if not frames:
        return []
    sums = [s for _, s in frames]
    fs = bank.score_arrays(np.stack([s.tokens for s in sums]), np.stack([s.sizes for s in sums]),
                           np.stack([s.global_embedding for s in sums]) if bank.info.mode != "tokens" else None)
    info = bank.info
    flagged = fs.score.astype(np.float64) > info.threshold  # as Bank.anomaly_score compares (the edge)
    boxes = np.zeros((len(frames), 4))
    masks: List[Optional[bytes]] = [None] * len(frames)
    grids: List[Tuple[Optional[int], Optional[int]]] = [(None, None)] * len(frames)
    with_fp = [i for i, s in enumerate(sums) if s.footprint is not None and fs.token[i] >= 0]
    by_grid: Dict[tuple, List[int]] = {}
    for i in with_fp:
        by_grid.setdefault(sums[i].footprint.shape, []).append(i)
    for shape, idx in by_grid.items():  # the regions of footprinted frames, all at once
        b, m = footprint_regions(np.stack([sums[i].footprint for i in idx]), fs.token[idx])
        boxes[idx] = b
        for i, packed in zip(idx, pack_masks(m)):
            masks[i], grids[i] = packed, (int(shape[0]), int(shape[1]))
    for i in np.flatnonzero(fs.token >= 0):
        if sums[i].footprint is None:
            boxes[i] = token_region(sums[i], int(fs.token[i]), grid).box
    now = store.now_us()
    out = []
    for i, (meta, _) in enumerate(frames):
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


def record(session: Session, scored: Sequence[Scored], counters: Dict[str, int]) -> List[Alert]:
    """Insert the scores of frames stored in this transaction (the caller's, which inserted them: so none has a
    score yet, and a redelivered frame, not new, is not passed and raises no alert again); add their count and
    the alerts' to ``counters``, which the caller adds to the database in its transaction. Returns the alerts.
    One executemany, no RETURNING: the caller knows which frames are new."""
    if not scored:
        return []
    if session.get_bind().dialect.name == "sqlite":  # the driver's executemany: the ORM's binds cost more than it
        cols = list(scored[0].row)
        raw = session.connection().connection.driver_connection
        raw.executemany(f"INSERT INTO frame_scores ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                        "ON CONFLICT (frame_id) DO NOTHING", [tuple(s.row[c] for c in cols) for s in scored])
    else:
        session.execute(_insert(session, FrameScore.__table__, update=False), [s.row for s in scored])
    alerts = [s.alert for s in scored if s.alert is not None]
    counters[SCORED] = counters.get(SCORED, 0) + len(scored)
    counters[ALERTS] = counters.get(ALERTS, 0) + len(alerts)
    return alerts


class Scorer:
    """The ingest hook of one worker: the banks of every camera with a reference set (reloaded when a set's
    version changes; polled once per batch) and the scoring of decoded messages."""

    def __init__(self, engine: Engine, cfg: AnomalyConfig) -> None:
        self.engine, self.cfg = engine, cfg
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

    def score(self, items: Sequence[Tuple[Any, ModelInfo]]) -> List[Scored]:
        """Scores of decoded, validated messages (``(TokenMessage, model)``) of cameras with a set."""
        if not items:
            return []
        self.refresh()
        groups: Dict[Key, List[Tuple[FrameMeta, Summary]]] = {}
        grids: Dict[Key, Tuple[int, int]] = {}
        for msg, model in items:
            key = (model.id, msg.site, msg.line, msg.camera)
            bank = self._banks.get(key)
            if bank is None:
                continue
            edge = msg.anomaly
            same = edge is not None and (edge.set_id, edge.set_version) == (bank.info.set_id, bank.info.set_version)
            meta = FrameMeta(msg.frame_id_hex, model.id, model.hash16, msg.site, msg.device, msg.line, msg.camera,
                             int(msg.capture_ts_us), float(edge.score) if same else None)
            groups.setdefault(key, []).append((meta, msg.summary))
            if key not in grids:
                grids[key] = tuple(model.manifest.encoder.grid)
        out: List[Scored] = []
        for key, frames in groups.items():
            by_shape: Dict[tuple, list] = {}
            for f in frames:
                by_shape.setdefault(f[1].tokens.shape, []).append(f)
            for part in by_shape.values():
                try:
                    out += score_frames(self._banks[key], part, grids[key])
                except Exception:  # noqa: BLE001 - a bank that cannot score these frames must not stop ingest
                    log.exception("cannot score %d frame(s) of %s", len(part), "/".join(key[1:]))
        return out


# -- backfill --------------------------------------------------------------------------------------------------
@dataclass
class BackfillReport:
    sets: int = 0
    scored: int = 0
    flagged: int = 0


def _stale(row: ReferenceSet):
    """Frames of the set's camera and model without a current score (none, another set's, an older version's)."""
    fs = FrameScore.__table__.c
    return and_(Frame.model_id == row.model_id, Frame.site == row.site, Frame.line == row.line,
                Frame.camera == row.camera,
                or_(fs.frame_id.is_(None), fs.set_id != row.id, fs.set_version != row.version))


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
            fp_grid = model.manifest.summary.footprint_grid
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
                scored: List[Scored] = []
                for shape_rows in refsets.group_by_shape(rows):
                    k = int(shape_rows[0].k)
                    toks = unpack_token_rows([r.tokens for r in shape_rows], k)
                    frames = []
                    for r, t in zip(shape_rows, toks):
                        g = (np.asarray(r.global_embedding, np.float32) if bank.info.mode != "tokens"
                             else np.zeros(1, np.float32))
                        summary = refsets.row_summary(r, t, fp_grid, g)
                        frames.append((FrameMeta(r.frame_id, row.model_id, hash16, row.site, r.device, row.line,
                                                 row.camera, int(r.capture_us)), summary))
                    scored += score_frames(bank, frames, grid)
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



class IngestHook:
    """All that ingest does for anomaly scoring, in three calls: ``score`` the batch's messages before its
    transaction, ``record`` the scores in it, ``alert`` after the commit (MQTT via ``publish``, the webhook)."""

    def __init__(self, engine: Engine, cfg: AnomalyConfig, worker: str) -> None:
        from central.anomaly.alerts import AlertPublisher, Webhook

        self.worker = worker
        self.scorer = Scorer(engine, cfg)
        webhook = Webhook(cfg.webhook, engine, worker) if cfg.webhook.url else None
        self.publisher = AlertPublisher(None, webhook)
        self.publish_alerts = cfg.alerts

    def set_publish(self, publish: Optional[Callable[..., object]]) -> None:
        """The MQTT publish function (the worker's client) alerts go out through; None: no MQTT alerts."""
        self.publisher.publish = publish if self.publish_alerts else None

    def score(self, items: Sequence[Tuple[Any, ModelInfo]]) -> Dict[str, Scored]:
        """``{frame id: Scored}`` of the batch's decoded messages; scoring never fails the batch."""
        try:
            return {s.row["frame_id"]: s for s in self.scorer.score(items)}
        except Exception:  # noqa: BLE001 - e.g. the database hiccups while reloading a bank: frames still ingest
            log.exception("anomaly scoring of a batch of %d failed; the frames are stored unscored", len(items))
            return {}

    def record(self, session: Session, scored: Sequence[Scored], counters: Dict[str, int]) -> List[Alert]:
        return record(session, scored, counters)

    def alert(self, alerts: Sequence[Alert]) -> None:
        self.publisher(alerts)

    def close(self) -> None:
        self.publisher.close()
