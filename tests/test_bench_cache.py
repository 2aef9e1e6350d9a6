"""The benchmarks' feature cache (benchmarks/bench_summary.py): files unused for CACHE_DAYS are deleted when a new
file is written; reading a file marks it used."""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from benchmarks import bench_summary


class _Progress:
    def add_task(self, *a, **kw):
        return 0

    def advance(self, *a, **kw):
        pass


def _file(name: str, key: str) -> str:
    return f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.npz"  # cached_features' file name


def _features(name: str, key: str) -> dict:
    return bench_summary.cached_features(name, key, lambda i: np.full(2, i), 3, lambda: (lambda f: {"x": np.stack(f)}),
                                         2, _Progress())


def test_a_new_cache_file_prunes_the_ones_unused_for_the_cache_days(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(bench_summary, "CACHE", tmp_path)
    now = time.time()
    old, recent, read = tmp_path / "old-export.npz", tmp_path / "recent-export.npz", tmp_path / _file("read", "k")
    for p, age_days in ((old, 45), (recent, 10), (read, 45)):
        np.savez(p, x=np.arange(3))
        os.utime(p, (now - age_days * 86400, now - age_days * 86400))

    # a hit: the file read is marked used, and nothing is written, so nothing is pruned
    np.testing.assert_array_equal(_features("read", "k")["x"], np.arange(3))
    assert read.stat().st_mtime > now - 60 and old.exists()
    # a miss: extracted and written, and the files unused for 30 days (the default) deleted
    np.testing.assert_array_equal(_features("new", "k2")["x"], [[0, 0], [1, 1], [2, 2]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([read.name, recent.name, _file("new", "k2")])
    assert bench_summary.CACHE_DAYS == 30
    assert bench_summary.prune_cache(days=5) == [recent]
