"""FastAPI dependencies: the app's services, one database session per request, the caller by role.

The caller's bearer token is declared as OpenAPI's ``HTTPBearer`` security scheme (Swagger UI's "Authorize"),
and checked by ``central.auth`` (401 without a valid token, 403 for another role).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, Iterator, Optional

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from central.anomaly.builder import BankBuilder
from central.api.metrics import Metrics
from central.auth import Principal, TokenCache, authorize
from central.blobs import BlobStore
from central.commands import OriginalRequests
from central.config import CentralConfig
from central.encoder import EncoderPool
from central.images import ImagePool
from central.search import Searcher


@dataclass(frozen=True)
class Services:
    """What the routes share for the app's lifetime (``app.state.services``)."""

    cfg: CentralConfig
    engine: Engine
    blobs: BlobStore
    searcher: Searcher
    encoders: EncoderPool
    tokens: TokenCache
    metrics: Metrics
    images: ImagePool  # image decoding and encoding, off the event loop
    original_requests: OriginalRequests
    builder: BankBuilder  # reference sets' banks, built off the requests


def services(request: Request) -> Services:
    return request.app.state.services


def session(svc: Annotated[Services, Depends(services)]) -> Iterator[Session]:
    """A session for the request, closed after it; routes that write commit it themselves."""
    with Session(svc.engine) as s:
        yield s


BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                    description="a token from `tokenline-central create-token NAME --role viewer|device|admin` "
                                "(or POST /v1/tokens)")


def require(*roles: str) -> Callable[..., Principal]:
    """A dependency that admits a bearer token of one of ``roles`` (admins always)."""

    def dep(request: Request, _creds: Optional[HTTPAuthorizationCredentials] = Security(BEARER)) -> Principal:
        return authorize(services(request).tokens, request.headers.get("authorization"), roles)

    return dep


ServicesDep = Annotated[Services, Depends(services)]
SessionDep = Annotated[Session, Depends(session)]
Viewer = Annotated[Principal, Depends(require("viewer"))]
Device = Annotated[Principal, Depends(require("device"))]
Admin = Annotated[Principal, Depends(require())]
