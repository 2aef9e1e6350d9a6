"""Frame hub and results queue: bounded, drop the oldest, counted; batches round-robin over cameras."""

from __future__ import annotations

import time

import numpy as np

from edge_agent.queues import DropOldestQueue, FrameHub, Sample
from tokenline.frame_id import new_frame_id


def _sample(cam: str, i: int) -> Sample:
    return Sample(cam, "l", np.zeros((2, 2, 3), np.uint8), i, new_frame_id(i), 0.0)


def test_frame_hub_drops_oldest_counted_and_batches_round_robin() -> None:
    hub = FrameHub({"a": 3, "b": 3})
    for i in range(5):
        hub.put(_sample("a", i))
    hub.put(_sample("b", 100))
    assert hub.dropped == {"a": 2, "b": 0} and hub.depths() == {"a": 3, "b": 1}
    batch = hub.take_batch(3, 0.1, 0.0)
    assert [(s.camera, s.capture_ts_us) for s in batch] == [("a", 2), ("b", 100), ("a", 3)]
    assert hub.take_batch(8, 0.0, 0.0)[0].capture_ts_us == 4
    t0 = time.monotonic()
    assert hub.take_batch(4, 0.05, 0.0) == [] and time.monotonic() - t0 < 1


def test_drop_oldest_queue() -> None:
    q: DropOldestQueue[int] = DropOldestQueue(2)
    assert q.put(1) is None and q.put(2) is None and q.put(3) == 1
    assert q.dropped == 1 and q.get_many(5, 0.01) == [2, 3]
