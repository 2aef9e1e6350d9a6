"""One thread per camera: open (with backoff), read, sample (all / max fps / every Nth / trigger), hand frames on.

A failing camera is reopened with exponential backoff and never affects the others; a bad frame is counted
and skipped. A live camera's frames are sampled as they come and dropped (counted, logged) when its queue is
full; a file source (folder, video file) is read only when its next frame may go on: not paused, its trigger
armed, at its pace (``max_fps``), with room in the outbox, and then waits for room in its queue, so it never
drops. ``Sampler`` is the pure sampling decision, kept apart so it can be tested on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from edge_agent import config as cfgmod
from edge_agent.drops import DropLog
from edge_agent.filesources import FolderWatchSource, VideoFileSource
from edge_agent.journal import FileJournal
from edge_agent.queues import FrameHub, Sample
from edge_agent.sources import (Captured, CvCaptureSource, FrameError, FrameSource, SourceEnded, SourceError,
                                SyntheticConveyorSource, check_frame)
from tokenline.frame_id import new_frame_id
from tokenline.wire import WireError
from tokenline.wire.common import encode_metadata

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

    @property
    def armed(self) -> bool:
        with self._lock:
            return self._armed > 0

    def take(self, now: float) -> bool:
        with self._lock:
            self._count += 1
            if self.cfg.mode == "all":
                return True
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
    skipped: int = 0  # file frames passed over by every_nth (journaled, never deleted)
    errors: int = 0
    reopens: int = 0
    last_error: str = ""
    last_frame_ts: float = 0.0
    fps: float = 0.0
    _window: list = field(default_factory=list)

    def as_dict(self) -> Dict[str, object]:
        return {"state": self.state, "frames": self.frames, "sampled": self.sampled, "skipped": self.skipped,
                "errors": self.errors,
                "reopens": self.reopens, "fps": round(self.fps, 2), "last_frame_ts": self.last_frame_ts,
                "last_error": self.last_error}


def open_source(cam: cfgmod.CameraConfig, journal: Optional[FileJournal] = None) -> FrameSource:
    """Build (not yet open) the source for a camera; file sources remember their files in ``journal``."""
    c = cam.source
    if isinstance(c, cfgmod.FolderSourceConfig):
        return FolderWatchSource(c, cam.name, journal)
    if isinstance(c, cfgmod.FileSourceConfig):
        return VideoFileSource(c, cam.name, journal)
    if isinstance(c, cfgmod.SyntheticSourceConfig):
        return SyntheticConveyorSource(c)
    return CvCaptureSource(c)


class CameraWorker(threading.Thread):
    """Capture loop of one camera; puts sampled frames into the hub. Stops when ``stop`` is set.

    ``room()`` says whether the outbox can take more frames (file sources wait while it cannot); ``drops``
    records every frame lost here.
    """

    def __init__(self, cam: cfgmod.CameraConfig, hub: FrameHub, stop: threading.Event,
                 paused: Callable[[], bool], source: Optional[FrameSource] = None,
                 journal: Optional[FileJournal] = None, drops: Optional[DropLog] = None,
                 room: Callable[[], bool] = lambda: True) -> None:
        super().__init__(name=f"camera-{cam.name}", daemon=True)
        self.cam = cam
        self.hub = hub
        self.stop_event = stop
        self.paused = paused
        self.source = source or open_source(cam, journal)
        self.sampler = Sampler(cam.sampling)
        self.stats = CameraStats()
        self.drops = drops if drops is not None else DropLog()
        self.room = room
        self.lossless = cam.lossless
        self._next_turn = 0.0

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
            except SourceEnded:
                self.stats.state = "ended"
                log.info("camera %s: source ended", self.cam.name)
                return False
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

    def source_stats(self) -> Optional[Dict[str, int]]:
        get = getattr(self.source, "stats", None)
        return get() if callable(get) else None

    def _wait_turn(self) -> bool:
        """A file source reads its next frame only when it may go on (see the module docstring); False: stopping."""
        mode = self.cam.sampling.mode
        while not self.stop_event.is_set():
            now = time.monotonic()
            if self.paused() or not self.room() or (mode == "trigger" and not self.sampler.armed):
                self.stop_event.wait(0.05)
            elif mode == "max_fps" and now < self._next_turn:
                self.stop_event.wait(min(0.05, self._next_turn - now))
            else:
                return True
        return False

    def _metadata(self, got: Captured) -> Optional[Dict[str, Any]]:
        """The frame's wire metadata: its file name and the camera's labels overlaid by the file's; WireError
        ('bad_metadata') when they do not fit the format's limits."""
        labels = dict(self.cam.labels)
        labels.update(got.labels or {})
        meta: Dict[str, Any] = {}
        if got.source:
            meta["source"] = got.source
        if labels:
            meta["labels"] = labels
        if not meta:
            return None
        encode_metadata(meta)  # the checks and the size limit the writer will apply
        return meta

    def _lost(self, got: Captured, kind: str, reason: str) -> None:
        """A frame that goes no further: its file is rejected, the drop recorded."""
        if got.ticket is not None:
            got.ticket.failed(reason, retry=False)
        self.drops.add(kind, detail=f"camera {self.cam.name}: {reason}")

    def _run(self) -> None:
        if not self._open_with_backoff():
            return
        while not self.stop_event.is_set():
            if self.lossless and not self._wait_turn():
                return
            try:
                read = self.source.read()
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
                self.drops.add("rejected_file" if self.lossless else f"bad_frame:{self.cam.name}", detail=str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. a cv2.error from a broken driver
                self._error(f"read error: {exc!r}")
                self.stop_event.wait(0.1)
                continue
            if read is None:
                continue
            got = read if isinstance(read, Captured) else Captured(read)
            now = time.monotonic()
            ts_us = got.capture_ts_us if got.capture_ts_us is not None else time.time_ns() // 1000
            try:
                frame = check_frame(got.frame)
            except FrameError as exc:
                self._error(f"bad frame: {exc}")
                self._lost(got, f"bad_frame:{self.cam.name}", str(exc))
                continue
            self.stats.frames += 1
            self.stats.last_frame_ts = ts_us / 1e6
            self._tick_fps(now)
            if self.lossless:
                mode = self.cam.sampling.mode
                if mode == "max_fps":
                    period = 1.0 / self.cam.sampling.max_fps
                    self._next_turn = max(self._next_turn, now - period) + period
                take = self.sampler.take(now) if mode in ("every_nth", "trigger") else True
            else:
                take = not self.paused() and self.sampler.take(now)
            if not take:
                if got.ticket is not None:
                    self.stats.skipped += 1
                    got.ticket.skipped()
                continue
            try:
                meta = self._metadata(got)
            except WireError as exc:
                self._error(f"frame metadata refused: {exc}")
                self._lost(got, "bad_metadata", str(exc))
                continue
            sample = Sample(camera=self.cam.name, line=self.cam.line, frame=frame, capture_ts_us=ts_us,
                            frame_id=got.frame_id or new_frame_id(ts_us), t_captured=now, metadata=meta,
                            ticket=got.ticket, lossless=self.lossless)
            self.stats.sampled += 1
            if self.lossless:
                if not self.hub.put_wait(sample, self.stop_event.is_set):
                    return  # stopping: the file stays "reading" in the journal and is read again at the next start
            elif not self.hub.put(sample):
                self.drops.add(f"queue_full:{self.cam.name}", detail="frames come faster than they are encoded")
