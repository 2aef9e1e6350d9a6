"""Operations routes: health, Prometheus metrics, who am I, bearer tokens (admins), dead letters (admins)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import Field
from sqlalchemy import text

from central import store
from central.api.deps import Admin, ServicesDep, SessionDep, Viewer
from central.api.schemas import DeadLettersOut, HealthOut, MeOut, TokenOut, errors
from central.errors import Unavailable
from runtime.metrics import CONTENT_TYPE
from tokenline.documents import StrictModel
from tokenline.topics import NAME_PATTERN

router = APIRouter(tags=["ops"])


class TokenBody(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    role: Literal["viewer", "device", "admin"]


@router.get("/healthz", response_model=HealthOut, responses=errors(503))
def healthz(session: SessionDep) -> HealthOut:
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - report any database failure as unhealthy
        raise Unavailable(f"database unavailable: {type(exc).__name__}") from None
    return HealthOut(status="ok", database=session.get_bind().dialect.name)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
def prometheus(svc: ServicesDep) -> Response:
    """Prometheus text exposition (docs/central.md, "Metrics")."""
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/me", response_model=MeOut, responses=errors(401))
def me(p: Viewer) -> MeOut:
    """The caller's token name and role (the page shows admin controls to admins)."""
    return MeOut(name=p.name, role=p.role)


@router.post("/v1/tokens", status_code=201, response_model=TokenOut, responses=errors(401, 403, 422))
def create_token(body: TokenBody, session: SessionDep, _p: Admin) -> TokenOut:
    """Create a bearer token (admins only); the token is returned once and stored hashed."""
    token = store.create_token(session, body.name, body.role)
    session.commit()
    return TokenOut(name=body.name, role=body.role, token=token)


@router.get("/v1/dead-letters", response_model=DeadLettersOut, responses=errors(401, 403, 422))
def dead_letters(session: SessionDep, _p: Admin, limit: int = Query(100, ge=1, le=1000)) -> DeadLettersOut:
    return DeadLettersOut.model_validate({"dead_letters": store.list_dead_letters(session, limit)})
