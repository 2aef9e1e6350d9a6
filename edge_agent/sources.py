"""Frame sources behind one small interface: OpenCV captures (USB, RTSP/HTTP, GStreamer, file), folders, synthetic.

``open_source(cfg)`` builds one from its config. A source's ``read()`` returns a BGR frame, ``None`` when no
frame is ready yet (an empty folder), raises ``SourceEnded`` at the end of a finite source, ``SourceError`` when
the camera failed (the worker reopens it with backoff) and ``FrameError`` for one bad frame (counted, skipped).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Optional, Protocol, Set

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


class FrameSource(Protocol):
    def open(self) -> None: ...

    def read(self) -> Optional[np.ndarray]: ...

    def close(self) -> None: ...


class CvCaptureSource:
    """cv2.VideoCapture over a USB index, a stream URL, a GStreamer pipeline or a video file."""

    def __init__(self, cfg: cfgmod.UsbSourceConfig | cfgmod.UrlSourceConfig | cfgmod.GstreamerSourceConfig
                 | cfgmod.FileSourceConfig) -> None:
        self.cfg = cfg
        self.cap: Optional[cv2.VideoCapture] = None
        self._period = 0.0
        self._next = 0.0

    def describe(self) -> str:
        c = self.cfg
        if isinstance(c, cfgmod.UsbSourceConfig):
            return f"usb:{c.index}"
        if isinstance(c, cfgmod.UrlSourceConfig):
            return c.url.split("@")[-1]  # never log credentials embedded in the URL
        if isinstance(c, cfgmod.GstreamerSourceConfig):
            return "gstreamer"
        return f"file:{c.path}"

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
        elif isinstance(c, cfgmod.GstreamerSourceConfig):
            cap = cv2.VideoCapture(c.pipeline, cv2.CAP_GSTREAMER)
        else:
            if not Path(c.path).is_file():
                raise SourceError(f"video file {c.path} does not exist")
            cap = cv2.VideoCapture(str(c.path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {self.describe()}")
        self.cap = cap
        if isinstance(c, cfgmod.FileSourceConfig) and c.pace:
            fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
            self._period = 1.0 / fps if 0 < fps < 1000 else 0.0
        self._next = time.monotonic()

    def read(self) -> Optional[np.ndarray]:
        if self.cap is None:
            raise SourceError("not open")
        if self._period:
            delay = self._next - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._next = max(self._next + self._period, time.monotonic() - self._period)
        ok, frame = self.cap.read()
        if ok and frame is not None:
            return frame
        if isinstance(self.cfg, cfgmod.FileSourceConfig):
            if self.cfg.loop:
                self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, frame = self.cap.read()
                if ok and frame is not None:
                    return frame
                raise SourceError(f"{self.describe()}: cannot rewind")
            raise SourceEnded(self.describe())
        raise SourceError(f"{self.describe()}: read failed (disconnected?)")

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class FolderWatchSource:
    """Each new image file in a folder is a frame (oldest mtime first). Corrupt files go to ``rejected/``."""

    def __init__(self, cfg: cfgmod.FolderSourceConfig) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.path)
        self._seen: Set[str] = set()
        self._last_poll = 0.0

    def describe(self) -> str:
        return f"folder:{self.dir}"

    def open(self) -> None:
        if not self.dir.is_dir():
            raise SourceError(f"folder {self.dir} does not exist")

    def _pending(self) -> list:
        try:
            files = [p for p in self.dir.glob(self.cfg.pattern) if p.is_file()]
        except OSError as exc:
            raise SourceError(f"{self.dir}: {exc}") from None
        names = {p.name for p in files}
        self._seen &= names  # forget files that are gone, so the set stays bounded
        new = [p for p in files if p.name not in self._seen]

        def key(p: Path):
            try:
                return (p.stat().st_mtime_ns, p.name)
            except OSError:
                return (0, p.name)
        return sorted(new, key=key)

    def read(self) -> Optional[np.ndarray]:
        if not self.dir.is_dir():
            raise SourceError(f"folder {self.dir} disappeared")
        pending = self._pending()
        if not pending:
            time.sleep(self.cfg.poll_s)
            return None
        path = pending[0]
        self._seen.add(path.name)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise FrameError(f"{path}: {exc.strerror or exc}") from None
        frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if frame is None:
            self._reject(path)
            raise FrameError(f"{path.name}: not a decodable image (moved to rejected/)")
        if self.cfg.delete_after_read:
            try:
                path.unlink()
            except OSError:
                pass
        return frame

    def _reject(self, path: Path) -> None:
        try:
            dest = self.dir / "rejected"
            dest.mkdir(exist_ok=True)
            shutil.move(str(path), str(dest / path.name))
        except OSError as exc:
            log.warning("cannot move %s to rejected/: %s", path, exc)

    def close(self) -> None:
        pass


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


def open_source(cfg: cfgmod.SourceConfig) -> FrameSource:
    """Build (not yet open) the source for a camera's ``source`` config."""
    if isinstance(cfg, cfgmod.FolderSourceConfig):
        return FolderWatchSource(cfg)
    if isinstance(cfg, cfgmod.SyntheticSourceConfig):
        return SyntheticConveyorSource(cfg)
    return CvCaptureSource(cfg)


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
