"""MQTT topic names and payloads of the tokenline protocol (commands, alerts): builders, filters, validating parsers.

Topics of protocol v2 (documented in ``docs/protocol.md``): every topic a device publishes or reads carries its
device id, so the broker binds identity (a device's credentials grant only ``tokenline/v2/<site>/<device>/...``)::

    tokenline/v2/<site>/<device>/tokens/<line>/<camera>   binary token messages (tokenline.wire), QoS 1
    tokenline/v2/<site>/<device>/status                   retained "online" / "offline" (last will)
    tokenline/v2/<site>/<device>/stats                    JSON counters, periodic
    tokenline/v2/<site>/<device>/cmd                      JSON commands to the device
    tokenline/v2/<site>/<device>/ack                      commit acknowledgements to the device (tokenline.acks)
    tokenline/v2/<site>/<device>/alert/<line>/<camera>    JSON anomaly alert (``Alert``), QoS 1, retained per camera

An alert names the device whose camera took the frame, whoever scored it: central publishes it for that device's
camera (its service users may publish on every alert topic), an edge scoring locally on its own topic (its
credentials grant only its own cameras' alert topics); alert readers subscribe to ``ALERTS_FILTER``.

Protocol v1 (edges from before the upgrade) used ``tokenline/v1/<site>/<line>/<camera>/tokens`` and
``tokenline/v1/<site>/<device>/status|stats|cmd``, without acknowledgements: ``parse_topic`` still reads it
(``Topic.version`` 1, ``device`` None for tokens) and the builders write it with ``version=1``.

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

PREFIX = "tokenline/v2"
PREFIX_V1 = "tokenline/v1"  # the layout of protocol v1 (no device in token topics, no acknowledgements)
PREFIXES = {1: PREFIX_V1, 2: PREFIX}
VERSIONS = (1, 2)
NAME_RULE = "[A-Za-z0-9_.-]{1,64}"
NAME_PATTERN = f"^{NAME_RULE}$"
NAME_RE = re.compile(NAME_PATTERN)

KIND_TOKENS = "tokens"
KIND_STATUS = "status"
KIND_STATS = "stats"
KIND_CMD = "cmd"
KIND_ACK = "ack"
KIND_ALERT = "alert"
DEVICE_KINDS = (KIND_STATUS, KIND_STATS, KIND_CMD, KIND_ACK)  # <prefix>/<site>/<device>/<kind>

STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"

TOKENS_QOS = 1
ACK_QOS = 1
ALERT_QOS = 1  # alerts are retained: a new subscriber sees each camera's latest alert at once
# Subscription filters for consumers (central): all sites and devices.
TOKENS_FILTER = f"{PREFIX}/+/+/{KIND_TOKENS}/+/+"
STATUS_FILTER = f"{PREFIX}/+/+/{KIND_STATUS}"
STATS_FILTER = f"{PREFIX}/+/+/{KIND_STATS}"
ALERTS_FILTER = f"{PREFIX}/+/+/{KIND_ALERT}/+/+"
V1_TOKENS_FILTER = f"{PREFIX_V1}/+/+/+/{KIND_TOKENS}"
V1_STATUS_FILTER = f"{PREFIX_V1}/+/+/{KIND_STATUS}"
V1_STATS_FILTER = f"{PREFIX_V1}/+/+/{KIND_STATS}"

COMMANDS = ("trigger", "pause", "resume", "request_original")
MAX_COMMAND_BYTES = 4096


class TopicError(ValueError):
    """A topic or command payload that is not part of the protocol; the message says which part."""


def _level(name: str, value: object) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise TopicError(f"{name} must match {NAME_RULE}, got {value!r:.80}")
    return value


def _prefix(version: int) -> str:
    if version not in PREFIXES:
        raise TopicError(f"protocol version must be one of {VERSIONS}, got {version!r}")
    return PREFIXES[version]


def tokens_topic(site: str, device: str, line: str, camera: str, version: int = 2) -> str:
    """The topic a device publishes a camera's token messages on (v1: without the device level)."""
    s, ln, c = _level("site", site), _level("line", line), _level("camera", camera)
    if version == 1:
        return f"{PREFIX_V1}/{s}/{ln}/{c}/{KIND_TOKENS}"
    return f"{_prefix(version)}/{s}/{_level('device', device)}/{KIND_TOKENS}/{ln}/{c}"


