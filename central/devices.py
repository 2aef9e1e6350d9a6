"""The devices as central sees them: status and the figures derived from the stats each edge publishes.

One place turns a device's last stats message (docs/protocol.md, stats) into what the devices page, the
``/v1/devices`` route and the per-device Prometheus gauges show: frames/s (sum of the cameras' rates), inference
time, backlog (outbox messages not yet confirmed) and the age of the oldest unconfirmed frame, drops. Fields a
device does not send (an older edge) are None.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from sqlalchemy.orm import Session

from central import store
from tokenline import topics


def _num(d: Any, *path: str) -> Optional[float]:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def derive(stats: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The figures of one stats document (None when the device sent none)."""
    if not isinstance(stats, dict):
        return {"stats_ts_us": None, "frames_per_s": None, "inference_ms_p50": None, "backlog": None,
                "oldest_unconfirmed_s": None, "drops": None, "problems": [], "cameras": {}}
    cams = stats.get("cameras") if isinstance(stats.get("cameras"), dict) else {}
    fps = [_num(c, "fps") for c in cams.values()]
    outbox = stats.get("outbox") if isinstance(stats.get("outbox"), dict) else {}
    backlog = _num(outbox, "awaiting_confirmation")  # protocol 2: sent but not yet confirmed by central
    pending = _num(outbox, "pending")
    if backlog is None:
        backlog = pending
    elif pending is not None:
        backlog = max(backlog, pending)
    drops = [_num(stats, "queues", "frames", "dropped"), _num(stats, "queues", "results", "dropped"),
             _num(outbox, "evicted")]
    ts = _num(stats, "ts")
    return {
        "stats_ts_us": None if ts is None else int(ts * 1e6),
        "frames_per_s": round(sum(f for f in fps if f is not None), 2) if any(f is not None for f in fps) else None,
        "inference_ms_p50": _num(stats, "inference", "latency_ms_p50"),
        "backlog": None if backlog is None else int(backlog),
        "oldest_unconfirmed_s": _num(outbox, "oldest_awaiting_s"),
        "drops": int(sum(d for d in drops if d is not None)) if any(d is not None for d in drops) else None,
        "problems": [str(p) for p in stats.get("problems", []) if isinstance(p, str)][:20],
        "cameras": {str(k): v for k, v in cams.items() if isinstance(v, dict)},
    }


def list_devices(session: Session) -> List[Dict[str, Any]]:
    """Every device with its status, ``online`` and the derived figures."""
    out = []
    for d in store.list_devices(session):
        out.append({**d, "online": d["status"] == topics.STATUS_ONLINE, **derive(d.get("last_stats"))})
    return out
