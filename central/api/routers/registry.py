"""Registry routes: the registered models and the devices seen (viewers)."""

from __future__ import annotations

from typing import Any, Dict

from fastapi import APIRouter

from central import store
from central.api.deps import SessionDep, Viewer

router = APIRouter(tags=["registry"])


@router.get("/v1/models")
def models(session: SessionDep, _p: Viewer) -> Dict[str, Any]:
    return {"models": [m.public() for m in store.list_models(session)]}


@router.get("/v1/devices")
def devices(session: SessionDep, _p: Viewer) -> Dict[str, Any]:
    return {"devices": store.list_devices(session)}
