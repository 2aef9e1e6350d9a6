"""The API's response documents (typed, in the OpenAPI spec). Times are Unix microseconds (UTC), ids 32 hex.

Listing items allow extra fields, so that a field another module adds to a frame (labels, a score) passes
through without being dropped by the response model; the fields named here are always there.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorOut(BaseModel):
    error: str = Field(description="machine-readable reason, e.g. bad_image, gone, invalid_parameter")
    detail: str = Field(description="for people: what is wrong and what to do")
    parameter: Optional[str] = Field(None, description="the request parameter at fault (422 invalid_parameter)")


ERRORS: Dict[int | str, Dict[str, Any]] = {code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 410, 413, 422,
                                                                                 500, 503)}


def errors(*codes: int) -> Dict[int | str, Dict[str, Any]]:
    """The ``responses=`` of a route: these error statuses and 422 (any route refuses unknown parameters), each
    with the ``ErrorOut`` body."""
    return {c: ERRORS[c] for c in sorted({*codes, 422})}


class HealthOut(BaseModel):
    status: Literal["ok"]
    database: str


class MeOut(BaseModel):
    name: str
    role: Literal["viewer", "device", "admin"]


class ModelOut(Out):
    id: int
    hash: str = Field(description="the manifest's 16-byte wire hash, hex")
    short_hash: str = Field(description="first 8 hex characters of hash (what people compare)")
    name: str
    embedding_dim: int
    k: int = Field(description="summary tokens per frame")
    has_text: bool
    searchable: bool = Field(description="this host has the model's files (can encode query images)")
    family: str
    merge: str
    registered_us: int
    input: Dict[str, Any] = Field(description="the encoder's input: width, height, resize (how a frame is fitted)")
    summary: Dict[str, Any] = Field(description="the summary head: method, token_dim, layer, footprint_grid, "
                                                "region_search (whether the model has footprints)")
    frames: int = 0
    last_capture_us: Optional[int] = None


class ModelsOut(BaseModel):
    models: List[ModelOut]


class DeviceOut(Out):
    device: str
    site: str
    status: str = Field(description="retained online / offline from the device, or unknown")
    online: bool
    first_seen_us: int
    last_seen_us: int
    stats_ts_us: Optional[int] = Field(None, description="when the device made its last stats")
    frames_per_s: Optional[float] = Field(None, description="sum of the cameras' frame rates")
    inference_ms_p50: Optional[float] = None
    backlog: Optional[int] = Field(None, description="messages in the device's outbox not yet confirmed")
    oldest_unconfirmed_s: Optional[float] = Field(None, description="age of the oldest frame awaiting confirmation")
    drops: Optional[int] = Field(None, description="frames dropped by overload or evicted from the outbox")
    problems: List[str] = []
    cameras: Dict[str, Dict[str, Any]] = {}
    last_stats: Optional[Dict[str, Any]] = None


class DevicesOut(BaseModel):
    now_us: int
    devices: List[DeviceOut]


class CameraOut(Out):
    site: str
    line: str
    camera: str
    device: str
    frames: int
    first_capture_us: int
    last_capture_us: int


class CamerasOut(BaseModel):
    cameras: List[CameraOut]


class FrameItem(Out):
    """A frame in a listing: metadata, no tokens."""

    frame_id: str
    model_id: int
    device: str
    site: str
    line: str
    camera: str
    capture_us: int
    received_us: int
    seq: int
    flags: int
    token_dtype: str
    source: Optional[str] = Field(None, description="the file the frame came from (file sources); null for cameras")
    labels: Optional[Dict[str, str]] = Field(None, description="the frame's labels (wire metadata)")
    legal_hold: bool
    k: int


class BrowseItem(FrameItem):
    original: Optional[Literal["kept", "deleting", "deleted"]] = Field(
        None, description="state of the original at central; null when none was uploaded")


class FramesOut(BaseModel):
    frames: List[BrowseItem]
    next_cursor: Optional[str] = Field(None, description="give it as cursor for the next page; null at the end")


class Match(Out):
    token: int
    sim: float
    x: float = Field(description="centroid of the token's patches, 0..1 of the model input's width")
    y: float
    size: float = Field(description="patches the token stands for")
    box: Optional[List[float]] = Field(None, description="x0,y0,x1,y1 of the token's footprint, fractions of the "
                                                         "original frame (models with footprints)")
    box_px: Optional[List[float]] = Field(None, description="box in the original frame's pixels; null when the "
                                                            "frame came without its geometry")
    cells: Optional[List[List[float]]] = Field(None, description="the footprint as boxes (fractions of the frame)")
    mask: Optional[Dict[str, Any]] = Field(None, description="the footprint on its grid: grid, rows of 0/1")


class SearchHit(FrameItem):
    score: float
    global_score: float
    maxsim: Optional[float] = None
    matches: List[Match] = []


class SearchOut(BaseModel):
    model: ModelOut
    took_ms: float
    results: List[SearchHit]
    next_cursor: Optional[str] = Field(None, description="give it as cursor, with the same query and filters, for "
                                                         "the next page; null at the end")


class CropQueryOut(BaseModel):
    kind: Literal["crop"]


class BoxQueryOut(BaseModel):
    kind: Literal["box"]
    frame_id: str = Field(description="the stored frame the box was drawn on (never its own result)")
    box: List[float] = Field(description="x0,y0,x1,y1, fractions of that frame")
    tokens: List[Dict[str, Any]] = Field(description="the frame's tokens the box drew on: token, weight")


class RegionHit(FrameItem):
    score: float
    match: Match


class RegionSearchOut(BaseModel):
    model: ModelOut
    took_ms: float
    query: Union[CropQueryOut, BoxQueryOut] = Field(discriminator="kind")
    results: List[RegionHit]


class FrameMeta(FrameItem):
    centroids: List[List[float]]
    sizes: List[float]
    footprint: Optional[Dict[str, Any]] = Field(None, description="token index per footprint cell: grid, tokens")
    geometry: Optional[Dict[str, Any]] = Field(None, description="the original frame's size, ROI and fitting")


class OriginalOut(Out):
    state: Literal["kept", "deleting", "deleted"]
    bytes: int
    stored_us: int
    expires_us: int
    legal_hold: bool
    deleted_reason: Optional[str] = None


class FrameOut(BaseModel):
    frame: Optional[FrameMeta] = Field(None, description="null when only the original is known (tokens expired)")
    original: Optional[OriginalOut] = None


class HoldOut(BaseModel):
    frame_id: str
    legal_hold: bool


class OriginalRequestOut(BaseModel):
    frame_id: str
    state: Literal["stored", "deleted", "queued_on_edge", "not_on_edge", "device_offline", "requested", "no_answer",
                   "failed", "none"]
    detail: str
    requested_us: Optional[int] = None
    device: Optional[str] = None
    request_id: Optional[str] = None


class StoredOut(BaseModel):
    frame_id: str
    sha256: str
    expires_us: int
    stored: bool


class TokenOut(BaseModel):
    name: str
    role: str
    token: str


class DeadLetterOut(Out):
    id: int
    received_us: int
    topic: str
    reason: str
    detail: str
    payload_len: int
    payload_sha256: str
    payload_head_hex: str


class DeadLettersOut(BaseModel):
    dead_letters: List[DeadLetterOut]
