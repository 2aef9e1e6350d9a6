"""The search route: by an example image, a text or a stored frame (query building is central.search's)."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from fastapi import APIRouter, File, Form, UploadFile
from starlette.concurrency import run_in_threadpool

from central.api.deps import ServicesDep, SessionDep, Viewer
from central.errors import TooLarge
from central.search import BAD_QUERY, Filters, build_query, parse_labels

router = APIRouter(tags=["search"])


@router.post("/v1/search")
async def search(svc: ServicesDep, session: SessionDep, _p: Viewer,
                 image: Optional[UploadFile] = File(None), q: Optional[str] = Form(None),
                 like_frame: Optional[str] = Form(None), model_id: Optional[int] = Form(None),
                 k: int = Form(24), site: Optional[str] = Form(None), line: Optional[str] = Form(None),
                 camera: Optional[str] = Form(None), since_us: Optional[int] = Form(None),
                 until_us: Optional[int] = Form(None), rerank: Optional[bool] = Form(None),
                 rerank_weight: Optional[float] = Form(None),
                 label: Optional[List[str]] = Form(None)) -> Dict[str, Any]:
    """Search by an example image (multipart ``image``), a text (``q``) or a stored frame (``like_frame``).

    ``label`` (repeatable) keeps frames carrying that label: ``name=value``, or ``name`` for any value. Decoding
    and encoding the query run on the image pool, the search on a worker thread: never on the event loop."""
    t0 = time.perf_counter()
    filters = Filters(site or None, line or None, camera or None, since_us, until_us, parse_labels(label))
    limit = svc.cfg.originals.max_upload_bytes
    if image is not None and image.size is not None and image.size > limit:
        raise TooLarge(f"image is {image.size} bytes, limit {limit}", reason=BAD_QUERY)
    data = await image.read() if image is not None else None
    model, query = await svc.images.run(build_query, session, svc.encoders, image=data, query_text=q,
                                        like_frame=like_frame, model_id=model_id, max_image_bytes=limit,
                                        max_image_pixels=svc.cfg.api.max_image_pixels)
    hits = await run_in_threadpool(svc.searcher.search, model, query, k, filters, rerank=rerank,
                                   rerank_weight=rerank_weight)
    dt = time.perf_counter() - t0
    svc.metrics.observe_search(dt)
    return {"model": model.public(), "took_ms": round(dt * 1000, 2), "results": [h.public() for h in hits]}
