"""Frame routes: the latest frames (paged), a frame's metadata and original's state, the original JPEG (or a
download), a thumbnail, the legal hold, and asking the edge for an original central does not have."""

from __future__ import annotations

import datetime as dt
from typing import List, Optional

from fastapi import APIRouter, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from central import images, paging, store
from central.api.deps import Admin, ServicesDep, SessionDep, Viewer
from central.api.schemas import FrameOut, FramesOut, HoldOut, OriginalRequestOut, errors
from central.api.validation import name_filter, page_size, time_range
from central.errors import NotFound
from central.search import parse_labels
from central.originals import read_original
from tokenline.documents import StrictModel

router = APIRouter(tags=["frames"])
CACHE = {"Cache-Control": "private, max-age=300"}
JPEG = {200: {"content": {"image/jpeg": {}}}}


class HoldBody(StrictModel):
    hold: bool


@router.get("/v1/frames", response_model=FramesOut, responses=errors(401, 403, 422))
def browse(svc: ServicesDep, session: SessionDep, _p: Viewer,
           model_id: Optional[int] = Query(None, ge=1), site: Optional[str] = None, line: Optional[str] = None,
           camera: Optional[str] = None, since_us: Optional[int] = Query(None, description="capture time, Unix µs"),
           until_us: Optional[int] = Query(None, description="exclusive"),
           label: Optional[List[str]] = Query(None, description="repeatable: name=value, or name for any value"),
           limit: int = Query(48, description="frames per page (at most search.max_results)"),
           cursor: Optional[str] = Query(None, description="next_cursor of the previous page")) -> FramesOut:
    """The latest frames, newest capture first, with the search's filters; page with ``next_cursor``."""
    page_size("limit", limit, svc.cfg.search.max_results)
    f = {"model_id": model_id, "site": name_filter("site", site), "line": name_filter("line", line),
         "camera": name_filter("camera", camera), "since_us": since_us, "until_us": until_us,
         "labels": parse_labels(label)}
    time_range(since_us, until_us)
    fp = paging.fingerprint(kind="frames", **f)
    cur = paging.decode(cursor, "frames", fp)
    rows = store.browse_frames(session, **f, before=None if cur is None else cur.key, limit=limit + 1)
    nxt = paging.frames_cursor(fp, rows, cur.served if cur else 0, limit)
    return FramesOut.model_validate({"frames": rows[:limit], "next_cursor": nxt})


@router.get("/v1/frames/{frame_id}", response_model=FrameOut, responses=errors(400, 401, 403, 404))
def frame(frame_id: str, session: SessionDep, _p: Viewer) -> FrameOut:
    """Every stored field of a frame (with its summary tokens' centroids and sizes) and its original's state."""
    store.check_frame_id(frame_id)
    fr = store.get_frame(session, frame_id)
    orig = store.get_original(session, frame_id)
    if fr is None and orig is None:
        raise NotFound("unknown frame")
    return FrameOut.model_validate({"frame": fr.meta() if fr else None, "original": orig.public() if orig else None})


def _download_name(session, frame_id: str) -> str:
    fr = store.get_frame(session, frame_id)
    if fr is None:
        return f"{frame_id}.jpg"
    t = dt.datetime.fromtimestamp(fr.capture_us / 1e6, tz=dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{fr.site}_{fr.line}_{fr.camera}_{t}_{frame_id}.jpg"


@router.get("/v1/frames/{frame_id}/original", response_class=Response,
            responses={**JPEG, **errors(400, 401, 403, 404, 410)})
def original(frame_id: str, svc: ServicesDep, session: SessionDep, _p: Viewer,
             download: bool = Query(False, description="as an attachment named site_line_camera_time_id.jpg")
             ) -> Response:
    """The original JPEG; 404 never uploaded (ask the edge: POST .../original/request), 410 deleted by retention."""
    data = read_original(session, svc.blobs, frame_id)
    headers = dict(CACHE)
    if download:
        headers["Content-Disposition"] = f'attachment; filename="{_download_name(session, frame_id)}"'
    return Response(data, media_type="image/jpeg", headers=headers)


@router.get("/v1/frames/{frame_id}/thumbnail", response_class=Response,
            responses={**JPEG, **errors(400, 401, 403, 404, 410)})
async def thumbnail(frame_id: str, svc: ServicesDep, session: SessionDep, _p: Viewer,
                    size: int = Query(160, ge=16, le=512, description="longest side in pixels")) -> Response:
    """A JPEG thumbnail of the original, decoded and encoded on the image pool (never on the event loop)."""
    data = await run_in_threadpool(read_original, session, svc.blobs, frame_id)
    jpeg = await svc.images.run(images.thumbnail, data, size, svc.cfg.api.max_image_pixels)
    return Response(jpeg, media_type="image/jpeg", headers=CACHE)


@router.put("/v1/frames/{frame_id}/hold", response_model=HoldOut, responses=errors(400, 401, 403, 404, 422))
def hold(frame_id: str, body: HoldBody, session: SessionDep, _p: Admin) -> HoldOut:
    store.check_frame_id(frame_id)
    found = store.set_legal_hold(session, frame_id, body.hold)
    session.commit()
    if not found:
        raise NotFound("unknown frame")
    return HoldOut(frame_id=frame_id, legal_hold=body.hold)


@router.post("/v1/frames/{frame_id}/original/request", response_model=OriginalRequestOut, status_code=202,
             responses=errors(400, 401, 403, 404))
def request_original(frame_id: str, svc: ServicesDep, session: SessionDep, p: Viewer) -> OriginalRequestOut:
    """Ask the frame's edge device for its original (command ``request_original`` over MQTT), for originals kept
    only on the edge (upload policy ``on_request``). Answers the request's progress; follow it with GET."""
    out = svc.original_requests.request(session, frame_id, by=p.name)
    svc.metrics.original_requests.labels("failed" if out["state"] == "failed" else "sent").inc()
    return OriginalRequestOut.model_validate(out)


@router.get("/v1/frames/{frame_id}/original/request", response_model=OriginalRequestOut,
            responses=errors(400, 401, 403, 404))
def original_request_progress(frame_id: str, svc: ServicesDep, session: SessionDep, _p: Viewer) -> OriginalRequestOut:
    """Where the request for this original stands: stored, queued_on_edge, not_on_edge, device_offline,
    requested, no_answer or failed (``central.commands``)."""
    return OriginalRequestOut.model_validate(svc.original_requests.progress(session, frame_id))
