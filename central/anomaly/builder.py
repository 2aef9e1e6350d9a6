"""Builds reference sets' banks in the background for the API: one thread working through a queue of set ids.

A set changed through the API is committed at once and its bank built here (``refsets.build_set``), so a request
does not wait tens of seconds for a large set, and the database is not held meanwhile. At start the builder takes up
every set left without a bank of its current version (central stopped during a build). A build that fails is
recorded on the set (``build_error``, state ``failed``) and logged; the service keeps running (a build that
could not read the database leaves the set ``building``: the next start takes it up). A set another central process
is building (``refsets.build_lock``) is looked at again every ``BUSY_RETRY_S`` (logged once, naming the holder):
built by then, or built here when that build was of a version since changed. On a read-only database (a search
replica) nothing is built: its primary's central builds.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Optional, Set

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from central.anomaly import refsets
from central.config import AnomalyConfig
from central.errors import Invalid, NotFound
from sql.db import is_read_only

log = logging.getLogger(__name__)
BUSY_RETRY_S = 2.0


class BankBuilder:
    """``submit(set_id)`` queues a build; the thread starts with the first submit (or ``start``)."""

    def __init__(self, engine: Engine, cfg: AnomalyConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self._queue: "queue.Queue[Optional[int]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._started = False
        self.read_only = False
        self._waiting: Set[int] = set()  # sets found busy elsewhere (logged once each)

    def start(self) -> None:
        """Start the thread and queue every set whose current version has no bank (nor a failed build); on a
        read-only database only say so."""
        with self._lock:
            if self._started:
                return
            self._started = True
            try:
                self.read_only = is_read_only(self.engine)
            except Exception:  # noqa: BLE001 - not reachable now: pending_sets below logs it
                pass
            if self.read_only:
                log.info("read-only database (a replica): reference-set banks are built by the primary's central")
                return
            self._thread = threading.Thread(target=self._run, name="bank-builder", daemon=True)
            self._thread.start()
        try:
            with Session(self.engine) as s:
                for set_id in refsets.pending_sets(s):
                    self._queue.put(set_id)
        except Exception:  # noqa: BLE001 - a database not reachable at start: builds resume with the next change
            log.exception("bank builder: cannot list the sets waiting for a bank")

    def submit(self, set_id: int) -> None:
        self.start()
        if not self.read_only:
            self._queue.put(set_id)

    def join(self) -> None:
        """Wait until every queued build is done (tests, shutdown)."""
        self._queue.join()

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the build under way, waiting at most ``timeout`` s (a set whose build is cut off stays
        ``building``: the next start builds it)."""
        self._closing.set()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            set_id = self._queue.get()
            try:
                if set_id is None:
                    return
                self._build(set_id)
            finally:
                self._queue.task_done()

    def _build(self, set_id: int) -> None:
        try:
            info = refsets.build_set(self.engine, self.cfg, set_id, wait=False)
            log.info("reference set %d %s: %s, %d bank tokens, threshold %.4f", set_id, info.name, info.state,
                     info.bank_tokens, info.threshold)
        except refsets.Busy as busy:
            # another process builds it, perhaps a version since changed: look again (queued before this one is
            # done, so join still waits for it)
            if set_id not in self._waiting:
                self._waiting.add(set_id)
                log.info("%s; looking again every %.0f s", busy, BUSY_RETRY_S)
            if not self._closing.wait(BUSY_RETRY_S):
                self._queue.put(set_id)
            return
        except NotFound:
            pass  # deleted meanwhile
        except Invalid as exc:
            log.warning("reference set %d: no bank: %s", set_id, exc)
        except Exception:  # noqa: BLE001 - one set's build must not stop the others'; build_set recorded a defect
            # on the set (state failed); a database that could not be read leaves it building, for the next start
            log.exception("reference set %d: bank build failed", set_id)
        self._waiting.discard(set_id)
