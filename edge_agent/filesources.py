"""Loss-free file sources: a watched folder of image files and a video file, each read once, complete, never dropped.

A file is read only when it is complete: its name is not a temporary one (``ignore``: write ``x.jpg.tmp``, then
rename it to ``x.jpg``), its size and mtime have not changed for ``settle_s`` and, where Linux can tell, no
process has it open for writing. What becomes of each frame comes back through its ``Ticket``: committed to
the outbox (journaled ``done``; ``delete_after_read`` deletes the file only then), skipped by sampling, or
failed (read again when the failure was not the file's, else moved to ``rejected/``). The journal
(``edge_agent.journal``) carries this across restarts, with the frame id each file was given, so a file read
again after a crash keeps its frame id and central stores it once. Frames carry the file's name and its
labels (a ``<file>.json`` sidecar, named groups of ``path_labels``) as metadata.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import os
import re
import signal
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any, Deque, Dict, Optional, Set, Tuple

import cv2

from edge_agent import config as cfgmod
from edge_agent.journal import DONE, READING, SKIPPED, FileEntry, FileJournal, VideoEntry
from edge_agent.sources import Captured, FrameError, Read, SourceEnded, SourceError
from tokenline.frame_id import new_frame_id
from tokenline.preprocess import ImageError, decode_image
from tokenline.wire import WireError, check_metadata

try:
    import fcntl
except ImportError:  # pragma: no cover - not Linux: completeness by settle time alone
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

REJECTED = "rejected"  # sub-folder that takes files that are not usable images
MAX_ATTEMPTS = 3  # a file whose frame failed for other reasons (inference, a full outbox disk) this often is rejected
MAX_SOURCE = 255  # metadata "source" length (tokenline.wire)


class LabelError(ValueError):
    """A file's labels (sidecar or path) that are not valid metadata labels."""


