"""Operations routes: health, Prometheus metrics, who am I, bearer tokens (admins: create, list, revoke), dead
letters (admins)."""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import Field
from sqlalchemy import text

from central import store
from central.api.deps import Admin, ServicesDep, SessionDep, Viewer
from central.api.schemas import DeadLettersOut, HealthOut, MeOut, TokenOut, errors
from central.errors import NotFound, Unavailable
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


@router.get("/v1/tokens", responses=errors(401, 403))
def list_tokens(session: SessionDep, _p: Admin) -> Dict[str, Any]:
    """Every token (id, name, role, created, revoked, fingerprint); never the secret, which is not stored."""
    return {"tokens": store.list_tokens(session)}


@router.delete("/v1/tokens/{token_id}", responses=errors(401, 403, 404))
def revoke_token(token_id: int, session: SessionDep, svc: ServicesDep, _p: Admin) -> Dict[str, Any]:
    """Revoke a token: refused from now on by this process, by other API processes within their cache's seconds.
    Revoking a revoked token answers the same (idempotent); 404 for an unknown id."""
    store.revoke_tokens(session, token_id=token_id)
    session.commit()
    svc.tokens.clear()
    info = store.get_token(session, token_id)
    if info is None:
        raise NotFound(f"no token with id {token_id}")
    return info


@router.get("/v1/dead-letters", response_model=DeadLettersOut, responses=errors(401, 403))
def dead_letters(session: SessionDep, _p: Admin, limit: int = Query(100, ge=1, le=1000),
                 reason: Optional[str] = None) -> DeadLettersOut:
    """The latest dead letters, optionally of one reason; ``replayable`` ones kept their whole payload
    (``tokenline-central dead-letters replay``)."""
    return DeadLettersOut.model_validate({"dead_letters": store.list_dead_letters(session, limit, reason)})
