"""Bounded queues with an explicit overload policy: a live camera's oldest item is dropped and counted when full;
a file source's item (``Sample.lossless``) is never dropped: its producer waits for room (back-pressure)."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Generic, List, Optional, Sequence, TypeVar

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from edge_agent.sources import Ticket

T = TypeVar("T")
WAIT_STEP_S = 0.2  # how often a waiting producer looks at its stop condition


@dataclass
class Sample:
    """One sampled camera frame on its way to the encoder."""

    camera: str
    line: str
    frame: np.ndarray
    capture_ts_us: int
    frame_id: bytes
    t_captured: float  # time.monotonic() at capture, for latency
    metadata: Optional[Dict[str, Any]] = None  # wire v2 metadata: {"source": file name, "labels": {...}}
    ticket: Optional["Ticket"] = None  # a file source's: told when the frame is committed, skipped or failed
    lossless: bool = False  # from a file source: waits for room, never dropped


class DropOldestQueue(Generic[T]):
    """FIFO of at most ``capacity`` items; ``put`` on a full queue drops the oldest item ``keep`` does not protect
    (the new one when all are protected) and counts it; ``put_wait`` waits for room instead."""

    def __init__(self, capacity: int, keep: Callable[[T], bool] = lambda _item: False) -> None:
        self.capacity = capacity
        self.keep = keep
        self._items: Deque[T] = deque()
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, item: T) -> Optional[T]:
        """Append; return the dropped item when the queue was full."""
        with self._cond:
            old = None
            if len(self._items) >= self.capacity:
                i = next((i for i, x in enumerate(self._items) if not self.keep(x)), None)
                if i is None:
                    self.dropped += 1
                    return item
                old = self._items[i]
                del self._items[i]
                self.dropped += 1
            self._items.append(item)
            self._cond.notify_all()
            return old

    def put_wait(self, item: T, give_up: Callable[[], bool]) -> bool:
        """Append once there is room; False (nothing queued) when ``give_up()`` turns true while waiting."""
        with self._cond:
            while len(self._items) >= self.capacity:
                if give_up():
                    return False
                self._cond.wait(WAIT_STEP_S)
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get_many(self, max_items: int, timeout: float) -> List[T]:
        """Wait up to ``timeout`` for one item, then take up to ``max_items`` without waiting."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            out = []
            while self._items and len(out) < max_items:
                out.append(self._items.popleft())
            if out:
                self._cond.notify_all()  # producers waiting for room
            return out

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class FrameHub:
    """Per-camera bounded frame queues drained round-robin into cross-camera batches: a live camera's oldest frame
    is dropped (counted) when its queue is full, a file source waits for room (``put_wait``)."""

    def __init__(self, capacities: Dict[str, int]) -> None:
        self._queues: Dict[str, Deque[Sample]] = {name: deque() for name in capacities}
        self.capacity = dict(capacities)
        self.dropped: Dict[str, int] = {name: 0 for name in capacities}
        self._order: List[str] = list(capacities)
        self._next = 0
        self._cond = threading.Condition()

    def put(self, sample: Sample) -> bool:
        """Queue a frame; returns False when an older frame of that camera had to be dropped."""
        with self._cond:
            q = self._queues[sample.camera]
            dropped = False
            if len(q) >= self.capacity[sample.camera]:
                q.popleft()
                self.dropped[sample.camera] += 1
                dropped = True
            q.append(sample)
            self._cond.notify_all()
            return not dropped

    def put_wait(self, sample: Sample, give_up: Callable[[], bool]) -> bool:
        """Queue a frame once its camera's queue has room; False when ``give_up()`` turns true first."""
        with self._cond:
            q = self._queues[sample.camera]
            while len(q) >= self.capacity[sample.camera]:
                if give_up():
                    return False
                self._cond.wait(WAIT_STEP_S)
            q.append(sample)
            self._cond.notify_all()
            return True

    def _total(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def take_batch(self, max_items: int, first_timeout: float, fill_timeout: float) -> List[Sample]:
        """Wait up to ``first_timeout`` for a frame, then up to ``fill_timeout`` more to fill the batch.

        Frames are taken round-robin over cameras, so a fast camera cannot starve a slow one.
        """
        out: List[Sample] = []
        with self._cond:
            if not self._total():
                self._cond.wait(first_timeout)
            deadline = time.monotonic() + fill_timeout
            while len(out) < max_items:
                if self._total():
                    self._take_round(out, max_items)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or not out:
                    break
                self._cond.wait(left)
            if out:
                self._cond.notify_all()  # file sources waiting for room
        return out

    def _take_round(self, out: List[Sample], max_items: int) -> None:
        n = len(self._order)
        for i in range(n):
            name = self._order[(self._next + i) % n]
            q = self._queues[name]
            if q and len(out) < max_items:
                out.append(q.popleft())
        self._next = (self._next + 1) % n

    def depths(self) -> Dict[str, int]:
        with self._cond:
            return {k: len(q) for k, q in self._queues.items()}

    def drain(self) -> Sequence[Sample]:
        with self._cond:
            out = [s for q in self._queues.values() for s in q]
            for q in self._queues.values():
                q.clear()
            return out
