"""Anomaly routes: reference sets (admins change, viewers read), frames by score, latest flagged frames per
camera, a frame's anomalous region, frames like that region. Typed answers (see ``/openapi.json``)."""

from __future__ import annotations

from typing import List, Literal, Optional

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field, model_validator

from central.anomaly import queries, refsets
from central.api.deps import Admin, Services, ServicesDep, SessionDep, Viewer
from central.api.validation import name_filter, time_range
from central.errors import NotFound
from central.search import Filters
from tokenline.anomaly import MODES
from tokenline.documents import StrictModel
from tokenline.topics import NAME_PATTERN

router = APIRouter(tags=["anomaly"])
Mode = Literal["tokens", "global", "both"]
assert set(MODES) == set(Mode.__args__)  # type: ignore[attr-defined]
State = Literal["ready", "building", "failed"]
assert set(refsets.STATES) == set(State.__args__)  # type: ignore[attr-defined]
FRAME_ID = r"^[0-9a-f]{32}$"


# -- bodies ----------------------------------------------------------------------------------------------------
class _Threshold(StrictModel):
    quantile: Optional[float] = Field(None, gt=0, le=1)  # threshold = this quantile of the leave-one-out scores
    threshold: Optional[float] = Field(None, ge=0)  # a threshold by hand

    @model_validator(mode="after")
    def _one(self) -> "_Threshold":
        if self.quantile is not None and self.threshold is not None:
            raise ValueError("give quantile or threshold, not both")
        return self


class CreateSetBody(_Threshold):
    """A new reference set: frame ids and/or every frame of the camera in [since_us, until_us)."""

    name: str = Field(min_length=1, max_length=128)
    model_id: Optional[int] = None  # default: the frames' model, or the only one registered
    site: Optional[str] = Field(None, pattern=NAME_PATTERN)  # default (frame ids): the frames' camera
    line: Optional[str] = Field(None, pattern=NAME_PATTERN)
    camera: Optional[str] = Field(None, pattern=NAME_PATTERN)
    frame_ids: List[str] = Field(default_factory=list, max_length=100_000)
    since_us: Optional[int] = Field(None, ge=0)
    until_us: Optional[int] = Field(None, ge=0)
    mode: Mode = "tokens"


class UpdateSetBody(_Threshold):
    """Changes to a set; the version rises and the bank is rebuilt."""

    name: Optional[str] = Field(None, min_length=1, max_length=128)
    add_frame_ids: List[str] = Field(default_factory=list, max_length=100_000)
    remove_frame_ids: List[str] = Field(default_factory=list, max_length=100_000)
    since_us: Optional[int] = Field(None, ge=0)  # add every frame of the camera in [since_us, until_us)
    until_us: Optional[int] = Field(None, ge=0)
    mode: Optional[Mode] = None


# -- answers ---------------------------------------------------------------------------------------------------
class MaskOut(BaseModel):
    grid: List[int] = Field(description="[grid_h, grid_w] of the footprint")
    rows: List[str] = Field(description="one string of '0'/'1' per grid row, top to bottom")


class RegionOut(BaseModel):
    box: List[float] = Field(description="[x0, y0, x1, y1] in [0, 1] of the model input")
    mask: Optional[MaskOut] = Field(None, description="the token's footprint cells, when the frame had a footprint")


class ReferenceSetOut(BaseModel):
    id: int
    name: str
    model_id: int
    site: str
    line: str
    camera: str
    mode: Mode
    metric: Optional[Literal["whitened", "cosine"]] = Field(
        description="how the bank measures token distances (tokenline.anomaly); null before the first build")
    threshold_mode: Literal["quantile", "manual"]
    quantile: float
    threshold: float
    version: int
    frame_count: int
    bank_tokens: int
    pool_tokens: int
    lists: int
    nprobe: int
    created_us: int
    updated_us: int
    state: State = Field(
        description="ready: the bank is the current version's; building: it is being built (the scorer keeps the "
                    "bank of bank_version meanwhile); failed: build_error says why")
    bank_version: int = Field(description="the set version of the stored bank, threshold and bank figures; 0: none yet")
    build_error: Optional[str] = None
    frame_ids: Optional[List[str]] = None


class ReferenceSetsOut(BaseModel):
    reference_sets: List[ReferenceSetOut]


class ScoredFrameOut(BaseModel):
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
    token: int = Field(description="the most anomalous summary token, -1 when none qualified")
    edge_score: Optional[float] = Field(None, description="the edge's own score, when it sent one")
    scored_us: int
    region: RegionOut


