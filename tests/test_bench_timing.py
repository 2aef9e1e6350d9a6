"""The benchmarks' paired-cost statistics (benchmarks/_timing.py, bench_anomaly.paired_cost): the sign test's
interval for a median, its coverage, and a verdict only where the interval covers 90 %."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from benchmarks._timing import interval_coverage, median_interval


def _coverage(n: int, j: int) -> float:
    """P(x(j) <= median <= x(n+1-j)) for n draws of a continuous distribution: 1 - 2 P(Binomial(n, 1/2) < j)."""
    return 1 - 2 * sum(comb(n, i) for i in range(j)) / 2 ** n


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 8, 16, 20, 40])
def test_interval_is_the_sign_tests(n: int) -> None:
    xs = list(np.random.default_rng(n).permutation(n).astype(float))
    med, lo, hi = median_interval(xs)
    assert med == pytest.approx(np.median(xs))
    j = int(lo) + 1  # the values are 0..n-1, so x(j) = j - 1
    assert hi == n - j  # symmetric order statistics
    assert interval_coverage(n) == pytest.approx(_coverage(n, j))
    if n >= 5:  # the largest j whose coverage is still at least 90 %
        assert _coverage(n, j) >= 0.9 > _coverage(n, j + 1)
    else:  # too few values: the whole range, covering less than 90 %
        assert (lo, hi) == (0, n - 1) and interval_coverage(n) < 0.9


def test_paired_cost_needs_five_pairs() -> None:
    from benchmarks.bench_anomaly import paired_cost

    low = {"off": [100.0] * 4, "on": [99.0] * 4}  # 1 % each pair: met, were there enough pairs
    assert "too few" in paired_cost(low)["verdict"]
    assert paired_cost({"off": [100.0] * 5, "on": [99.0] * 5})["verdict"] == "met"
    assert paired_cost({"off": [100.0] * 5, "on": [80.0] * 5})["verdict"] == "missed"
    spread = {"off": [100.0] * 8, "on": [70.0, 95.0, 99.0, 100.0, 101.0, 105.0, 120.0, 80.0]}
    assert paired_cost(spread)["verdict"] == "not resolved at this machine's noise"
