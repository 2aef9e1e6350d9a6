"""The search route: by an example image, a text or a stored frame (query building is central.search's)."""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

from fastapi import APIRouter, File, Form, UploadFile

from central.api.deps import ServicesDep, SessionDep, Viewer
from central.search import Filters, build_query

router = APIRouter(tags=["search"])


@router.post("/v1/search")
async def search(svc: ServicesDep, session: SessionDep, _p: Viewer,
                 image: Optional[UploadFile] = File(None), q: Optional[str] = Form(None),
                 like_frame: Optional[str] = Form(None), model_id: Optional[int] = Form(None),
                 k: int = Form(24), site: Optional[str] = Form(None), line: Optional[str] = Form(None),
                 camera: Optional[str] = Form(None), since_us: Optional[int] = Form(None),
                 until_us: Optional[int] = Form(None), rerank: Optional[bool] = Form(None),
                 rerank_weight: Optional[float] = Form(None)) -> Dict[str, Any]:
    """Search by an example image (multipart ``image``), a text (``q``) or a stored frame (``like_frame``)."""
    t0 = time.perf_counter()
    data = await image.read() if image is not None else None
    model, query = build_query(session, svc.encoders, image=data, query_text=q, like_frame=like_frame,
                               model_id=model_id, max_image_bytes=svc.cfg.originals.max_upload_bytes)
    filters = Filters(site or None, line or None, camera or None, since_us, until_us)
    hits = svc.searcher.search(model, query, k, filters, rerank=rerank, rerank_weight=rerank_weight)
    dt = time.perf_counter() - t0
    svc.metrics.observe_search(dt)
    return {"model": model.public(), "took_ms": round(dt * 1000, 2), "results": [h.public() for h in hits]}
