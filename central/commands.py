"""Asking an edge for an original: publish ``request_original`` on the device's command topic, then follow it.

``OriginalRequests.request`` publishes the command (MQTT 5, QoS 1) with a request id and remembers it in this
process; ``progress`` tells where it stands from what central already receives, with no new protocol:

==================  =========================================================================================
``stored``          the original arrived (``PUT /v1/originals/{id}``): done
``queued_on_edge``  the device's stats list the request as queued for upload (``commands.recent``)
``not_on_edge``     the device answered that it does not keep that JPEG (deleted by ``originals.max_age_s``...)
``device_offline``  the broker had no subscriber for the device's command topic (PUBACK 0x10), or its status
                    is ``offline``
``requested``       the broker accepted the command; waiting for the device
``no_answer``       nothing after ``api.original_request_timeout_s``
``failed``          the command could not be published (broker unreachable, not authorized): ``detail`` says why
==================  =========================================================================================

The command goes to the device's protocol 2 command topic (``tokenline/v2/<site>/<device>/cmd``), and to its
protocol 1 topic when nobody subscribes to that one and ``ingest.accept_protocol_v1`` is on. It is published by a
short-lived client of its own (``api.command_client_id``, default ``<mqtt.client_id>-api``; with
``api.command_username``, as that broker user: the generated broker configuration's ``apis`` role, which may
publish commands and nothing else): a connection per request, clean start, no session, so it never takes over
an ingest worker's persistent session. Requests are kept in memory for the serving process (a restart forgets them; the
original still arrives and the state then reads ``stored``).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Dict, Optional

from sqlalchemy.orm import Session

from central import store
from central.config import CentralConfig
from central.errors import NotFound, Unavailable
from sql.models import Device
from tokenline import topics

log = logging.getLogger(__name__)
NO_MATCHING_SUBSCRIBERS = 0x10


@dataclass
class Request:
    frame_id: str
    device: str
    site: str
    request_id: str
    requested_us: int
    by: str
    publish_code: int = -1  # MQTT 5 PUBACK reason code; -1 until known
    error: Optional[str] = None


def publish_command(cfg: CentralConfig, topic: str, payload: bytes, timeout_s: float = 10.0) -> int:
    """Publish one QoS 1 message on a fresh connection and return the PUBACK's reason code;
    ``Unavailable`` when the broker cannot be reached or refuses the connection."""
    from runtime.mqtt import make_client

    client_id = cfg.api.command_client_id or f"{cfg.mqtt.client_id}-api"
    conn = cfg.mqtt
    if cfg.api.command_username is not None:  # the broker user of the API (inventory `apis`): commands only
        conn = conn.model_copy(update={"username": cfg.api.command_username, "password": cfg.api.command_password,
                                       "password_file": cfg.api.command_password_file})
    c = make_client(conn, client_id, reconnect_on_failure=False)
    done = threading.Event()
    result: Dict[str, Any] = {}

    def on_connect(_c, _u, _f, rc, _p) -> None:  # noqa: ANN001 - paho's signature
        result["connect"] = rc
        if rc.is_failure:
            done.set()

    def on_publish(_c, _u, _mid, rc, _p) -> None:  # noqa: ANN001
        result["puback"] = int(rc.value)
        done.set()

    c.on_connect, c.on_publish = on_connect, on_publish
    m = cfg.mqtt
    try:
        c.connect(m.host, m.port, keepalive=max(5, m.keepalive_s), clean_start=True)
    except OSError as exc:
        raise Unavailable(f"cannot reach the MQTT broker {m.host}:{m.port}: {exc}", reason="broker_unavailable") from None
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1)
        if not done.wait(timeout_s):
            raise Unavailable(f"the MQTT broker {m.host}:{m.port} did not acknowledge the command within {timeout_s:g}s",
                              reason="broker_unavailable")
        rc = result.get("connect")
        if rc is not None and rc.is_failure:
            raise Unavailable(f"the MQTT broker refused central's command client {client_id!r}: {rc}",
                              reason="broker_refused")
        return int(result["puback"])
    finally:
        c.disconnect()
        c.loop_stop()


class OriginalRequests:
    """The requests this process sent, by frame id, and their progress (module docstring)."""

    def __init__(self, cfg: CentralConfig) -> None:
        self.cfg = cfg
        self._by_frame: Dict[str, Request] = {}
        self._lock = threading.Lock()

    def request(self, session: Session, frame_id: str, by: str) -> Dict[str, Any]:
        """Ask the frame's device for its original (unless central has it already); returns ``progress``."""
        fid = store.check_frame_id(frame_id)
        orig = store.get_original(session, fid)
        if orig is not None:  # kept here, or deleted by retention (the edge's upload would be refused: 410)
            return self.progress(session, fid)
        fr = store.get_frame(session, fid)
        if fr is None:
            raise NotFound("unknown frame")
        req = Request(fid, fr.device, fr.site, secrets.token_hex(8), store.now_us(), by)
        try:
            cmd = topics.Command(action="request_original", frame_id=fid, request_id=req.request_id)
            req.publish_code = publish_command(self.cfg, topics.cmd_topic(fr.site, fr.device), cmd.to_json())
            if req.publish_code == NO_MATCHING_SUBSCRIBERS and self.cfg.ingest.accept_protocol_v1:
                # nobody on the device's protocol 2 command topic: an edge not upgraded yet listens on protocol 1's
                req.publish_code = publish_command(self.cfg, topics.cmd_topic(fr.site, fr.device, version=1),
                                                   cmd.to_json())
        except Unavailable as exc:
            req.error = exc.detail
        log.info("original of %s requested from %s/%s by %s: %s", fid, fr.site, fr.device, by,
                 req.error or f"PUBACK 0x{req.publish_code:02x}")
        with self._lock:
            self._by_frame[fid] = req
            if len(self._by_frame) > 10000:  # bounded: forget the oldest
                for k in sorted(self._by_frame, key=lambda k: self._by_frame[k].requested_us)[:1000]:
                    del self._by_frame[k]
        return self.progress(session, fid)

    def progress(self, session: Session, frame_id: str) -> Dict[str, Any]:
        """Where the request for ``frame_id`` stands; ``NotFound`` when none was made and the original is absent."""
        fid = store.check_frame_id(frame_id)
        with self._lock:
            req = self._by_frame.get(fid)
        orig = store.get_original(session, fid)
        out: Dict[str, Any] = {"frame_id": fid, "state": "none", "detail": "", "requested_us": None,
                               "device": None, "request_id": None}
        if req is not None:
            out.update(requested_us=req.requested_us, device=req.device, request_id=req.request_id)
        if orig is not None and orig.state == "kept":
            out.update(state="stored", detail="the original is at central")
            return out
        if orig is not None:
            out.update(state="deleted", detail="central deleted this original by its retention policy; it is not "
                                               "requested again")
            return out
        if req is None:
            raise NotFound("no request for this frame's original was made here", reason="no_request")
        if req.error is not None:
            out.update(state="failed", detail=req.error)
            return out
        dev = session.get(Device, req.device)
        answer = _edge_answer(dev.last_stats if dev is not None else None, req.request_id)
        if answer is not None and answer.get("result") == "failed":
            out.update(state="not_on_edge", detail=f"the edge answered: {answer.get('detail') or 'not kept'}")
        elif answer is not None:
            out.update(state="queued_on_edge", detail="the edge queued the upload")
        elif req.publish_code == NO_MATCHING_SUBSCRIBERS or (dev is not None and dev.status == topics.STATUS_OFFLINE):
            out.update(state="device_offline", detail=f"device {req.device} is not connected; the command was not "
                                                      "delivered (request again when it is back online)")
        elif req.publish_code >= 0x80:
            out.update(state="failed", detail=f"the broker refused the command (reason code 0x{req.publish_code:02x}); "
                                              "check the broker's grants for central's command client")
        elif (store.now_us() - req.requested_us) / 1e6 > self.cfg.api.original_request_timeout_s:
            out.update(state="no_answer", detail=f"no upload after {self.cfg.api.original_request_timeout_s:g}s; "
                                                 "the edge may not keep this frame any more")
        else:
            out.update(state="requested", detail=f"command sent to {req.site}/{req.device}; waiting for the upload")
        return out


def _edge_answer(stats_json: Optional[str], request_id: str) -> Optional[Dict[str, Any]]:
    """The device's answer to ``request_id`` in its last stats (``commands.recent``), if it is there yet."""
    if not stats_json:
        return None
    try:
        recent = (json.loads(stats_json).get("commands") or {}).get("recent") or []
    except (ValueError, AttributeError):
        return None
    for entry in recent:
        if isinstance(entry, dict) and entry.get("request_id") == request_id:
            return entry
    return None
