"""Content-addressed filesystem blob store for originals: atomic writes, fsync, and a cross-process lock."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from pathlib import Path
from typing import Iterator, Tuple


class BlobStore:
    """Blobs live at ``<root>/<aa>/<bb>/<sha256>``; writes go through ``<root>/tmp`` and ``os.replace``.

    ``lock()`` is an exclusive ``flock`` on ``<root>/.lock``: the API (store + row commit) and the sweeper
    (reference check + unlink) hold it so that a shared blob is never removed under a new reference.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._lockfile = self.root / ".lock"

    @staticmethod
    def key(sha256: str) -> str:
        return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"

    def path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root not in p.parents:
            raise ValueError(f"blob key escapes the store: {key!r}")
        return p

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with open(self._lockfile, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def put(self, data: bytes) -> Tuple[str, str]:
        """Write ``data`` durably under its sha256; returns ``(key, sha256)``. Idempotent."""
        sha = hashlib.sha256(data).hexdigest()
        key = self.key(sha)
        dest = self.path(key)
        if dest.is_file() and dest.stat().st_size == len(data):
            return key, sha
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{sha}.{os.getpid()}.{time.monotonic_ns()}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(dest.parent)
        return key, sha

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def delete(self, key: str, sync: bool = True) -> bool:
        """Remove a blob; False when it was already gone (a resumed sweep). ``sync=False`` leaves the
        directory fsync to the caller (``sync_dirs``), so a batch of deletions costs one fsync per directory."""
        p = self.path(key)
        try:
            p.unlink()
        except FileNotFoundError:
            return False
        if sync:
            _fsync_dir(p.parent)
        return True

    def sync_dirs(self, keys: "list[str]") -> None:
        for d in {self.path(k).parent for k in keys}:
            if d.is_dir():
                _fsync_dir(d)

    def iter_blobs(self) -> Iterator[Tuple[str, float]]:
        """``(key, mtime)`` of every stored blob (not temporaries)."""
        for p in self.root.glob("??/??/*"):
            if p.is_file() and len(p.name) == 64:
                yield p.relative_to(self.root).as_posix(), p.stat().st_mtime

    def iter_temporaries(self) -> Iterator[Tuple[Path, float]]:
        for p in self.tmp.glob("*.part"):
            yield p, p.stat().st_mtime


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
