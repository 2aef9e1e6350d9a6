"""Central's HTTP API (FastAPI): ``create_app`` builds the services, includes the route modules, serves the page.

Layout: ``deps`` (services, a session per request, the caller by role), ``errors`` (domain errors to HTTP,
one handler), ``metrics`` (request counting and the Prometheus text), ``routers/`` (ops, registry,
originals, frames, search, anomaly, page).
"""

from __future__ import annotations

from typing import Optional

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine

from central.api.deps import Services
from central.api.errors import error_response
from central.api.metrics import Metrics, count_requests
from central.api.routers import anomaly, frames, ops, originals, page, registry, search
from central.auth import TokenCache
from central.blobs import BlobStore
from central.config import CentralConfig
from central.encoder import EncoderPool
from central.errors import CentralError
from central.images import ImagePool
from central.search import Searcher
from sql.db import make_engine


def create_app(cfg: CentralConfig, engine: Optional[Engine] = None) -> FastAPI:
    """Build the app; ``engine`` defaults to ``cfg.database.url`` (the schema must be migrated)."""
    engine = engine or make_engine(cfg.database.url)
    svc = Services(cfg=cfg, engine=engine, blobs=BlobStore(cfg.originals.root), searcher=Searcher(engine, cfg.search),
                   encoders=EncoderPool(cfg.search.providers), tokens=TokenCache(engine), metrics=Metrics(),
                   images=ImagePool(cfg.api.image_workers, cfg.api.image_queue))
    app = FastAPI(title="tokenline central", version="0.1.0",
                  description="Token retrieval service: search frames by example image or text; originals.")
    app.state.services = svc
    app.router.on_shutdown.append(svc.images.close)
    count_requests(app, svc.metrics)
    app.add_exception_handler(CentralError, error_response)
    for module in (ops, registry, originals, frames, search, anomaly, page):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    return app