class ScoresOut(BaseModel):
    results: List[ScoredFrameOut]


class CameraFlagsOut(BaseModel):
    site: str
    line: str
    camera: str
    model_id: int
    reference_set: int
    set_version: int
    threshold: float
    frames: List[ScoredFrameOut]


class LatestOut(BaseModel):
    cameras: List[CameraFlagsOut]


class RegionQueryOut(BaseModel):
    frame_id: str
    token: int
    region: RegionOut


class RegionHitOut(BaseModel):
    frame_id: str
    site: str
    line: str
    camera: str
    capture_us: int
    sim: float = Field(description="cosine of the frame's best-matching summary token with the query token")
    token: int
    region: RegionOut


class SimilarRegionOut(BaseModel):
    query: RegionQueryOut
    results: List[RegionHitOut]


# -- reference sets --------------------------------------------------------------------------------------------
WAIT = Query(False, description="build the bank in this request and answer when it is done (201 / 200), instead "
                                "of answering at once (202) while central builds it; a failed build is then a 400")


def _build(svc: Services, info: refsets.SetInfo, wait: bool, response: Response, done: int) -> dict:
    """After a committed change: the set as it is when its bank is current (200), else with its bank built in the
    request (``wait``: status ``done``), or as it is while the builder thread builds it (202)."""
    if info.state == "ready":
        response.status_code = 200
        return info.public()
    if wait:
        response.status_code = done
        return refsets.build_set(svc.engine, svc.cfg.anomaly, info.id).public()
    svc.builder.submit(info.id)
    return info.public()


@router.post("/v1/reference-sets", status_code=202, response_model=ReferenceSetOut,
             responses={201: {"model": ReferenceSetOut, "description": "created, its bank built (wait=true)"}})
def create_reference_set(body: CreateSetBody, svc: ServicesDep, session: SessionDep, _p: Admin, response: Response,
                         wait: bool = WAIT) -> dict:
    """Create a set; 202 with state ``building`` while central builds its bank (poll the set), or 201 when built
    (``wait``)."""
    info = refsets.create_set(session, svc.cfg.anomaly, name=body.name, model_id=body.model_id, site=body.site,
                              line=body.line, camera=body.camera, frame_ids=body.frame_ids, since_us=body.since_us,
                              until_us=body.until_us, mode=body.mode, quantile=body.quantile,
                              threshold=body.threshold)
    session.commit()
    return _build(svc, info, wait, response, 201)


@router.get("/v1/reference-sets", response_model=ReferenceSetsOut)
def list_reference_sets(session: SessionDep, _p: Viewer, model_id: Optional[int] = None,
                        site: Optional[str] = None, line: Optional[str] = None,
                        camera: Optional[str] = None) -> dict:
    return {"reference_sets": [s.public() for s in refsets.list_sets(session, model_id, site, line, camera)]}


@router.get("/v1/reference-sets/{set_id}", response_model=ReferenceSetOut)
def get_reference_set(set_id: int, session: SessionDep, _p: Viewer, frames: bool = False) -> dict:
    out = refsets.get_set(session, set_id).public()
    if frames:
        out["frame_ids"] = refsets.set_frame_ids(session, set_id)
    return out


@router.patch("/v1/reference-sets/{set_id}", status_code=202, response_model=ReferenceSetOut,
              responses={200: {"model": ReferenceSetOut, "description": "changed; the bank is current"}})
def update_reference_set(set_id: int, body: UpdateSetBody, svc: ServicesDep, session: SessionDep,
                         _p: Admin, response: Response, wait: bool = WAIT) -> dict:
    """Change a set; 200 when its bank is current (a threshold by hand or a new name re-label it; ``wait`` builds
    it in the request), else 202 with state ``building``."""
    info = refsets.update_set(session, svc.cfg.anomaly, set_id, add_frame_ids=body.add_frame_ids,
                              remove_frame_ids=body.remove_frame_ids, since_us=body.since_us,
                              until_us=body.until_us, mode=body.mode, quantile=body.quantile,
                              threshold=body.threshold, name=body.name)
    session.commit()
    return _build(svc, info, wait, response, 200)


@router.post("/v1/reference-sets/{set_id}/build", status_code=202, response_model=ReferenceSetOut,
             responses={200: {"model": ReferenceSetOut, "description": "the bank is current"}})
