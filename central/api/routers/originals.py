"""The originals upload route: an edge device PUTs a frame's JPEG (the contract in docs/protocol.md)."""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from central.api.deps import Device, ServicesDep, SessionDep
from central.errors import Invalid, TooLarge
from central.originals import check_upload_size, store_original

router = APIRouter(tags=["originals"])


@router.put("/v1/originals/{frame_id}", status_code=201)
async def put_original(frame_id: str, request: Request, svc: ServicesDep, session: SessionDep, _p: Device,
                       x_tokenline_sha256: Optional[str] = Header(None),
                       content_type: Optional[str] = Header(None)) -> JSONResponse:
    """201 stored, 200 already stored with the same sha256; the body is refused as soon as it is too large."""
    limit = svc.cfg.originals.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit():
        check_upload_size(int(declared), limit)
    if content_type and content_type.split(";")[0].strip().lower() not in ("image/jpeg", "image/jpg"):
        raise Invalid(f"Content-Type must be image/jpeg, got {content_type!r}", reason="not_jpeg")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"body exceeds {limit} bytes")
    res = await run_in_threadpool(store_original, session, svc.blobs, svc.cfg.retention, frame_id, bytes(body),
                                  x_tokenline_sha256, limit, svc.cfg.api.max_image_pixels)
    return JSONResponse({"frame_id": frame_id, "sha256": res.sha256, "expires_us": res.expires_us,
                         "stored": res.created}, status_code=201 if res.created else 200)
