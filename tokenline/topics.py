"""MQTT topic names and payloads of the tokenline v1 protocol (commands, alerts): builders, filters, parsers.

Topics (documented in ``docs/protocol.md``)::

    tokenline/v1/<site>/<line>/<camera>/tokens   binary token messages (tokenline.wire), QoS 1
    tokenline/v1/<site>/<line>/<camera>/alert    JSON anomaly alert (``Alert``), QoS 1, retained per camera
    tokenline/v1/<site>/<device>/status          retained "online" / "offline" (last will)
    tokenline/v1/<site>/<device>/stats           JSON counters, periodic
    tokenline/v1/<site>/<device>/cmd             JSON commands to the device

Every level is a name: ``[A-Za-z0-9_.-]{1,64}`` (so never a wildcard, ``/``, ``$`` or empty). ``NAME_PATTERN``
is that rule for everything that ends up in a topic level: the wire format's name fields and the device, site,
line and camera names (and central's subscription group) in both programs' configurations.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

from tokenline.frame_id import FRAME_ID_HEX

PREFIX = "tokenline/v1"
NAME_RULE = "[A-Za-z0-9_.-]{1,64}"
NAME_PATTERN = f"^{NAME_RULE}$"
NAME_RE = re.compile(NAME_PATTERN)

KIND_TOKENS = "tokens"
KIND_ALERT = "alert"
KIND_STATUS = "status"
KIND_STATS = "stats"
KIND_CMD = "cmd"

STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"

TOKENS_QOS = 1
ALERT_QOS = 1  # alerts are retained: a new subscriber sees each camera's latest alert at once
# Subscription filters for consumers (central): all sites, or one site.
TOKENS_FILTER = f"{PREFIX}/+/+/+/{KIND_TOKENS}"
STATUS_FILTER = f"{PREFIX}/+/+/{KIND_STATUS}"
STATS_FILTER = f"{PREFIX}/+/+/{KIND_STATS}"
ALERTS_FILTER = f"{PREFIX}/+/+/+/{KIND_ALERT}"

COMMANDS = ("trigger", "pause", "resume", "request_original")
MAX_COMMAND_BYTES = 4096


class TopicError(ValueError):
    """A topic or command payload that is not part of the protocol; the message says which part."""


def _level(name: str, value: object) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise TopicError(f"{name} must match {NAME_RULE}, got {value!r:.80}")
    return value


def tokens_topic(site: str, line: str, camera: str) -> str:
    return f"{PREFIX}/{_level('site', site)}/{_level('line', line)}/{_level('camera', camera)}/{KIND_TOKENS}"


def alert_topic(site: str, line: str, camera: str) -> str:
    return f"{PREFIX}/{_level('site', site)}/{_level('line', line)}/{_level('camera', camera)}/{KIND_ALERT}"


def status_topic(site: str, device: str) -> str:
    return f"{PREFIX}/{_level('site', site)}/{_level('device', device)}/{KIND_STATUS}"


def stats_topic(site: str, device: str) -> str:
    return f"{PREFIX}/{_level('site', site)}/{_level('device', device)}/{KIND_STATS}"


def cmd_topic(site: str, device: str) -> str:
    return f"{PREFIX}/{_level('site', site)}/{_level('device', device)}/{KIND_CMD}"


def tokens_filter(site: Optional[str] = None) -> str:
    """Subscription filter for token messages of one site (or all sites when ``site`` is None)."""
    return TOKENS_FILTER if site is None else f"{PREFIX}/{_level('site', site)}/+/+/{KIND_TOKENS}"


@dataclass(frozen=True)
class Topic:
    """A parsed topic. ``line``/``camera`` are set for tokens and alerts, ``device`` for status/stats/cmd."""

    kind: str
    site: str
    line: Optional[str] = None
    camera: Optional[str] = None
    device: Optional[str] = None


def parse_topic(topic: str) -> Topic:
    """Validate and split a concrete topic name; TopicError names the offending level."""
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a string, got {type(topic).__name__}")
    parts = topic.split("/")
    if len(parts) < 2 or "/".join(parts[:2]) != PREFIX:
        raise TopicError(f"topic {topic!r:.120} does not start with {PREFIX}/")
    rest = parts[2:]
    if len(rest) == 4 and rest[3] in (KIND_TOKENS, KIND_ALERT):
        return Topic(kind=rest[3], site=_level("site", rest[0]), line=_level("line", rest[1]),
                     camera=_level("camera", rest[2]))
    if len(rest) == 3 and rest[2] in (KIND_STATUS, KIND_STATS, KIND_CMD):
        return Topic(kind=rest[2], site=_level("site", rest[0]), device=_level("device", rest[1]))
    raise TopicError(f"topic {topic!r:.120} is not <site>/<line>/<camera>/tokens|alert or "
                     "<site>/<device>/status|stats|cmd")


@dataclass(frozen=True)
class Command:
    """A command to a device. ``camera`` None means every camera; ``frame_id`` (32 hex) for request_original."""

    action: str
    camera: Optional[str] = None
    frame_id: Optional[str] = None
    request_id: Optional[str] = None

    def to_json(self) -> bytes:
        d: Dict[str, Any] = {"action": self.action}
        for key in ("camera", "frame_id", "request_id"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return json.dumps(d, separators=(",", ":")).encode("utf-8")


def parse_command(payload: bytes) -> Command:
    """Validate a JSON command payload: ``{"action": ..., "camera"?: ..., "frame_id"?: ..., "request_id"?: ...}``."""
    if not isinstance(payload, (bytes, bytearray)):
        raise TopicError("command payload must be bytes")
    if len(payload) > MAX_COMMAND_BYTES:
        raise TopicError(f"command payload is {len(payload)} bytes, limit {MAX_COMMAND_BYTES}")
    try:
        data = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TopicError(f"command is not UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TopicError("command must be a JSON object")
    unknown = set(data) - {"action", "camera", "frame_id", "request_id"}
    if unknown:
        raise TopicError(f"command has unknown keys: {sorted(unknown)}")
    action = data.get("action")
    if action not in COMMANDS:
        raise TopicError(f"command action must be one of {COMMANDS}, got {action!r:.40}")
    camera = data.get("camera")
    if camera is not None:
        _level("camera", camera)
    frame_id = data.get("frame_id")
    if action == "request_original":
        if not isinstance(frame_id, str) or not FRAME_ID_HEX.fullmatch(frame_id):
            raise TopicError("request_original needs frame_id: 32 lowercase hex characters")
    elif frame_id is not None:
        raise TopicError(f"frame_id is only valid with request_original, not {action}")
    request_id = data.get("request_id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 128):
        raise TopicError("request_id must be a string of at most 128 characters")
    return Command(action=action, camera=camera, frame_id=frame_id, request_id=request_id)


# -- anomaly alerts ------------------------------------------------------------------------------------------
ALERT_SOURCES = ("central", "edge")
MAX_ALERT_BYTES = 4096
_HASH32 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Alert:
    """An anomaly alert: a frame whose anomaly score is over its reference set's threshold.

    ``box`` is the most anomalous token's region (x0, y0, x1, y1) in [0, 1] of the model input; ``source`` says
    who scored it (central, or the edge against a bank exported from central); ``model`` is the frame's manifest
    hash (32 hex, as on the wire). Published retained on ``alert_topic`` of the frame's camera."""

    frame_id: str
    site: str
    line: str
    camera: str
    capture_us: int
    score: float
    threshold: float
    reference_set: int
    set_version: int
    token: int
    box: Tuple[float, float, float, float]
    source: str
    model: str

    def to_json(self) -> bytes:
        d = asdict(self)
        d["score"], d["threshold"] = round(self.score, 6), round(self.threshold, 6)
        d["box"] = [round(float(v), 4) for v in self.box]
        return json.dumps(d, separators=(",", ":"), sort_keys=True).encode("utf-8")

    @property
    def topic(self) -> str:
        return alert_topic(self.site, self.line, self.camera)


