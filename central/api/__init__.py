"""Central's HTTP API (FastAPI): ``create_app`` builds the services, includes the route modules, serves the page.

Layout: ``deps`` (services, a session per request, the caller by role), ``errors`` (domain errors to HTTP,
one handler), ``validation`` (unknown parameters refused, 422 naming the parameter), ``schemas`` (the typed
responses), ``metrics`` (Prometheus), ``routers/`` (ops, registry, originals, frames, search, anomaly, page and docs).
"""

from __future__ import annotations

from typing import Optional

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine

from central.anomaly.builder import BankBuilder
from central.api.deps import Services
from central.api.errors import error_response
from central.api.metrics import Metrics, count_requests
from central.api.routers import anomaly, frames, ops, originals, page, registry, search
from central.api.validation import reject_unknown, validation_error
from central.auth import TokenCache
from central.blobs import BlobStore
from central.commands import OriginalRequests
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
                   encoders=EncoderPool(cfg.search.providers), tokens=TokenCache(engine), metrics=Metrics(engine),
                   images=ImagePool(cfg.api.image_workers, cfg.api.image_queue), original_requests=OriginalRequests(cfg),
                   builder=BankBuilder(engine, cfg.anomaly))
    app = FastAPI(title="tokenline central", version="0.1.0", docs_url=None, redoc_url=None,
                  dependencies=[Depends(reject_unknown)],
                  description="Token retrieval service: search frames by example image or text; browse frames; "
                              "originals and their retention; devices. Every /v1 route takes a bearer token "
                              "(Authorize). Times are Unix microseconds (UTC).")
    app.state.services = svc
    app.router.on_startup.append(svc.builder.start)  # sets left without a bank when central stopped
    app.router.on_shutdown.append(svc.images.close)
    app.router.on_shutdown.append(svc.builder.close)
    count_requests(app, svc.metrics)
    app.add_exception_handler(CentralError, error_response)
    app.add_exception_handler(RequestValidationError, validation_error)
    for module in (ops, registry, originals, frames, search, anomaly, page):
        app.include_router(module.router)
    app.mount("/static/docs", StaticFiles(directory=page.DOCS_ASSETS), name="docs-assets")
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    return app