def build_reference_set(set_id: int, svc: ServicesDep, session: SessionDep, _p: Admin, response: Response,
                        wait: bool = WAIT) -> dict:
    """Build a set's bank again after a failed build (its frames or central changed since): 202 while building,
    200 when current."""
    info = refsets.request_build(session, set_id)
    session.commit()
    return _build(svc, info, wait, response, 200)


@router.delete("/v1/reference-sets/{set_id}", status_code=204)
def delete_reference_set(set_id: int, session: SessionDep, _p: Admin) -> Response:
    if not refsets.delete_set(session, set_id):
        raise NotFound(f"unknown reference set {set_id}", reason=refsets.REASON)
    session.commit()
    return Response(status_code=204)


@router.get("/v1/reference-sets/{set_id}/bank", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}, 404: {}})
def reference_set_bank(set_id: int, session: SessionDep, _p: Viewer) -> Response:
    """The bank file for the edge (``tokenline-central reference-set export`` writes the same bytes): the last
    bank built (its set version in ``X-Tokenline-Set-Version``); 409 ``bank_not_built`` before the first build."""
    info, data = refsets.bank_bytes(session, set_id)
    headers = {"Content-Disposition": f'attachment; filename="{info.camera}.npz"',
               "X-Tokenline-Set-Version": str(info.bank_version)}
    return Response(data, media_type="application/octet-stream", headers=headers)


# -- scores ----------------------------------------------------------------------------------------------------
def _filters(site: Optional[str], line: Optional[str], camera: Optional[str], since_us: Optional[int],
             until_us: Optional[int]) -> Filters:
    """The place and capture-time filters, checked as the search and browse routes check them (422 names the
    parameter)."""
    time_range(since_us, until_us)
    return Filters(name_filter("site", site), name_filter("line", line), name_filter("camera", camera),
                   since_us, until_us)


@router.get("/v1/anomalies", response_model=ScoresOut)
def anomalies(session: SessionDep, _p: Viewer, model_id: Optional[int] = None, site: Optional[str] = None,
              line: Optional[str] = None, camera: Optional[str] = None, since_us: Optional[int] = None,
              until_us: Optional[int] = None, min_score: Optional[float] = None, flagged: Optional[bool] = None,
              set_id: Optional[int] = None, sort: Literal["-score", "score", "-time", "time"] = "-score",
              frame_id: List[str] = Query([], description="only these frames (repeat, at most 200): the scores "
                                                          "of a page of results"),
              limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0)) -> dict:
    """Scored frames, filtered (place, capture time, score, flagged, set, frame ids) and sorted."""
    rows = queries.list_scores(session, model_id=model_id, filters=_filters(site, line, camera, since_us, until_us),
                               min_score=min_score, flagged=flagged, set_id=set_id, frame_ids=frame_id, sort=sort,
                               limit=limit, offset=offset)
    return {"results": [r.public() for r in rows]}


@router.get("/v1/anomalies/latest", response_model=LatestOut)
def latest(session: SessionDep, _p: Viewer, per_camera: int = Query(5, ge=1, le=100),
           model_id: Optional[int] = None, site: Optional[str] = None, line: Optional[str] = None,
           camera: Optional[str] = None, since_us: Optional[int] = None, until_us: Optional[int] = None) -> dict:
    """Every camera with a reference set and its latest flagged frames captured in [since_us, until_us)."""
    cams = queries.latest_flagged(session, per_camera, model_id, _filters(site, line, camera, since_us, until_us))
    return {"cameras": [{**c, "frames": [f.public() for f in c["frames"]]} for c in cams]}


@router.get("/v1/frames/{frame_id}/anomaly", response_model=ScoredFrameOut)
def frame_anomaly(frame_id: str, session: SessionDep, _p: Viewer) -> dict:
    """A frame's score and its anomalous region with the footprint mask (404 ``not_scored`` without a score)."""
    return queries.frame_score(session, frame_id).public(mask=True)


@router.get("/v1/frames/{frame_id}/similar-region", response_model=SimilarRegionOut)
def similar_region(frame_id: str, session: SessionDep, _p: Viewer, token: Optional[int] = None,
                   k: int = Query(24, ge=1, le=200), site: Optional[str] = None, line: Optional[str] = None,
                   camera: Optional[str] = None, since_us: Optional[int] = None,
                   until_us: Optional[int] = None) -> dict:
    """Frames whose best-matching summary token is most like this frame's anomalous token (or ``token``)."""
    query, hits = queries.similar_region(session, frame_id, token, k, _filters(site, line, camera, since_us, until_us))
    return {"query": query, "results": [h.public() for h in hits]}