def open_for_writing(path: Path) -> Optional[bool]:
    """True when a process has ``path`` open for writing, False when none has, None when this cannot be told.

    Linux read leases: taking one fails with EAGAIN while the file is open for writing anywhere. The lease is
    released at once (a writer opening the file meanwhile waits microseconds); its break signal is set to
    SIGURG, which is ignored by default. Not Linux, another user's file (EACCES), a file system without
    leases: None, and the settle time alone decides.
    """
    if fcntl is None or not hasattr(fcntl, "F_SETLEASE"):
        return None
    try:
        fd = os.open(str(path), os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno == errno.EAGAIN else None
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def source_name(rel: str) -> str:
    """A file's path below its folder as metadata ``source``: printable, at most 255 characters (the tail)."""
    text = "".join(c if c.isprintable() else "?" for c in rel)
    return text if len(text) <= MAX_SOURCE else "..." + text[-(MAX_SOURCE - 3):]


def _matches(name: str, patterns: Tuple[str, ...]) -> bool:
    low = name.lower()
    return any(fnmatch.fnmatchcase(low, p) for p in patterns)


class _Ticket:
    """A frame's ticket (``sources.Ticket``): tells its file source, by ``key``, what became of the frame."""

    __slots__ = ("src", "key")

    def __init__(self, src: Any, key: Any) -> None:
        self.src, self.key = src, key

    def committed(self) -> None:
        self.src._committed(self.key)

    def skipped(self) -> None:
        self.src._skipped(self.key)

    def failed(self, reason: str, retry: bool) -> None:
        self.src._failed(self.key, reason, retry)


class FolderWatchSource:
    """Each complete image file in a folder is one frame, oldest mtime first; unusable files go to ``rejected/``."""

    def __init__(self, cfg: cfgmod.FolderSourceConfig, camera: str = "folder",
                 journal: Optional[FileJournal] = None) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.path)
        self.camera = camera
        self.journal = journal if journal is not None else FileJournal(":memory:")
        self._patterns = tuple(p.lower() for p in cfg.patterns)
        self._ignore = tuple(p.lower() for p in cfg.ignore) + (("*.json",) if cfg.sidecar else ())
        self._path_rx = re.compile(cfg.path_labels) if cfg.path_labels else None
        self._lock = threading.Lock()  # tickets arrive from the pipeline's threads
        self._known: Dict[str, FileEntry] = {}  # the journal's rows of this camera
        self._loaded = False
        self._settle: Dict[str, Tuple[int, int, float]] = {}  # name -> (size, mtime_ns, unchanged since)
        self._ready: Deque[Tuple[str, int, int]] = deque()  # (name, size, mtime_ns) complete, oldest first
        self._inflight: Set[str] = set()
        self._attempts: Dict[str, int] = {}
        self._stuck: Dict[str, Tuple[int, int]] = {}  # cannot be read or moved: left alone until it changes
        self._last_scan = float("-inf")
        self.counts = {"read": 0, "committed": 0, "skipped": 0, "rejected": 0, "retried": 0, "deleted": 0}

    def describe(self) -> str:
        return f"folder:{self.dir}"

    def open(self) -> None:
        if not self.dir.is_dir():
            raise SourceError(f"folder {self.dir} does not exist")
        if not os.access(self.dir, os.R_OK | os.X_OK):
            raise SourceError(f"folder {self.dir} is not readable")
        with self._lock:
            if not self._loaded:
                self._known = self.journal.files(self.camera)
                self._loaded = True

    def close(self) -> None:
        pass

    def stats(self) -> Dict[str, int]:
        with self._lock:
            return dict(self.counts, inflight=len(self._inflight), settling=len(self._settle),
                        ready=len(self._ready), journal=len(self._known))

    # -- scanning -----------------------------------------------------------------------------------------------
    def _wanted(self, name: str) -> bool:
        return _matches(name, self._patterns) and not _matches(name, self._ignore)

    def _list(self) -> Dict[str, Tuple[int, int]]:
        """``{path below the folder: (size, mtime_ns)}`` of the image files there (sub-folders if recursive)."""
        out: Dict[str, Tuple[int, int]] = {}
        todo = [("", str(self.dir))]
        while todo:
            rel, d = todo.pop()
            try:
                entries = list(os.scandir(d))
            except OSError as exc:
                if not rel:
                    raise SourceError(f"{self.dir}: {exc.strerror or exc}") from None
                continue  # a sub-folder that vanished or cannot be read
            for e in entries:
                try:
                    if e.is_dir(follow_symlinks=False):
                        if self.cfg.recursive and not (not rel and e.name == REJECTED) \
                                and not _matches(e.name, self._ignore):
                            todo.append((rel + e.name + "/", e.path))
                    elif self._wanted(e.name) and e.is_file():
                        st = e.stat()
                        out[rel + e.name] = (st.st_size, st.st_mtime_ns)
                except OSError:
                    continue  # gone between listing and stat
        return out

    def _scan(self, now: float) -> None:
        listing = self._list()
        to_delete = []
        candidates = []
        with self._lock:
            gone = [n for n in self._known if n not in listing and n not in self._inflight]
            for n in gone:
                del self._known[n]
            for cache in (self._settle, self._stuck, self._attempts):
                for n in [n for n in cache if n not in listing]:
                    del cache[n]
            queued = {r[0] for r in self._ready}
            for name, ident in listing.items():
                if name in self._inflight or name in queued or self._stuck.get(name) == ident:
                    continue
                entry = self._known.get(name)
                if entry is not None and entry.same_file(*ident):
                    if entry.state == DONE and self.cfg.delete_after_read:
                        to_delete.append(name)
                    elif entry.state == READING:  # read before a restart, not committed: again, same frame id
                        candidates.append((ident[1], name, ident, False))
                    continue
                seen = self._settle.get(name)
                if seen is None or seen[:2] != ident:
                    self._settle[name] = (ident[0], ident[1], now)
                    if self.cfg.settle_s > 0:
                        continue
                    seen = self._settle[name]
                if now - seen[2] >= self.cfg.settle_s and ident[0] > 0:
                    candidates.append((ident[1], name, ident, True))
        if gone:
            self.journal.forget(self.camera, gone)
        for name in to_delete:
            self._delete(name)
        ready = []
        for mtime, name, ident, check_writers in sorted(candidates):
            if check_writers and open_for_writing(self.dir / name):
                continue  # complete-looking, but a writer still holds it open: wait for the close
            ready.append((name, ident[0], ident[1]))
        with self._lock:
            for name, _, _ in ready:
                self._settle.pop(name, None)
            self._ready.extend(ready)

    # -- reading ------------------------------------------------------------------------------------------------
    def read(self) -> Read:
        if not self._ready:
            wait = self._last_scan + self.cfg.poll_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not self.dir.is_dir():
                raise SourceError(f"folder {self.dir} disappeared")
            self._last_scan = time.monotonic()
            self._scan(self._last_scan)
        while self._ready:
            with self._lock:
                name, size, mtime = self._ready.popleft()
            got = self._load(name, (size, mtime))
            if got is not None:
                return got
        return None

    def _load(self, name: str, ident: Tuple[int, int]) -> Optional[Captured]:
        path = self.dir / name
        try:
            with open(path, "rb") as fh:
                before = os.fstat(fh.fileno())
                data = fh.read()
                after = os.fstat(fh.fileno())
        except FileNotFoundError:
            return None  # gone since the scan (moved away, deleted)
        except OSError as exc:
            self._reject(name, f"unreadable: {exc.strerror or exc}")
            raise FrameError(f"{name}: {exc.strerror or exc}") from None
        now_ident = (after.st_size, after.st_mtime_ns)
        if (before.st_size, before.st_mtime_ns) != now_ident or now_ident != ident or len(data) != after.st_size:
            with self._lock:  # written to since the scan: complete again first
                self._settle[name] = (after.st_size, after.st_mtime_ns, time.monotonic())
            return None
        try:
            frame = decode_image(data, self.cfg.max_pixels)
            labels = self._labels(name)
        except (ImageError, LabelError) as exc:
            reason = getattr(exc, "reason", "bad_labels")
            self._reject(name, f"{reason}: {exc}")
            raise FrameError(f"{name}: {exc} (moved to {REJECTED}/)") from None
        with self._lock:
            entry = self._known.get(name)
        if entry is None or entry.state != READING or not entry.same_file(*ident):
            ts = ident[1] // 1000 if self.cfg.capture_time == "mtime" else time.time_ns() // 1000
            entry = FileEntry(ident[0], ident[1], READING, new_frame_id(ts), ts)
            self.journal.begin(self.camera, name, entry)  # durable before the frame moves on
        with self._lock:
            self._known[name] = entry
            self._inflight.add(name)
            self.counts["read"] += 1
        return Captured(frame, entry.capture_us, entry.frame_id, source=source_name(name), labels=labels or None,
                        ticket=_Ticket(self, name))

    def _labels(self, name: str) -> Dict[str, str]:
        labels: Dict[str, str] = {}
        if self._path_rx is not None:
            m = self._path_rx.search(name)
            if m is not None:
                labels.update({k: v for k, v in m.groupdict().items() if v is not None})
        if self.cfg.sidecar:
            try:
                raw = (self.dir / (name + ".json")).read_bytes()
            except FileNotFoundError:
                raw = None
            except OSError as exc:
                raise LabelError(f"sidecar {name}.json: {exc.strerror or exc}") from None
            if raw is not None:
                try:
                    data = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as exc:
                    raise LabelError(f"sidecar {name}.json is not UTF-8 JSON: {exc}") from None
                if not isinstance(data, dict) or not all(isinstance(v, (str, int, float, bool)) for v in data.values()):
                    raise LabelError(f"sidecar {name}.json must be an object of label: text")
                labels.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()})
        try:
            check_metadata({"labels": labels})
        except WireError as exc:
            raise LabelError(str(exc)) from None
        return labels

    # -- what became of a frame (called from the pipeline's threads) -------------------------------------------
    def _finish(self, name: str, state: str, counter: str) -> None:
        """The frame of ``name`` is done with (``DONE``: committed, ``SKIPPED``): journal it, forget it in flight."""
        self.journal.finish(self.camera, name, state)
        with self._lock:
            entry = self._known.get(name)
            if entry is not None:
                self._known[name] = replace(entry, state=state)
            self._inflight.discard(name)
            self._attempts.pop(name, None)
            self.counts[counter] += 1

    def _committed(self, name: str) -> None:
        self._finish(name, DONE, "committed")
        if self.cfg.delete_after_read:
            self._delete(name)

    def _skipped(self, name: str) -> None:
        self._finish(name, SKIPPED, "skipped")

    def _failed(self, name: str, reason: str, retry: bool) -> None:
        with self._lock:
            self._inflight.discard(name)
            n = self._attempts[name] = self._attempts.get(name, 0) + 1
        if retry and n < MAX_ATTEMPTS:
            with self._lock:
                self.counts["retried"] += 1
            log.warning("camera %s: %s: frame not encoded (%s); the file is read again", self.camera, name, reason)
            return  # still ``reading`` in the journal: the next scan hands it on again, same frame id
        self._reject(name, reason)

    def _delete(self, name: str) -> None:
        paths = [self.dir / name] + ([self.dir / (name + ".json")] if self.cfg.sidecar else [])
        removed = False  # by this call: the writer's delete after a commit and a scan's can race for one file
        try:
            for p in paths:
                try:
                    p.unlink()
                    removed = removed or p == paths[0]
                except FileNotFoundError:
                    pass
        except OSError as exc:
            with self._lock:
                first = name not in self._stuck
                entry = self._known.get(name)
                if entry is not None:
                    self._stuck[name] = (entry.size, entry.mtime_ns)
            if first:
                log.warning("camera %s: cannot delete %s after reading it: %s", self.camera, name,
                            exc.strerror or exc)
            return
        self.journal.forget(self.camera, [name])
        with self._lock:
            self._known.pop(name, None)
            self.counts["deleted"] += int(removed)

    def _reject(self, name: str, reason: str) -> None:
        """Move an unusable file (and its sidecar) to ``rejected/``; a warning names the reason."""
        moved = True
        for rel in [name] + ([name + ".json"] if self.cfg.sidecar else []):
            src = self.dir / rel
            if rel != name and not src.exists():
                continue
            dest = self.dir / REJECTED / rel
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
            except FileNotFoundError:
                pass
            except OSError as exc:
                moved = False
                log.warning("camera %s: cannot move %s to %s/: %s", self.camera, rel, REJECTED, exc.strerror or exc)
        self.journal.forget(self.camera, [name])
        with self._lock:
            self._known.pop(name, None)
            self._inflight.discard(name)
            self._attempts.pop(name, None)
            self.counts["rejected"] += 1
            if not moved:
                try:
                    st = (self.dir / name).stat()
                    self._stuck[name] = (st.st_size, st.st_mtime_ns)
                except OSError:
                    pass
        log.warning("camera %s: rejected %s (%s)%s", self.camera, name, reason,
                    f", moved to {REJECTED}/" if moved else "")


