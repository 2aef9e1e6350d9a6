"""Frame sources behind one small interface: OpenCV captures (USB, RTSP/HTTP, GStreamer) and a synthetic conveyor.

A source's ``read()`` returns a BGR frame (or a ``Captured``: the frame with what the source knows about it),
``None`` when no frame is ready yet, raises ``SourceEnded`` at the end of a finite source, ``SourceError`` when
the camera failed (the worker reopens it with backoff) and ``FrameError`` for one bad frame (counted, skipped).
The file sources (a watched folder, a video file) are ``edge_agent.filesources``; ``capture.open_source``
builds any of them from its config.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, Optional, Protocol, Union

import cv2
import numpy as np

from edge_agent import config as cfgmod
from edge_agent.synthetic import corrupt_frame, draw_conveyor_frame

log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """The source cannot be opened or stopped delivering; reopen later."""


class SourceEnded(Exception):
    """A finite source (file, synthetic with max_frames) has no more frames."""


class FrameError(ValueError):
    """One frame could not be decoded; the source itself is fine."""


class Ticket(Protocol):
    """How a file source learns what became of a frame it handed on (called from the pipeline's threads)."""

    def committed(self) -> None: ...  # the frame is in the outbox

    def skipped(self) -> None: ...  # sampling passed it over (deliberately)

    def failed(self, reason: str, retry: bool) -> None: ...  # not encoded; ``retry``: the failure was not the file's


@dataclass
class Captured:
    """A frame and what its source knows about it; live sources return the bare array instead."""

    frame: np.ndarray
    capture_ts_us: Optional[int] = None  # None: the time it was read
    frame_id: Optional[bytes] = None  # None: a new UUIDv7 for the capture time
    source: Optional[str] = None  # the file it came from (metadata "source")
    labels: Optional[Dict[str, str]] = None  # labels of this frame (metadata "labels", over the camera's)
    ticket: Optional[Ticket] = None


Read = Union[np.ndarray, Captured, None]


class FrameSource(Protocol):
    def open(self) -> None: ...

    def read(self) -> Read: ...

    def close(self) -> None: ...


class CvCaptureSource:
    """cv2.VideoCapture over a USB index, a stream URL or a GStreamer pipeline (live cameras)."""

    def __init__(self, cfg: cfgmod.UsbSourceConfig | cfgmod.UrlSourceConfig | cfgmod.GstreamerSourceConfig) -> None:
        self.cfg = cfg
        self.cap: Optional[cv2.VideoCapture] = None

    def describe(self) -> str:
        c = self.cfg
        if isinstance(c, cfgmod.UsbSourceConfig):
            return f"usb:{c.index}"
        if isinstance(c, cfgmod.UrlSourceConfig):
            return c.url.split("@")[-1]  # never log credentials embedded in the URL
        return "gstreamer"

    def open(self) -> None:
        c = self.cfg
        if isinstance(c, cfgmod.UsbSourceConfig):
            cap = cv2.VideoCapture(c.index)
            if c.width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, c.width)
            if c.height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, c.height)
        elif isinstance(c, cfgmod.UrlSourceConfig):
            cap = cv2.VideoCapture(c.url, cv2.CAP_FFMPEG)
        else:
            cap = cv2.VideoCapture(c.pipeline, cv2.CAP_GSTREAMER)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {self.describe()}")
        self.cap = cap

    def read(self) -> Optional[np.ndarray]:
        if self.cap is None:
            raise SourceError("not open")
        ok, frame = self.cap.read()
        if ok and frame is not None:
            return frame
        raise SourceError(f"{self.describe()}: read failed (disconnected?)")

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class SyntheticConveyorSource:
    """Frames from ``draw_conveyor_frame`` at ``fps``; optional corrupt frames and simulated disconnects."""

    def __init__(self, cfg: cfgmod.SyntheticSourceConfig) -> None:
        self.cfg = cfg
        self.n = 0  # frames produced over the source's life (survives reopen)
        self._since_open = 0
        self._failed_once = False
        self._next = 0.0

    def describe(self) -> str:
        return f"synthetic:{self.cfg.seed}"

    def open(self) -> None:
        self._since_open = 0
        self._next = time.monotonic()

    def read(self) -> Optional[np.ndarray]:
        c = self.cfg
        if c.max_frames is not None and self.n >= c.max_frames:
            raise SourceEnded(self.describe())
        if c.fail_after is not None and self._since_open >= c.fail_after and not self._failed_once:
            self._failed_once = True
            raise SourceError(f"{self.describe()}: simulated disconnect after {c.fail_after} frames")
        delay = self._next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._next = max(self._next + 1.0 / c.fps, time.monotonic() - 1.0 / c.fps)
        n = self.n
        self.n += 1
        self._since_open += 1
        if c.corrupt_every is not None and (n + 1) % c.corrupt_every == 0:
            return corrupt_frame(c.width, c.height, n)
        return draw_conveyor_frame(n, c.width, c.height, seed=c.seed, defect_rate=c.defect_rate)

    def close(self) -> None:
        pass


def check_frame(frame: object) -> np.ndarray:
    """A frame is a non-empty uint8 HxW, HxWx1 or HxWx3/4 array at least 2x2; FrameError otherwise."""
    if not isinstance(frame, np.ndarray) or frame.size == 0:
        raise FrameError("empty frame")
    if frame.dtype != np.uint8:
        raise FrameError(f"frame dtype {frame.dtype}, expected uint8")
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] not in (1, 3, 4)):
        raise FrameError(f"frame shape {frame.shape} is not HxW, HxWx1, HxWx3 or HxWx4")
    if frame.shape[0] < 2 or frame.shape[1] < 2:
        raise FrameError(f"frame {frame.shape[1]}x{frame.shape[0]} is too small")
    return frame
