"""MQTT topic names and command payloads of the tokenline v1 protocol: builders, filters and validating parsers.

Topics (documented in ``docs/protocol.md``)::

    tokenline/v1/<site>/<line>/<camera>/tokens   binary token messages (tokenline.wire), QoS 1
    tokenline/v1/<site>/<device>/status          retained "online" / "offline" (last will)
    tokenline/v1/<site>/<device>/stats           JSON counters, periodic
    tokenline/v1/<site>/<device>/cmd             JSON commands to the device

Every level is a name: ``[A-Za-z0-9_.-]{1,64}`` (so never a wildcard, ``/``, ``$`` or empty). ``NAME_PATTERN``
is that rule for everything that ends up in a topic level: the wire format's name fields and the device, site,
line and camera names (and central's subscription group) in both programs' configurations.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

from tokenline.frame_id import FRAME_ID_HEX

PREFIX = "tokenline/v1"
NAME_RULE = "[A-Za-z0-9_.-]{1,64}"
NAME_PATTERN = f"^{NAME_RULE}$"
NAME_RE = re.compile(NAME_PATTERN)

KIND_TOKENS = "tokens"
KIND_STATUS = "status"
KIND_STATS = "stats"
KIND_CMD = "cmd"

STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"

TOKENS_QOS = 1
# Subscription filters for consumers (central): all sites, or one site.
TOKENS_FILTER = f"{PREFIX}/+/+/+/{KIND_TOKENS}"
STATUS_FILTER = f"{PREFIX}/+/+/{KIND_STATUS}"
STATS_FILTER = f"{PREFIX}/+/+/{KIND_STATS}"

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
    """A parsed topic. ``line``/``camera`` are set for tokens, ``device`` for status/stats/cmd."""

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
    if len(rest) == 4 and rest[3] == KIND_TOKENS:
        return Topic(kind=KIND_TOKENS, site=_level("site", rest[0]), line=_level("line", rest[1]),
                     camera=_level("camera", rest[2]))
    if len(rest) == 3 and rest[2] in (KIND_STATUS, KIND_STATS, KIND_CMD):
        return Topic(kind=rest[2], site=_level("site", rest[0]), device=_level("device", rest[1]))
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