def alert_topic(site: str, device: str, line: str, camera: str) -> str:
    """The retained alert topic of a device's camera (protocol v2 only)."""
    return (f"{PREFIX}/{_level('site', site)}/{_level('device', device)}/{KIND_ALERT}/{_level('line', line)}/"
            f"{_level('camera', camera)}")


def device_topic(kind: str, site: str, device: str, version: int = 2) -> str:
    """``<prefix>/<site>/<device>/<kind>`` for status, stats, cmd and (v2 only) ack."""
    if kind not in DEVICE_KINDS or (kind == KIND_ACK and version == 1):
        raise TopicError(f"no {kind!r} topic in protocol v{version}")
    return f"{_prefix(version)}/{_level('site', site)}/{_level('device', device)}/{kind}"


def status_topic(site: str, device: str, version: int = 2) -> str:
    return device_topic(KIND_STATUS, site, device, version)


def stats_topic(site: str, device: str, version: int = 2) -> str:
    return device_topic(KIND_STATS, site, device, version)


def cmd_topic(site: str, device: str, version: int = 2) -> str:
    return device_topic(KIND_CMD, site, device, version)


def ack_topic(site: str, device: str) -> str:
    return device_topic(KIND_ACK, site, device)


def relayout(topic: str, device: str, version: int) -> str:
    """A token topic in the layout of protocol ``version``; a v1 topic lacks the device level, ``device`` fills it.
    Other topics come back unchanged (an edge moving the rows of its outbox across an upgrade or a downgrade)."""
    t = parse_topic(topic)
    if t.kind != KIND_TOKENS or t.version == version:
        return topic
    return tokens_topic(t.site, t.device or device, t.line or "", t.camera or "", version)


def tokens_filter(site: Optional[str] = None) -> str:
    """Subscription filter for token messages of one site (or all sites when ``site`` is None)."""
    return TOKENS_FILTER if site is None else f"{PREFIX}/{_level('site', site)}/+/{KIND_TOKENS}/+/+"


def shared(group: str, topic_filter: str) -> str:
    """An MQTT 5 shared subscription: the broker hands each message to one member of ``group``."""
    return f"$share/{_level('group', group)}/{topic_filter}"


@dataclass(frozen=True)
class Topic:
    """A parsed topic. ``line``/``camera`` are set for tokens and alerts; ``device`` for everything of v2 and for v1's
    status/stats/cmd (v1 token topics do not name the device)."""

    kind: str
    site: str
    line: Optional[str] = None
    camera: Optional[str] = None
    device: Optional[str] = None
    version: int = 2


def parse_topic(topic: str) -> Topic:
    """Validate and split a concrete topic name (v2 or v1); TopicError names the offending level."""
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a string, got {type(topic).__name__}")
    parts = topic.split("/")
    head = "/".join(parts[:2])
    if len(parts) < 2 or head not in (PREFIX, PREFIX_V1):
        raise TopicError(f"topic {topic!r:.120} does not start with {PREFIX}/ or {PREFIX_V1}/")
    rest = parts[2:]
    if head == PREFIX:
        if len(rest) == 5 and rest[2] in (KIND_TOKENS, KIND_ALERT):
            return Topic(kind=rest[2], site=_level("site", rest[0]), device=_level("device", rest[1]),
                         line=_level("line", rest[3]), camera=_level("camera", rest[4]))
        if len(rest) == 3 and rest[2] in DEVICE_KINDS:
            return Topic(kind=rest[2], site=_level("site", rest[0]), device=_level("device", rest[1]))
        raise TopicError(f"topic {topic!r:.120} is not <site>/<device>/tokens|alert/<line>/<camera> or "
                         f"<site>/<device>/{'|'.join(DEVICE_KINDS)}")
    if len(rest) == 4 and rest[3] == KIND_TOKENS:
        return Topic(kind=KIND_TOKENS, site=_level("site", rest[0]), line=_level("line", rest[1]),
                     camera=_level("camera", rest[2]), version=1)
    if len(rest) == 3 and rest[2] in (KIND_STATUS, KIND_STATS, KIND_CMD):
        return Topic(kind=rest[2], site=_level("site", rest[0]), device=_level("device", rest[1]), version=1)
    raise TopicError(f"topic {topic!r:.120} is not <site>/<line>/<camera>/tokens or <site>/<device>/status|stats|cmd")


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
    hash (32 hex, as on the wire). ``device`` took the frame. Published retained on ``alert_topic`` of the
    frame's camera."""

    frame_id: str
    site: str
    device: str
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
        return alert_topic(self.site, self.device, self.line, self.camera)


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
    for key in ("site", "device", "line", "camera"):
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
