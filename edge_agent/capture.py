"""One thread per camera: open (with backoff), read, sample (max fps / every Nth / trigger), hand frames on.

A failing camera is reopened with exponential backoff and never affects the others; a bad frame is counted
and skipped. ``Sampler`` is the pure sampling decision, kept apart so it can be tested on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from edge_agent import config as cfgmod
from edge_agent.queues import FrameHub, Sample
from edge_agent.sources import FrameError, FrameSource, SourceEnded, SourceError, check_frame, open_source
from tokenline.frame_id import new_frame_id

log = logging.getLogger(__name__)


class Sampler:
    """Decides per captured frame whether it is encoded; ``trigger()`` arms one frame in trigger mode."""

    def __init__(self, cfg: cfgmod.SamplingConfig) -> None:
        self.cfg = cfg
        self._count = 0
        self._last: Optional[float] = None
        self._armed = 0
        self._lock = threading.Lock()

    def trigger(self, n: int = 1) -> None:
        with self._lock:
            self._armed = min(self._armed + n, 1000)

    def take(self, now: float) -> bool:
        with self._lock:
            self._count += 1
            if self.cfg.mode == "every_nth":
                return (self._count - 1) % self.cfg.every_nth == 0
            if self.cfg.mode == "trigger":
                if self._armed:
                    self._armed -= 1
                    return True
                return False
            period = 1.0 / self.cfg.max_fps
            if self._last is None or now - self._last >= period * 0.999:
                # keep the cadence stable: advance by whole periods instead of snapping to now
                self._last = now if self._last is None or now - self._last > 2 * period else self._last + period
                return True
            return False


@dataclass
class CameraStats:
    state: str = "starting"
    frames: int = 0
    sampled: int = 0
    errors: int = 0
    reopens: int = 0
    last_error: str = ""
    last_frame_ts: float = 0.0
    fps: float = 0.0
    _window: list = field(default_factory=list)

    def as_dict(self) -> Dict[str, object]:
        return {"state": self.state, "frames": self.frames, "sampled": self.sampled, "errors": self.errors,
                "reopens": self.reopens, "fps": round(self.fps, 2), "last_frame_ts": self.last_frame_ts,
                "last_error": self.last_error}


class CameraWorker(threading.Thread):
    """Capture loop of one camera; puts sampled frames into the hub. Stops when ``stop`` is set."""

    def __init__(self, cam: cfgmod.CameraConfig, hub: FrameHub, stop: threading.Event,
                 paused: Callable[[], bool], source: Optional[FrameSource] = None) -> None:
        super().__init__(name=f"camera-{cam.name}", daemon=True)
        self.cam = cam
        self.hub = hub
        self.stop_event = stop
        self.paused = paused
        self.source = source or open_source(cam.source)
        self.sampler = Sampler(cam.sampling)
        self.stats = CameraStats()

    def _error(self, msg: str) -> None:
        self.stats.errors += 1
        self.stats.last_error = msg
        log.warning("camera %s: %s", self.cam.name, msg)

    def _open_with_backoff(self) -> bool:
        delay = self.cam.reopen.initial_s
        while not self.stop_event.is_set():
            try:
                self.source.open()
                self.stats.state = "open"
                log.info("camera %s: opened", self.cam.name)
                return True
            except SourceError as exc:
                self.stats.state = "reopening"
                self._error(f"{exc}; retrying in {delay:.1f}s")
            except Exception as exc:  # noqa: BLE001 - a driver error must not kill the thread
                self.stats.state = "reopening"
                self._error(f"unexpected error opening: {exc!r}; retrying in {delay:.1f}s")
            if self.stop_event.wait(delay):
                return False
            delay = min(delay * self.cam.reopen.factor, self.cam.reopen.max_s)
            self.stats.reopens += 1
        return False

    def _tick_fps(self, now: float) -> None:
        w = self.stats._window
        w.append(now)
        while w and now - w[0] > 5.0:
            w.pop(0)
        self.stats.fps = (len(w) - 1) / (w[-1] - w[0]) if len(w) > 1 and w[-1] > w[0] else 0.0

    def run(self) -> None:
        try:
            self._run()
        except Exception:  # noqa: BLE001 - last resort: log, mark failed; the agent keeps the other cameras
            log.exception("camera %s: capture thread failed", self.cam.name)
            self.stats.state = "failed"
        finally:
            try:
                self.source.close()
            except Exception:  # noqa: BLE001
                pass

    def _run(self) -> None:
        if not self._open_with_backoff():
            return
        while not self.stop_event.is_set():
            try:
                frame = self.source.read()
            except SourceEnded:
                self.stats.state = "ended"
                log.info("camera %s: source ended", self.cam.name)
                return
            except SourceError as exc:
                self._error(str(exc))
                try:
                    self.source.close()
                except Exception:  # noqa: BLE001
                    pass
                self.stats.reopens += 1
                if self.stop_event.wait(self.cam.reopen.initial_s) or not self._open_with_backoff():
                    return
                continue
            except FrameError as exc:
                self._error(f"bad frame: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. a cv2.error from a broken driver
                self._error(f"read error: {exc!r}")
                self.stop_event.wait(0.1)
                continue
            if frame is None:
                continue
            now = time.monotonic()
            ts_us = time.time_ns() // 1000
            try:
                frame = check_frame(frame)
            except FrameError as exc:
                self._error(f"bad frame: {exc}")
                continue
            self.stats.frames += 1
            self.stats.last_frame_ts = ts_us / 1e6
            self._tick_fps(now)
            if self.paused() or not self.sampler.take(now):
                continue
            self.stats.sampled += 1
            self.hub.put(Sample(camera=self.cam.name, line=self.cam.line, frame=frame, capture_ts_us=ts_us,
                                frame_id=new_frame_id(ts_us), t_captured=now))