class VideoFileSource:
    """A video file read frame by frame; resumed after a restart where its committed frames end.

    Frame ``i`` has the capture time ``started + i / fps`` (``started``: when the file was first opened) and a
    frame id seeded by the file's journal entry and ``i``, so frames read again after a crash keep their ids.
    ``loop: true`` (demos) reads the file over and over with fresh ids and no journal.
    """

    SAVE_EVERY_S = 1.0  # how often the committed position is written to the journal

    def __init__(self, cfg: cfgmod.FileSourceConfig, camera: str = "file", journal: Optional[FileJournal] = None) -> None:
        self.cfg = cfg
        self.path = Path(cfg.path)
        self.camera = camera
        self.journal = journal if journal is not None else FileJournal(":memory:")
        self.cap: Optional[cv2.VideoCapture] = None
        self._fps = 25.0
        self._period = 0.0
        self._next = 0.0
        self._entry: Optional[VideoEntry] = None
        self._index = 0
        self._lock = threading.Lock()
        self._resolved: Set[int] = set()
        self._watermark = 0
        self._end: Optional[int] = None
        self._saved = 0.0

    def describe(self) -> str:
        return f"file:{self.path}"

    def stats(self) -> Dict[str, int]:
        with self._lock:
            return {"read": self._index, "committed": self._watermark, "ended": int(self._end is not None)}

    def _identity(self) -> Tuple[int, int]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise SourceError(f"video file {self.path} does not exist") from None
        except OSError as exc:
            raise SourceError(f"video file {self.path}: {exc.strerror or exc}") from None
        return st.st_size, st.st_mtime_ns

    def open(self) -> None:
        ident = self._identity()
        entry = None if self.cfg.loop else self.journal.video(self.camera)
        if entry is not None and (entry.path, entry.size, entry.mtime_ns) != (str(self.path), *ident):
            entry = None  # another file, or this one changed: read from the start
        if entry is not None and entry.done:
            log.info("camera %s: %s was read to its end before; not read again", self.camera, self.path)
            raise SourceEnded(self.describe())
        if entry is None:  # not read before: it must be complete first
            deadline = time.monotonic() + self.cfg.settle_s
            while time.monotonic() < deadline:
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            if self._identity() != ident or open_for_writing(self.path):
                raise SourceError(f"video file {self.path} is still being written")
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {self.describe()}")
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        self._fps = fps if 0 < fps < 1000 else 25.0
        self._period = 1.0 / self._fps if self.cfg.pace and 0 < fps < 1000 else 0.0
        start = 0
        if not self.cfg.loop:
            if entry is None:
                entry = VideoEntry(str(self.path), ident[0], ident[1], os.urandom(16), time.time_ns() // 1000, 0, False)
                self.journal.set_video(self.camera, entry)
            start = entry.next_index
            for _ in range(start):  # exact, where seeking by frame number is not in every container
                if not cap.grab():
                    break
            if start:
                log.info("camera %s: resuming %s at frame %d", self.camera, self.path, start)
        with self._lock:
            self._entry, self._index, self._watermark = entry, start, start
            self._resolved, self._end = set(), None
        self.cap = cap
        self._next = time.monotonic()

    def read(self) -> Read:
        if self.cap is None:
            raise SourceError("not open")
        if self._period:
            delay = self._next - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._next = max(self._next + self._period, time.monotonic() - self._period)
        ok, frame = self.cap.read()
        if self.cfg.loop:
            if not (ok and frame is not None):
                self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, frame = self.cap.read()
                if not (ok and frame is not None):
                    raise SourceError(f"{self.describe()}: cannot rewind")
            return frame
        entry = self._entry
        assert entry is not None
        with self._lock:
            i = self._index
            if not (ok and frame is not None):
                self._end = i
                self._save_locked(force=True)
                raise SourceEnded(self.describe())
            self._index += 1
        ts = entry.started_us + int(round(i * 1e6 / self._fps))
        return Captured(frame, ts, new_frame_id(ts, seed=entry.seed + i.to_bytes(8, "big")),
                        source=source_name(self.path.name), ticket=_Ticket(self, i))

    def _committed(self, index: int) -> None:
        self._resolve(index)

    def _skipped(self, index: int) -> None:
        self._resolve(index)

    def _failed(self, index: int, reason: str, retry: bool) -> None:  # noqa: ARG002 - a frame is not read twice
        log.warning("camera %s: %s frame %d not encoded: %s", self.camera, self.path.name, index, reason)
        self._resolve(index)

    def _resolve(self, index: int) -> None:
        with self._lock:
            self._resolved.add(index)
            while self._watermark in self._resolved:
                self._resolved.discard(self._watermark)
                self._watermark += 1
            self._save_locked(force=False)

    def _save_locked(self, force: bool) -> None:
        e = self._entry
        if e is None:
            return
        done = self._end is not None and self._watermark >= self._end
        if not force and not done and time.monotonic() - self._saved < self.SAVE_EVERY_S:
            return
        self._entry = replace(e, next_index=self._watermark, done=done)
        self.journal.set_video(self.camera, self._entry)
        self._saved = time.monotonic()

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None
        with self._lock:
            self._save_locked(force=True)
