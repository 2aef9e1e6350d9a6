"""Drop log: every frame the edge loses, by kind, counted, logged as a warning and reported by /health while recent.

Kinds name where it happened, e.g. ``queue_full:cam1`` (a live camera's frame queue), ``results_full``,
``preprocess_error``, ``inference_error``, ``encode_error``, ``outbox_write_error``, ``outbox_evicted``,
``rejected_file``, ``original_not_stored``. A warning is logged at the first drop of a kind and then at most
every ``log_every_s`` with the count since the last one; ``recent()`` (drops within ``window_s``) becomes a
problem in the health snapshot, so the status reads ``degraded`` while frames are being lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

log = logging.getLogger(__name__)


class DropLog:
    """Thread-safe tally of dropped frames by kind (totals since start, and per-second buckets for ``recent``)."""

    def __init__(self, window_s: float = 60.0, log_every_s: float = 10.0) -> None:
        self.window_s, self.log_every_s = window_s, log_every_s
        self._lock = threading.Lock()
        self._totals: Dict[str, int] = {}
        self._buckets: Dict[str, Deque[List[float]]] = {}  # kind -> [[second, count], ...] within the window
        self._logged: Dict[str, Tuple[float, int]] = {}  # kind -> (last warning time, total at that warning)

    def add(self, kind: str, n: int = 1, detail: str = "", now: Optional[float] = None) -> None:
        if n <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            total = self._totals[kind] = self._totals.get(kind, 0) + n
            b = self._buckets.setdefault(kind, deque())
            second = float(int(now))
            if b and b[-1][0] == second:
                b[-1][1] += n
            else:
                b.append([second, n])
            self._trim(b, now)
            last = self._logged.get(kind)
            due = last is None or now - last[0] >= self.log_every_s
            if due:
                since = total - (last[1] if last else 0)
                self._logged[kind] = (now, total)
        if due:
            log.warning("dropped %d frame(s): %s%s (%d in total)", since, kind, f" ({detail})" if detail else "", total)

    def _trim(self, b: Deque[List[float]], now: float) -> None:
        while b and b[0][0] <= now - self.window_s:
            b.popleft()

    def totals(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._totals)

    def recent(self, now: Optional[float] = None) -> Dict[str, int]:
        """Drops by kind within the last ``window_s``."""
        now = time.monotonic() if now is None else now
        out = {}
        with self._lock:
            for kind, b in self._buckets.items():
                self._trim(b, now)
                n = int(sum(c for _, c in b))
                if n:
                    out[kind] = n
        return out

    def problems(self, now: Optional[float] = None) -> List[str]:
        return [f"{n} frame(s) dropped in the last {self.window_s:.0f}s: {kind}"
                for kind, n in sorted(self.recent(now).items())]
