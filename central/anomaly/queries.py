"""What the API and the page read about anomalies: frames by score, the latest flagged frames per camera, a frame's
anomalous region, and frames like that region.

Scores are read joined with ``frames`` so a frame retention deleted never shows, even before the sweep drops its
score. Regions are in [0, 1] of the model input (x0, y0, x1, y1), as the summary's centroids are.

"Frames like this region" is region search (``central.regions``: every filtered frame of the model scored by the
best cosine of its summary tokens) with the frame's anomalous token, or any token of it, as the query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from central import regions, store
from central.anomaly import refsets
from central.errors import Invalid, NotFound
from central.kmeans import unit
from central.search import Filters, frame_conditions
from sql.db import is_postgres
from sql.models import Frame, FrameScore
from tokenline.anomaly import Region, token_region, unpack_mask
from tokenline.summary import Summary

SORTS = ("-score", "score", "-time", "time")
REASON = "bad_anomaly_query"
MAX_FRAME_IDS = 200  # frame ids one /v1/anomalies request may name (a page of results)


@dataclass(frozen=True)
class ScoredFrame:
    """A frame's score row: where and when, the score against which set and threshold, the anomalous region."""

    frame_id: str
    model_id: int
    site: str
    line: str
    camera: str
    capture_us: int
    score: float
    threshold: float
    flagged: bool
    set_id: int
    set_version: int
    token: int
    region: Region
    edge_score: Optional[float]
    scored_us: int

    def public(self, mask: bool = False) -> Dict[str, Any]:
        out = {k: getattr(self, k) for k in ("frame_id", "model_id", "site", "line", "camera", "capture_us",
                                              "flagged", "set_id", "set_version", "token", "scored_us")}
        out.update(score=round(self.score, 6), threshold=round(self.threshold, 6),
                   edge_score=None if self.edge_score is None else round(self.edge_score, 6))
        reg = self.region.public()
        if not mask:
            reg.pop("mask", None)
        out["region"] = reg
        return out


def _scored(r: FrameScore) -> ScoredFrame:
    mask = None
    if r.mask is not None and r.grid_h and r.grid_w:
        mask = unpack_mask(bytes(r.mask), (int(r.grid_h), int(r.grid_w)))
    return ScoredFrame(r.frame_id, r.model_id, r.site, r.line, r.camera, int(r.capture_us), float(r.score),
                       float(r.threshold), bool(r.flagged), int(r.set_id), int(r.set_version), int(r.token),
                       Region((float(r.x0), float(r.y0), float(r.x1), float(r.y1)), mask),
                       None if r.edge_score is None else float(r.edge_score), int(r.scored_us))


def _filtered(q: Select, model_id: Optional[int], f: Filters) -> Select:
    """``q`` restricted to a model, a place and a capture-time range (the score rows' own columns)."""
    t = FrameScore
    for col, v in ((t.model_id, model_id), (t.site, f.site), (t.line, f.line), (t.camera, f.camera)):
        if v is not None:
            q = q.where(col == v)
    if f.since_us is not None:
        q = q.where(t.capture_us >= f.since_us)
    if f.until_us is not None:
        q = q.where(t.capture_us < f.until_us)
    return q


def list_scores(session: Session, *, model_id: Optional[int] = None, filters: Filters = Filters(),
                min_score: Optional[float] = None, flagged: Optional[bool] = None, set_id: Optional[int] = None,
                frame_ids: Sequence[str] = (), sort: str = "-score", limit: int = 50,
                offset: int = 0) -> List[ScoredFrame]:
    """Scored frames, filtered (also to ``frame_ids`` when given) and sorted (``-score`` highest first, ``time``
    oldest first, ...)."""
    if sort not in SORTS:
        raise Invalid(f"sort must be one of {SORTS}, got {sort!r}", reason=REASON)
    if len(frame_ids) > MAX_FRAME_IDS:
        raise Invalid(f"at most {MAX_FRAME_IDS} frame_id values", reason=REASON)
    q = _filtered(select(FrameScore).join(Frame, Frame.frame_id == FrameScore.frame_id), model_id, filters)
    if frame_ids:
        q = q.where(FrameScore.frame_id.in_([store.check_frame_id(f) for f in frame_ids]))
    if min_score is not None:
        q = q.where(FrameScore.score >= min_score)
    if flagged is not None:
        q = q.where(FrameScore.flagged.is_(flagged))
    if set_id is not None:
        q = q.where(FrameScore.set_id == set_id)
    col = FrameScore.score if sort.endswith("score") else FrameScore.capture_us
    order = col.desc() if sort.startswith("-") else col.asc()
    q = q.order_by(order, FrameScore.frame_id).limit(max(1, min(limit, 1000))).offset(max(0, offset))
    return [_scored(r) for r in session.scalars(q)]


