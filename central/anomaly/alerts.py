"""Alerts out of central: each flagged frame published on its camera's alert topic and POSTed to the webhook.

Neither blocks ingest. MQTT publishes are handed to the worker's client (QoS 1, retained: each camera's topic
holds its latest alert). The webhook runs on a thread of its own from a bounded queue (when full, the oldest
waiting alert is dropped), each alert tried ``1 + retries`` times with doubling backoff; what happened is
counted in the database: ``tokenline_anomaly_webhook_{sent,failed,dropped}_total`` in ``/metrics``.
"""

from __future__ import annotations

import collections
import logging
import threading
import urllib.error
import urllib.request
from typing import Callable, Deque, Optional, Sequence

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from central import store
from central.config import WebhookConfig
from tokenline.topics import ALERT_QOS, Alert

# counters (tokenline_<name>_total in /metrics)
WEBHOOK_SENT = "anomaly_webhook_sent"
WEBHOOK_FAILED = "anomaly_webhook_failed"
WEBHOOK_DROPPED = "anomaly_webhook_dropped"

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, int, bool], object]  # (topic, payload, qos, retain), e.g. paho's client.publish


class Webhook:
    """POSTs alerts (``Alert.to_json``) to ``cfg.url`` from a bounded queue on its own thread."""

    def __init__(self, cfg: WebhookConfig, engine: Optional[Engine], worker: str) -> None:
        if cfg.url is None:
            raise ValueError("webhook without a url")
        self.cfg, self.engine, self.worker = cfg, engine, worker
        self._q: Deque[Alert] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self.sent = self.failed = self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="alert-webhook", daemon=True)
        self._thread.start()

    def submit(self, alerts: Sequence[Alert]) -> None:
        dropped = 0
        with self._cond:
            for a in alerts:
                if len(self._q) >= self.cfg.queue:
                    self._q.popleft()
                    dropped += 1
                self._q.append(a)
            self._cond.notify()
        if dropped:
            log.warning("webhook queue full: %d alert(s) dropped", dropped)
            self._count(WEBHOOK_DROPPED, dropped)
            self.dropped += dropped

    def _post(self, alert: Alert) -> None:
        req = urllib.request.Request(str(self.cfg.url), data=alert.to_json(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.cfg.timeout_s):  # noqa: S310 - the configured URL
            pass  # urlopen raises HTTPError for an error status

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._q and not self._stop:
                    self._cond.wait()
                if not self._q:
                    return
                alert = self._q.popleft()
            delay = self.cfg.backoff_s
            for attempt in range(self.cfg.retries + 1):
                try:
                    self._post(alert)
                    self.sent += 1
                    self._count(WEBHOOK_SENT, 1)
                    break
                except (OSError, urllib.error.URLError, ValueError) as exc:
                    log.warning("webhook %s, attempt %d of %d for frame %s: %s", self.cfg.url, attempt + 1,
                                self.cfg.retries + 1, alert.frame_id, exc)
                    with self._cond:
                        if self._stop or attempt == self.cfg.retries:
                            self.failed += 1
                            self._count(WEBHOOK_FAILED, 1)
                            break
                        self._cond.wait(delay)
                    delay *= 2

    def _count(self, name: str, n: int) -> None:
        if self.engine is None:
            return
        try:
            with Session(self.engine) as s, s.begin():
                store.add_counters(s, self.worker, {name: n})
        except Exception:  # noqa: BLE001 - counting must not kill the sender
            log.exception("cannot count %s", name)

    def close(self, timeout: float = 5.0) -> None:
        """Stop: what is still queued gets one attempt each (no more retries), within ``timeout``."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)


class AlertPublisher:
    """What an ingest worker does with the alerts of a committed batch: MQTT and the webhook."""

    def __init__(self, publish: Optional[Publish], webhook: Optional[Webhook] = None) -> None:
        self.publish, self.webhook = publish, webhook

    def __call__(self, alerts: Sequence[Alert]) -> None:
        if not alerts:
            return
        for a in alerts:
            log.info("alert: frame %s of %s/%s/%s scored %.4f > %.4f (set %d v%d)", a.frame_id, a.site, a.line,
                     a.camera, a.score, a.threshold, a.reference_set, a.set_version)
            if self.publish is not None:
                try:
                    self.publish(a.topic, a.to_json(), ALERT_QOS, True)
                except Exception:  # noqa: BLE001 - the alert is counted and stored; publishing is best effort
                    log.exception("cannot publish the alert of frame %s", a.frame_id)
        if self.webhook is not None:
            self.webhook.submit(alerts)

    def close(self) -> None:
        if self.webhook is not None:
            self.webhook.close()
