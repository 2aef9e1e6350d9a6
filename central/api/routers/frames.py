"""Frame routes: a frame's metadata and original's state, the original JPEG, a thumbnail, the legal hold."""

from __future__ import annotations

from typing import Any, Dict

import cv2
import numpy as np
from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from central import store
from central.api.deps import Admin, ServicesDep, SessionDep, Viewer
from central.errors import NotFound, Unprocessable
from central.originals import read_original

router = APIRouter(tags=["frames"])
CACHE = {"Cache-Control": "private, max-age=300"}


class HoldBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
def thumbnail(frame_id: str, svc: ServicesDep, session: SessionDep, _p: Viewer, size: int = 160) -> Response:
    data = read_original(session, svc.blobs, frame_id)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise Unprocessable("stored original does not decode", reason="bad_original")
    size = max(16, min(int(size), 512))
    h, w = img.shape[:2]
    s = size / max(h, w)
    small = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return Response(buf.tobytes(), media_type="image/jpeg", headers=CACHE)


@router.put("/v1/frames/{frame_id}/hold")
def hold(frame_id: str, body: HoldBody, session: SessionDep, _p: Admin) -> Dict[str, Any]:
    store.check_frame_id(frame_id)
    found = store.set_legal_hold(session, frame_id, body.hold)
    session.commit()
    if not found:
        raise NotFound("unknown frame")
    return {"frame_id": frame_id, "legal_hold": body.hold}