def parse_alert(payload: bytes) -> Alert:
    """Validate an alert payload (``Alert.to_json``); TopicError names the first field that is wrong."""
    if not isinstance(payload, (bytes, bytearray)) or len(payload) > MAX_ALERT_BYTES:
        raise TopicError(f"alert payload must be bytes of at most {MAX_ALERT_BYTES}")
    try:
        data = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TopicError(f"alert is not UTF-8 JSON: {exc}") from None
    fields = set(Alert.__dataclass_fields__)
    if not isinstance(data, dict) or set(data) != fields:
        got = set(data) if isinstance(data, dict) else set()
        raise TopicError(f"alert must have exactly the keys {sorted(fields)}; missing {sorted(fields - got)}, "
                         f"unknown {sorted(got - fields)}")
    if not isinstance(data["frame_id"], str) or not FRAME_ID_HEX.fullmatch(data["frame_id"]):
        raise TopicError("alert frame_id must be 32 lowercase hex characters")
    for key in ("site", "line", "camera"):
        _level(key, data[key])
    for key in ("capture_us", "reference_set", "set_version", "token"):
        if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < (-1 if key == "token" else 0):
            raise TopicError(f"alert {key} must be an integer >= {-1 if key == 'token' else 0}")
    for key in ("score", "threshold"):
        if not isinstance(data[key], (int, float)) or isinstance(data[key], bool) or not math.isfinite(data[key]):
            raise TopicError(f"alert {key} must be a finite number")
    box = data["box"]
    if (not isinstance(box, list) or len(box) != 4 or
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in box)):
        raise TopicError("alert box must be [x0, y0, x1, y1] in [0, 1]")
    if data["source"] not in ALERT_SOURCES:
        raise TopicError(f"alert source must be one of {ALERT_SOURCES}")
    if not isinstance(data["model"], str) or not _HASH32.match(data["model"]):
        raise TopicError("alert model must be 32 lowercase hex characters")
    data["box"] = tuple(float(v) for v in box)
    data["score"], data["threshold"] = float(data["score"]), float(data["threshold"])
    return Alert(**data)
