"""Sampling: which captured frames are encoded (max_fps, every Nth, trigger)."""

from __future__ import annotations

import numpy as np

from edge_agent import config as C
from edge_agent.capture import Sampler


def test_sampler_modes() -> None:
    s = Sampler(C.SamplingConfig(mode="every_nth", every_nth=3))
    assert [s.take(0.0) for _ in range(7)] == [True, False, False, True, False, False, True]
    s = Sampler(C.SamplingConfig(mode="max_fps", max_fps=10))
    taken = [t for t in np.arange(0, 1.0, 0.01) if s.take(float(t))]  # 100 fps in -> about 10 out
    assert 9 <= len(taken) <= 11
    s = Sampler(C.SamplingConfig(mode="trigger"))
    assert not s.take(0.0)
    s.trigger()
    s.trigger()
    assert [s.take(0.0) for _ in range(3)] == [True, True, False]