def latest_flagged(session: Session, per_camera: int = 5, model_id: Optional[int] = None,
                   filters: Filters = Filters()) -> List[Dict[str, Any]]:
    """Per camera with a reference set: its set and its ``per_camera`` latest flagged frames, newest first."""
    out = []
    for st in refsets.list_sets(session, model_id, filters.site, filters.line, filters.camera):
        cam = Filters(st.site, st.line, st.camera, filters.since_us, filters.until_us)
        q = _filtered(select(FrameScore).join(Frame, Frame.frame_id == FrameScore.frame_id), st.model_id, cam)
        q = q.where(FrameScore.flagged.is_(True), FrameScore.set_id == st.id)
        rows = session.scalars(q.order_by(FrameScore.capture_us.desc(), FrameScore.frame_id)
                               .limit(max(1, min(per_camera, 100))))
        out.append({"site": st.site, "line": st.line, "camera": st.camera, "model_id": st.model_id,
                    "reference_set": st.id, "set_version": st.bank_version, "threshold": round(st.threshold, 6),
                    "frames": [_scored(r) for r in rows]})
    return out


def frame_score(session: Session, frame_id: str) -> ScoredFrame:
    """A stored frame's score (with its region's mask); ``NotFound`` when the frame or its score is missing."""
    store.check_frame_id(frame_id)
    r = session.scalar(select(FrameScore).join(Frame, Frame.frame_id == FrameScore.frame_id)
                       .where(FrameScore.frame_id == frame_id))
    if r is None:
        reason = "not_scored" if store.frame_place(session, frame_id) else "not_found"
        raise NotFound("the frame has no anomaly score (no reference set for its camera when it came, or not "
                       "backfilled)" if reason == "not_scored" else "unknown frame", reason=reason)
    return _scored(r)


# -- frames like a region --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegionHit:
    frame_id: str
    site: str
    line: str
    camera: str
    capture_us: int
    sim: float
    token: int
    region: Region

    def public(self) -> Dict[str, Any]:
        return {"frame_id": self.frame_id, "site": self.site, "line": self.line, "camera": self.camera,
                "capture_us": self.capture_us, "sim": round(self.sim, 6), "token": self.token,
                "region": self.region.public()}


def _frame_tokens(session: Session, frame_id: str, models: Dict[int, Any]) -> Tuple[Any, Summary]:
    """A stored frame's row (``frame_id``, ``model_id``) and summary, with its footprint; ``models`` by id."""
    r = session.execute(select(Frame.frame_id, Frame.model_id, Frame.k, Frame.tokens, Frame.sizes, Frame.centroids,
                               Frame.footprint).where(Frame.frame_id == frame_id)).first()
    if r is None:
        raise NotFound("unknown frame", reason="not_found")
    return r, refsets.frame_summaries([r], models[r.model_id].manifest.summary, with_global=False)[0]


def similar_region(session: Session, frame_id: str, token: Optional[int] = None, k: int = 24,
                   filters: Filters = Filters()) -> Tuple[Dict[str, Any], List[RegionHit]]:
    """Frames of the same model whose best-matching summary token is closest to ``token`` of ``frame_id``
    (default: its most anomalous token): region search (``central.regions``) with that token as the query; the
    frame itself is left out. Returns (the query, hits)."""
    store.check_frame_id(frame_id)
    models = {m.id: m for m in store.list_models(session)}
    row, summary = _frame_tokens(session, frame_id, models)
    if token is None:
        scored = session.scalar(select(FrameScore.token).where(FrameScore.frame_id == frame_id))
        if scored is None or scored < 0:
            raise Invalid("the frame has no anomalous token; give token=<index>", reason=REASON)
        token = int(scored)
    if not 0 <= token < summary.k:
        raise Invalid(f"token must be in 0..{summary.k - 1}", reason=REASON)
    model = models[row.model_id]
    grid = tuple(model.manifest.encoder.grid)
    q = regions.RegionQuery(model.id, unit(summary.tokens[token]), "token", frame_id=frame_id)
    where = frame_conditions(model.id, filters, is_postgres(session.get_bind()))
    found = regions.region_search(session.get_bind(), model, q, k, where, max_results=200)
    hits = [RegionHit(h.frame.frame_id, h.frame.site, h.frame.line, h.frame.camera, int(h.frame.capture_us),
                      h.score, h.token, token_region(h.frame.summary, h.token, grid)) for h in found]
    query = {"frame_id": frame_id, "token": token, "region": token_region(summary, token, grid).public()}
    return query, hits
