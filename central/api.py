"""FastAPI application: search, frames, originals (edge uploads), devices, models, health and metrics."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Literal, Optional, Tuple

import cv2
import numpy as np
from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from central.blobs import BlobStore
from central.config import CentralConfig
from central.encoder import EncoderError, EncoderPool
from central.originals import FRAME_ID_RE, OriginalError, read_original, store_original
from central.search import Filters, Query, SearchError, Searcher
from central import store
from sql.db import make_engine
from sql.models import Original

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"


class Principal(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    role: str


class HoldBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hold: bool


class TokenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    role: Literal["viewer", "device", "admin"]


class TokenCache:
    """Bearer-token lookups cached for a few seconds (revocation takes effect within ``ttl_s``)."""

    def __init__(self, engine: Engine, ttl_s: float = 5.0) -> None:
        self.engine, self.ttl = engine, ttl_s
        self._c: Dict[str, Tuple[float, Optional[tuple]]] = {}
        self._lock = threading.Lock()

    def get(self, token: str) -> Optional[tuple]:
        now = time.monotonic()
        with self._lock:
            hit = self._c.get(token)
            if hit and now - hit[0] < self.ttl:
                return hit[1]
        val = store.lookup_token(self.engine, token)
        with self._lock:
            if len(self._c) > 10000:
                self._c.clear()
            self._c[token] = (now, val)
        return val


class Metrics:
    """Request counters of this process, exposed with the database gauges on /metrics."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Dict[Tuple[str, int], int] = {}
        self.search_seconds_sum = 0.0
        self.search_count = 0

    def count(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1


def _err(status: int, reason: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": reason, "detail": detail}, status_code=status)


def create_app(cfg: CentralConfig, engine: Optional[Engine] = None) -> FastAPI:
    """Build the app; ``engine`` defaults to ``cfg.database.url`` (the schema must be migrated)."""
    engine = engine or make_engine(cfg.database.url)
    blobs = BlobStore(cfg.originals.root)
    searcher = Searcher(engine, cfg.search)
    encoders = EncoderPool(cfg.search.providers)
    tokens = TokenCache(engine)
    metrics = Metrics()

    app = FastAPI(title="tokenline central", version="0.1.0",
                  description="Token retrieval service: search frames by example image or text; originals.")
    app.state.engine, app.state.blobs, app.state.searcher, app.state.encoders = engine, blobs, searcher, encoders

    @app.middleware("http")
    async def _count(request: Request, call_next: Callable) -> Response:
        resp = await call_next(request)
        route = request.scope.get("route")
        metrics.count(getattr(route, "path", "unmatched"), resp.status_code)
        return resp

    @app.exception_handler(OriginalError)
    async def _orig_err(_r: Request, e: OriginalError) -> JSONResponse:
        return _err(e.status, e.reason, e.detail)

    @app.exception_handler(SearchError)
    async def _search_err(_r: Request, e: SearchError) -> JSONResponse:
        return _err(e.status, "bad_query", e.detail)

    @app.exception_handler(EncoderError)
    async def _enc_err(_r: Request, e: EncoderError) -> JSONResponse:
        return _err(e.status, e.reason, str(e))

    def require(*roles: str) -> Callable[..., Principal]:
        allowed = set(roles) | {"admin"}

        def dep(authorization: Optional[str] = Header(None)) -> Principal:
            if not authorization or not authorization.lower().startswith("bearer "):
                raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
            found = tokens.get(authorization[7:].strip())
            if found is None:
                raise HTTPException(401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
            if found[1] not in allowed:
                raise HTTPException(403, f"role {found[1]!r} may not do this (needs {sorted(allowed)})")
            return Principal(name=found[0], role=found[1])

        return dep

    viewer, device, admin = require("viewer"), require("device"), require()

    def _model(model_id: Optional[int]) -> store.ModelInfo:
        models = store.list_models(engine)
        if not models:
            raise SearchError(404, "no model is registered")
        if model_id is None:
            if len(models) > 1:
                raise SearchError(400, "several models are registered; say which with model_id")
            return models[0]
        for m in models:
            if m.id == model_id:
                return m
        raise SearchError(404, f"unknown model_id {model_id}")

    # -- health and metrics -------------------------------------------------------------------------
    @app.get("/healthz", tags=["ops"])
    def healthz() -> Dict[str, Any]:
        try:
            with engine.connect() as c:
                c.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - report any database failure as unhealthy
            raise HTTPException(503, f"database unavailable: {type(exc).__name__}") from None
        return {"status": "ok", "database": engine.dialect.name}

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def prometheus() -> str:
        return render_metrics(engine, metrics)

    # -- registry ------------------------------------------------------------------------------------
    @app.get("/v1/models", tags=["registry"])
    def models(_p: Principal = Depends(viewer)) -> Dict[str, Any]:
        return {"models": [m.public() for m in store.list_models(engine)]}

    @app.get("/v1/devices", tags=["registry"])
    def devices(_p: Principal = Depends(viewer)) -> Dict[str, Any]:
        return {"devices": store.list_devices(engine)}

    @app.post("/v1/tokens", tags=["ops"], status_code=201)
    def create_token(body: TokenBody, _p: Principal = Depends(admin)) -> Dict[str, Any]:
        """Create a bearer token (admins only); the token is returned once and stored hashed."""
        return {"name": body.name, "role": body.role, "token": store.create_token(engine, body.name, body.role)}

    @app.get("/v1/dead-letters", tags=["ops"])
    def dead_letters(limit: int = 100, _p: Principal = Depends(admin)) -> Dict[str, Any]:
        return {"dead_letters": store.list_dead_letters(engine, max(1, min(limit, 1000)))}

    # -- originals -----------------------------------------------------------------------------------
    @app.put("/v1/originals/{frame_id}", tags=["originals"], status_code=201)
    async def put_original(frame_id: str, request: Request,
                           x_tokenline_sha256: Optional[str] = Header(None),
                           content_type: Optional[str] = Header(None),
                           _p: Principal = Depends(device)) -> JSONResponse:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.originals.max_upload_bytes:
            raise OriginalError(413, "too_large", f"body is {declared} bytes, limit {cfg.originals.max_upload_bytes}")
        if content_type and content_type.split(";")[0].strip().lower() not in ("image/jpeg", "image/jpg"):
            raise OriginalError(400, "not_jpeg", f"Content-Type must be image/jpeg, got {content_type!r}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cfg.originals.max_upload_bytes:
                raise OriginalError(413, "too_large", f"body exceeds {cfg.originals.max_upload_bytes} bytes")
        res = store_original(engine, blobs, cfg.retention, frame_id, bytes(body), x_tokenline_sha256,
                             cfg.originals.max_upload_bytes)
        return JSONResponse({"frame_id": frame_id, "sha256": res.sha256, "expires_us": res.expires_us,
                             "stored": res.status == 201}, status_code=res.status)

    # -- frames --------------------------------------------------------------------------------------
    @app.get("/v1/frames/{frame_id}", tags=["frames"])
    def frame(frame_id: str, _p: Principal = Depends(viewer)) -> Dict[str, Any]:
        if not FRAME_ID_RE.match(frame_id):
            raise HTTPException(400, "frame_id must be 32 lowercase hex characters")
        fr = store.get_frame(engine, frame_id)
        with Session(engine) as s:
            o = s.get(Original, frame_id)
            orig = None if o is None else {"state": o.state, "bytes": o.bytes, "stored_us": o.stored_us,
                                           "expires_us": o.expires_us, "legal_hold": o.legal_hold,
                                           "deleted_reason": o.deleted_reason}
        if fr is None and orig is None:
            raise HTTPException(404, "unknown frame")
        return {"frame": fr.meta() if fr else None, "original": orig}

    @app.get("/v1/frames/{frame_id}/original", tags=["frames"], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 404: {}, 410: {}})
    def original(frame_id: str, _p: Principal = Depends(viewer)) -> Response:
        return Response(read_original(engine, blobs, frame_id), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=300"})

    @app.get("/v1/frames/{frame_id}/thumbnail", tags=["frames"], response_class=Response)
    def thumbnail(frame_id: str, size: int = 160, _p: Principal = Depends(viewer)) -> Response:
        data = read_original(engine, blobs, frame_id)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise HTTPException(422, "stored original does not decode")
        size = max(16, min(int(size), 512))
        h, w = img.shape[:2]
        s = size / max(h, w)
        small = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])
        return Response(buf.tobytes(), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})

    @app.put("/v1/frames/{frame_id}/hold", tags=["frames"])
    def hold(frame_id: str, body: HoldBody, _p: Principal = Depends(admin)) -> Dict[str, Any]:
        if not FRAME_ID_RE.match(frame_id):
            raise HTTPException(400, "frame_id must be 32 lowercase hex characters")
        if not store.set_legal_hold(engine, frame_id, body.hold):
            raise HTTPException(404, "unknown frame")
        return {"frame_id": frame_id, "legal_hold": body.hold}

    # -- search --------------------------------------------------------------------------------------
    @app.post("/v1/search", tags=["search"])
    async def search(image: Optional[UploadFile] = File(None), q: Optional[str] = Form(None),
                     like_frame: Optional[str] = Form(None), model_id: Optional[int] = Form(None),
                     k: int = Form(24), site: Optional[str] = Form(None), line: Optional[str] = Form(None),
                     camera: Optional[str] = Form(None), since_us: Optional[int] = Form(None),
                     until_us: Optional[int] = Form(None), rerank: Optional[bool] = Form(None),
                     rerank_weight: Optional[float] = Form(None),
                     _p: Principal = Depends(viewer)) -> Dict[str, Any]:
        """Search by an example image (multipart ``image``), a text (``q``) or a stored frame (``like_frame``)."""
        given = [x for x in (image, q, like_frame) if x not in (None, "")]
        if len(given) != 1:
            raise SearchError(400, "give exactly one of: image (file), q (text), like_frame (frame id)")
        t0 = time.perf_counter()
        if like_frame:
            fr = store.get_frame(engine, like_frame.strip().lower())
            if fr is None:
                raise SearchError(404, f"unknown frame {like_frame!r}")
            if model_id is not None and model_id != fr.model_id:
                raise SearchError(400, "like_frame belongs to another model; embeddings of different models "
                                       "are never compared")
            model = _model(fr.model_id)
            query = Query(model.id, fr.global_embedding, fr.tokens, fr.sizes, exclude_frame_id=fr.frame_id)
        else:
            model = _model(model_id)
            enc = encoders.get(model)
            if image is not None:
                data = await image.read()
                if len(data) > cfg.originals.max_upload_bytes:
                    raise SearchError(413, "image too large")
                out = enc.encode_image_bytes(data)
                query = Query(model.id, out.global_embedding, out.tokens, out.sizes)
            else:
                vec = enc.encode_text(q or "")
                query = Query(model.id, vec, vec[None, :], np.ones(1, np.float32))
        filters = Filters(site or None, line or None, camera or None, since_us, until_us)
        hits = searcher.search(model, query, k, filters, rerank=rerank, rerank_weight=rerank_weight)
        dt = time.perf_counter() - t0
        with metrics.lock:
            metrics.search_seconds_sum += dt
            metrics.search_count += 1
        return {"model": model.public(), "took_ms": round(dt * 1000, 2), "results": [h.public() for h in hits]}

    # -- page ----------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def render_metrics(engine: Engine, m: Metrics) -> str:
    """Prometheus text exposition: ingest counters (all workers), table gauges, this process's requests."""
    out = []

    def add(name: str, kind: str, help_: str, samples: list) -> None:
        out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}")
        for labels, v in samples:
            lab = ",".join(f'{k}="{str(x)}"' for k, x in labels.items())
            out.append(f"{name}{{{lab}}} {v}" if lab else f"{name} {v}")

    counters = store.counter_totals(engine)
    for name in sorted(counters):
        add(f"tokenline_{name}_total", "counter", f"{name.replace('_', ' ')} (all ingest workers and sweepers)",
            [({}, counters[name])])
    st = store.table_stats(engine)
    add("tokenline_frames", "gauge", "frames stored per model", [({"model_id": k}, v) for k, v in st["frames"].items()])
    add("tokenline_dead_letters", "gauge", "dead letters by reason",
        [({"reason": k}, v) for k, v in st["dead_letters"].items()])
    add("tokenline_originals", "gauge", "originals by state", [({"state": k}, v[0]) for k, v in st["originals"].items()])
    add("tokenline_originals_bytes", "gauge", "bytes of originals by state",
        [({"state": k}, v[1]) for k, v in st["originals"].items()])
    add("tokenline_devices", "gauge", "devices seen", [({}, st["devices"])])
    with m.lock:
        add("tokenline_http_requests_total", "counter", "HTTP requests by route and status",
            [({"route": r, "status": s}, v) for (r, s), v in sorted(m.requests.items())])
        add("tokenline_search_seconds_sum", "counter", "time spent answering searches", [({}, round(m.search_seconds_sum, 6))])
        add("tokenline_search_count", "counter", "searches answered", [({}, m.search_count)])
    return "\n".join(out) + "\n"
