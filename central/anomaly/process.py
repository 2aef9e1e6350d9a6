"""The scorer beside an ingest worker: a child process that scores the queue (``scoring.Scorer``), watched and
restarted by the worker, its alerts published through the worker's MQTT client and webhook.

Scoring in a process of its own keeps it off the ingest path (and off the worker's interpreter lock): ingest
commits a frame and its queue row, the scorer follows on another core. The child exits when the worker does (it
watches its parent); a child that dies is restarted with backoff, and what it had not committed is still queued.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from sqlalchemy import Engine

from central.anomaly.alerts import AlertPublisher
from central.config import AnomalyConfig

log = logging.getLogger(__name__)

# One BLAS thread in the scorer: numpy's default of one per core would take the worker's core too (measured: with
# it, the scorer beside an in-process ingest cost that ingest 35-45% of its rate; a one-thread load, nothing)
BLAS_THREADS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Processes started inside run their BLAS with one thread: the child inherits these variables and its numpy
    reads them when it loads (the parent's own numpy has read them already)."""
    saved = {k: os.environ.get(k) for k in BLAS_THREADS}
    os.environ.update(BLAS_THREADS)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _child(url: str, cfg_json: str, name: str, conn, parent: int, level: int) -> None:  # noqa: ANN001 - a Connection
    from runtime.logs import FORMAT
    from sql.db import make_engine

    from central.anomaly.scoring import Scorer

    logging.basicConfig(level=level, format=FORMAT)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the worker, which stops us
    cfg = AnomalyConfig.model_validate_json(cfg_json)
    scorer = Scorer(make_engine(url), cfg, name, alerts=conn.send)
    log.info("scorer %r started (pid %d)", name, os.getpid())
    scorer.run(lambda: stopping.is_set() or os.getppid() != parent)
    log.info("scorer %r stopped: %d frame(s) scored, %d flagged", name, scorer.scored, scorer.flagged)


class ScorerProcess:
    """Starts the scorer child, publishes the alerts it sends back, restarts it when it dies (``close`` stops)."""

    def __init__(self, engine: Engine, cfg: AnomalyConfig, name: str, publisher: AlertPublisher) -> None:
        self.url = engine.url.render_as_string(hide_password=False)
        self.cfg, self.name, self.publisher = cfg, name, publisher
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads (paho, the webhook)
        self._proc: Optional[multiprocessing.process.BaseProcess] = None
        self._conn = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.restarts = 0

    @property
    def pid(self) -> Optional[int]:
        return None if self._proc is None else self._proc.pid

    def _spawn(self) -> None:
        if self._conn is not None:
            self._conn.close()  # the previous child's pipe
        recv, send = self._ctx.Pipe(duplex=False)
        self._proc = self._ctx.Process(target=_child, name=f"{self.name}-scorer", daemon=True,
                                       args=(self.url, self.cfg.model_dump_json(), self.name, send, os.getpid(),
                                             logging.getLogger().level))
        with one_blas_thread():
            self._proc.start()
        send.close()
        self._conn = recv

    def start(self) -> None:
        """Start the child and its watcher (once; later calls do nothing)."""
        if self._thread is not None:
            return
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="scorer-watch", daemon=True)
        self._thread.start()

    def _forward(self, wait: float) -> bool:
        """Publish what the child sent within ``wait`` s; False once its pipe is closed (the child is gone)."""
        try:
            if self._conn.poll(wait):
                self.publisher(self._conn.recv())
            return True
        except (EOFError, OSError):
            return False

    def _watch(self) -> None:
        backoff, started = 1.0, time.monotonic()
        while not self._stop.is_set():
            if self._forward(0.5):
                continue
            if self._stop.is_set():
                return
            self._proc.join(5)  # its pipe closed: it is gone, or going
            code = self._proc.exitcode
            if time.monotonic() - started > 60:
                backoff = 1.0  # it had run a while: not a crash loop
            log.error("scorer process %s exited (code %s); restarting in %.0fs (its unscored frames stay queued)",
                      self.pid, code, backoff)
            if self._stop.wait(backoff):
                return
            self.restarts += 1
            backoff = min(backoff * 2, 30.0)
            self._spawn()
            started = time.monotonic()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the child (SIGTERM, then SIGKILL after ``timeout``), publish what it sent last, close the webhook."""
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.terminate()
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        if self._thread is not None:
            self._thread.join(5)
        try:
            while self._conn is not None and self._conn.poll(0):
                self.publisher(self._conn.recv())
        except (EOFError, OSError):
            pass
        self.publisher.close()
