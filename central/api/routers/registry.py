"""Registry routes: the registered models, the devices seen and the cameras with frames (viewers)."""

from __future__ import annotations

from fastapi import APIRouter

from central import devices, store
from central.api.deps import SessionDep, Viewer
from central.api.schemas import CamerasOut, DevicesOut, ModelsOut, errors

router = APIRouter(tags=["registry"])


@router.get("/v1/models", response_model=ModelsOut, responses=errors(401, 403))
def models(session: SessionDep, _p: Viewer) -> ModelsOut:
    """Registered models with their frame counts; label them by name, short hash and registration date (two
    exports of one checkpoint share a name)."""
    usage = store.model_usage(session)
    out = []
    for m in store.list_models(session):
        n, last = usage.get(m.id, (0, None))
        out.append({**m.public(), "frames": n, "last_capture_us": last})
    return ModelsOut.model_validate({"models": out})


@router.get("/v1/devices", response_model=DevicesOut, responses=errors(401, 403))
def list_devices(session: SessionDep, _p: Viewer) -> DevicesOut:
    """Every device: retained status, first/last seen, and from its last stats frames/s, inference time, backlog,
    oldest unconfirmed frame, drops and problems (``central.devices``)."""
    return DevicesOut.model_validate({"now_us": store.now_us(), "devices": devices.list_devices(session)})


@router.get("/v1/cameras", response_model=CamerasOut, responses=errors(401, 403))
def cameras(session: SessionDep, _p: Viewer) -> CamerasOut:
    """Every site/line/camera with frames (counts, first and last capture): what the filters can name."""
    return CamerasOut.model_validate({"cameras": store.list_cameras(session)})
