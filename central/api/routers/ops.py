"""Operations routes: health, Prometheus metrics, bearer tokens (admins), dead letters (admins)."""

from __future__ import annotations

from typing import Any, Dict, Literal

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text

from central import store
from central.api.deps import Admin, ServicesDep, SessionDep
from central.api.metrics import render_metrics
from central.errors import Unavailable

router = APIRouter(tags=["ops"])


class TokenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
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


@router.get("/v1/dead-letters")
def dead_letters(session: SessionDep, _p: Admin, limit: int = 100) -> Dict[str, Any]:
    return {"dead_letters": store.list_dead_letters(session, max(1, min(limit, 1000)))}
