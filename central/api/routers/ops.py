"""Operations routes: health, Prometheus metrics, bearer tokens (admins: create, list, revoke), dead letters (admins)."""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import Field
from sqlalchemy import text

from central import store
from central.api.deps import Admin, ServicesDep, SessionDep
from central.api.metrics import render_metrics
from central.errors import NotFound, Unavailable
from tokenline.documents import StrictModel
from tokenline.topics import NAME_PATTERN

router = APIRouter(tags=["ops"])


class TokenBody(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    role: Literal["viewer", "device", "admin"]


@router.get("/healthz")
def healthz(session: SessionDep) -> Dict[str, Any]:
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - report any database failure as unhealthy
        raise Unavailable(f"database unavailable: {type(exc).__name__}") from None
    return {"status": "ok", "database": session.get_bind().dialect.name}


@router.get("/metrics", response_class=PlainTextResponse)
def prometheus(session: SessionDep, svc: ServicesDep) -> str:
    return render_metrics(session, svc.metrics)


@router.post("/v1/tokens", status_code=201)
def create_token(body: TokenBody, session: SessionDep, _p: Admin) -> Dict[str, Any]:
    """Create a bearer token (admins only); the token is returned once and stored hashed."""
    token = store.create_token(session, body.name, body.role)
    session.commit()
    return {"name": body.name, "role": body.role, "token": token}


@router.get("/v1/tokens")
def list_tokens(session: SessionDep, _p: Admin) -> Dict[str, Any]:
    """Every token (id, name, role, created, revoked, fingerprint); never the secret, which is not stored."""
    return {"tokens": store.list_tokens(session)}


@router.delete("/v1/tokens/{token_id}")
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


@router.get("/v1/dead-letters")
def dead_letters(session: SessionDep, _p: Admin, limit: int = 100, reason: Optional[str] = None) -> Dict[str, Any]:
    """The latest dead letters, optionally of one reason; ``replayable`` ones kept their whole payload
    (``tokenline-central dead-letters replay``)."""
    return {"dead_letters": store.list_dead_letters(session, max(1, min(limit, 1000)), reason)}
