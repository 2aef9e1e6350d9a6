"""The search routes: whole-image search by an example image, a text or a stored frame, paged by cursor
(central.paging), and region search by a crop or a box on a stored frame (query building is central.search's,
region scoring central.regions')."""

from __future__ import annotations

import hashlib
import time
from typing import List, Optional

from fastapi import APIRouter, File, Form, UploadFile
from starlette.concurrency import run_in_threadpool

from central import paging
from central.api.deps import ServicesDep, SessionDep, Viewer
from central.api.schemas import RegionSearchOut, SearchOut, errors
from central.api.validation import finite, name_filter, page_size, time_range
from central.errors import TooLarge
from central.regions import parse_box
from central.search import BAD_QUERY, Filters, build_query, build_region_query, parse_labels

router = APIRouter(tags=["search"])


def _filters(site: Optional[str], line: Optional[str], camera: Optional[str], since_us: Optional[int],
             until_us: Optional[int], label: Optional[List[str]]) -> Filters:
    """The search filters of a request, each parameter checked (a 422 naming it)."""
    time_range(since_us, until_us)
    return Filters(name_filter("site", site), name_filter("line", line), name_filter("camera", camera),
                   since_us, until_us, parse_labels(label))


@router.post("/v1/search", response_model=SearchOut, responses=errors(400, 401, 403, 404, 413, 422, 503))
async def search(svc: ServicesDep, session: SessionDep, _p: Viewer,
                 image: Optional[UploadFile] = File(None, description="an example image (JPEG, PNG, ...)"),
                 q: Optional[str] = Form(None, description="a text (models with a text tower)"),
                 like_frame: Optional[str] = Form(None, description="a stored frame's id"),
                 model_id: Optional[int] = Form(None, ge=1, description="required when several models are registered"),
                 k: int = Form(24, description="results per page, 1..search.max_results"),
                 site: Optional[str] = Form(None), line: Optional[str] = Form(None),
                 camera: Optional[str] = Form(None),
                 since_us: Optional[int] = Form(None, description="capture time from (Unix µs)"),
                 until_us: Optional[int] = Form(None, description="capture time until (exclusive)"),
                 rerank: Optional[bool] = Form(None, description="MaxSim re-rank (default: search.rerank)"),
                 rerank_weight: Optional[float] = Form(None, description="0..1 (default: search.rerank_weight)"),
                 label: Optional[List[str]] = Form(None, description="repeatable: name=value, or name for any value"),
                 cursor: Optional[str] = Form(None, description="next_cursor of the previous page (same query and "
                                                                "filters)")) -> SearchOut:
    """Search by an example image (multipart ``image``), a text (``q``) or a stored frame (``like_frame``); the
    results come best first, ``k`` per page, with ``next_cursor`` for the next page.

    ``label`` (repeatable) keeps frames carrying that label: ``name=value``, or ``name`` for any value. Decoding
    and encoding the query run on the image pool, the search on a worker thread: never on the event loop."""
    t0 = time.perf_counter()
    page_size("k", k, svc.cfg.search.max_results)
    finite("rerank_weight", rerank_weight, 0.0, 1.0)
    filters = _filters(site, line, camera, since_us, until_us, label)
    limit = svc.cfg.originals.max_upload_bytes
    data = await _upload(image, limit)
    model, query = await svc.images.run(build_query, session, svc.encoders, image=data, query_text=q,
                                        like_frame=like_frame, model_id=model_id, max_image_bytes=limit,
                                        max_image_pixels=svc.cfg.api.max_image_pixels)
    fp = paging.fingerprint(kind="search", model=model.id, filters=filters, rerank=rerank, w=rerank_weight,
                            image=None if data is None else hashlib.sha256(data).hexdigest(), q=q,
                            like=like_frame)
    cur = paging.decode(cursor, "search", fp)
    hits, nxt = await run_in_threadpool(paging.search_page, svc.searcher, model, query, k, filters, fp=fp, after=cur,
                                        max_depth=svc.cfg.search.max_depth, rerank=rerank,
                                        rerank_weight=rerank_weight)
    dt = time.perf_counter() - t0
    svc.metrics.observe_search(dt)
    return SearchOut.model_validate({"model": model.public(), "took_ms": round(dt * 1000, 2),
                                     "results": [h.public() for h in hits], "next_cursor": nxt})


@router.post("/v1/search/region", response_model=RegionSearchOut,
             responses=errors(400, 401, 403, 404, 413, 422, 503))
async def search_region(svc: ServicesDep, session: SessionDep, _p: Viewer,
                        image: Optional[UploadFile] = File(None, description="a crop: the region to look for"),
                        frame_id: Optional[str] = Form(None, description="a stored frame's id (with box)"),
                        box: Optional[str] = Form(None, description="x0,y0,x1,y1 on frame_id, fractions of the frame"),
                        model_id: Optional[int] = Form(None, ge=1, description="required when several models are "
                                                                               "registered"),
                        k: int = Form(24, description="results, 1..search.max_results"),
                        site: Optional[str] = Form(None), line: Optional[str] = Form(None),
                        camera: Optional[str] = Form(None),
                        since_us: Optional[int] = Form(None, description="capture time from (Unix µs)"),
                        until_us: Optional[int] = Form(None, description="capture time until (exclusive)"),
                        label: Optional[List[str]] = Form(None, description="repeatable: name=value, or name for "
                                                                            "any value")) -> RegionSearchOut:
    """Frames that hold a region like the query anywhere: a crop (multipart ``image``) or a ``box``
    (``x0,y0,x1,y1``, fractions of the frame) on a stored frame (``frame_id``); each result's best-matching
    summary token and its footprint in the original frame's coordinates. Filters as ``/v1/search``'s; one page
    (no cursor)."""
    t0 = time.perf_counter()
    page_size("k", k, svc.cfg.search.max_results, paged=False)
    filters = _filters(site, line, camera, since_us, until_us, label)
    limit = svc.cfg.originals.max_upload_bytes
    data = await _upload(image, limit)
    model, query = await svc.images.run(build_region_query, session, svc.encoders, image=data, frame_id=frame_id,
                                        box=None if box is None else parse_box(box), model_id=model_id,
                                        max_image_bytes=limit, max_image_pixels=svc.cfg.api.max_image_pixels)
    hits = await run_in_threadpool(svc.searcher.region_search, model, query, k, filters)
    dt = time.perf_counter() - t0
    svc.metrics.observe_search(dt)
    return RegionSearchOut.model_validate({"model": model.public(), "took_ms": round(dt * 1000, 2),
                                           "query": query.public(), "results": [h.public() for h in hits]})


async def _upload(image: Optional[UploadFile], limit: int) -> Optional[bytes]:
    """The uploaded query image's bytes (None when none was sent); refused by its declared size over ``limit``."""
    if image is None:
        return None
    if image.size is not None and image.size > limit:
        raise TooLarge(f"image is {image.size} bytes, limit {limit}", reason=BAD_QUERY)
    return await image.read()
