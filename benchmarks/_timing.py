"""Side-by-side ONNX Runtime CPU timing of several models, in interleaved rounds under the benchmark lock.

Other developers share this machine's cores: every timing run holds /tmp/tokenline-bench.lock (quality runs do
not), rounds interleave the models so that each sees the same machine state, and a model's speed-up is the
median over rounds of its ratio to the base model in the same round.
"""

from __future__ import annotations

import fcntl
import statistics
from contextlib import contextmanager
from math import comb
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple, Union

import numpy as np

LOCK = Path("/tmp/tokenline-bench.lock")


@contextmanager
def bench_lock() -> Iterator[None]:
    """Hold the machine's benchmark lock for the duration of a timing run."""
    with open(LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def add_timing_args(ap, rounds: int = 7) -> None:
    """The command-line options of a side-by-side ONNX Runtime timing run: rounds, batch, intra-op threads."""
    ap.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds (median of the ratios reported)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)


def time_side_by_side(paths: Dict[str, Path], x: Union[np.ndarray, Dict[str, np.ndarray]], rounds: int, threads: int,
                      base: str, step: Callable[[], None] = lambda: None) -> Dict[str, dict]:
    """{name: {img_s, ratio, rounds}} for ONNX models run on the batch ``x`` (or ``x[name]``: models of different
    input sizes); ``ratio`` is against ``base``."""
    from exporter.validate import ort_session, throughput

    with bench_lock():
        sessions = {name: ort_session(p, threads=threads) for name, p in paths.items()}
        rates: Dict[str, List[float]] = {name: [] for name in sessions}
        for _ in range(rounds):
            for name, sess in sessions.items():
                rates[name].append(throughput(sess, x[name] if isinstance(x, dict) else x, 1))
            step()
    ref = rates[base]
    return {name: {"img_s": statistics.median(r), "ratio": statistics.median(a / b for a, b in zip(r, ref)),
                   "rounds": len(r)} for name, r in rates.items()}


def _sign_rank(n: int, level: float) -> Tuple[int, float]:
    """(j, coverage): the rank of the sign test's interval for the median of ``n`` values, the largest j with
    P(Binomial(n, 1/2) < j) <= (1 - level) / 2 (at least 1), and the interval's coverage 1 - 2 P(Binomial < j)."""
    tail, j = 0.0, 0
    while j < n // 2 and tail + comb(n, j) / 2 ** n <= (1 - level) / 2:
        tail += comb(n, j) / 2 ** n
        j += 1
    return (j, 1 - 2 * tail) if j else (1, 1 - 2 / 2 ** n)


def median_interval(values: List[float], level: float = 0.9) -> Tuple[float, float, float]:
    """(median, lo, hi) of ``values`` with a distribution-free interval for the median: the order statistics
    x(j) and x(n+1-j) (the sign test's interval, ``_sign_rank``; its coverage is at least ``level``). With too
    few values for that level (fewer than 5 at 0.9) the interval is the whole range, whose coverage
    (``interval_coverage``) is below ``level``."""
    xs, n = sorted(values), len(values)
    j, _ = _sign_rank(n, level)
    return statistics.median(xs), xs[j - 1], xs[n - j]


def interval_coverage(n: int, level: float = 0.9) -> float:
    """The coverage of ``median_interval``'s interval over ``n`` values (at least ``level`` from 5 values at 0.9)."""
    return _sign_rank(n, level)[1]
