"""Frame routes: a frame's metadata and original's state, the original JPEG, a thumbnail, the legal hold."""

from __future__ import annotations

from typing import Any, Dict

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from central import images, store
from central.api.deps import Admin, ServicesDep, SessionDep, Viewer
from central.errors import NotFound
from central.originals import read_original
from tokenline.documents import StrictModel

router = APIRouter(tags=["frames"])
CACHE = {"Cache-Control": "private, max-age=300"}


class HoldBody(StrictModel):
    hold: bool


@router.get("/v1/frames/{frame_id}")
def frame(frame_id: str, session: SessionDep, _p: Viewer) -> Dict[str, Any]:
    store.check_frame_id(frame_id)
    fr = store.get_frame(session, frame_id)
    orig = store.get_original(session, frame_id)
    if fr is None and orig is None:
        raise NotFound("unknown frame")
    return {"frame": fr.meta() if fr else None, "original": orig.public() if orig else None}


@router.get("/v1/frames/{frame_id}/original", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}, 404: {}, 410: {}})
def original(frame_id: str, svc: ServicesDep, session: SessionDep, _p: Viewer) -> Response:
    return Response(read_original(session, svc.blobs, frame_id), media_type="image/jpeg", headers=CACHE)


@router.get("/v1/frames/{frame_id}/thumbnail", response_class=Response)
async def thumbnail(frame_id: str, svc: ServicesDep, session: SessionDep, _p: Viewer, size: int = 160) -> Response:
    """A JPEG thumbnail of the original, decoded and encoded on the image pool (never on the event loop)."""
    data = await run_in_threadpool(read_original, session, svc.blobs, frame_id)
    jpeg = await svc.images.run(images.thumbnail, data, max(16, min(int(size), 512)), svc.cfg.api.max_image_pixels)
    return Response(jpeg, media_type="image/jpeg", headers=CACHE)


@router.put("/v1/frames/{frame_id}/hold")
def hold(frame_id: str, body: HoldBody, session: SessionDep, _p: Admin) -> Dict[str, Any]:
    store.check_frame_id(frame_id)
    found = store.set_legal_hold(session, frame_id, body.hold)
    session.commit()
    if not found:
        raise NotFound("unknown frame")
    return {"frame_id": frame_id, "legal_hold": body.hold}
