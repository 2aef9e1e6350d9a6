"""Quantization noise shaping in the benchmarks' compression (benchmarks/bench_summary.py: shaped_round_trip, the
research path of benchmarks/bench_noise_shaping.py): the rounding noise lands on the principal axes in proportion to
lam^(a/2), so the whitened error falls as a rises while the bytes stay those of the wire's int4."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bench_summary import Variant, shaped_round_trip


def _tokens(n: int = 4000, d: int = 64):
    """Unit tokens on principal axes whose variances fall by 1000x from the first axis to the last."""
    lam = np.geomspace(1.0, 1e-3, d)
    x = np.random.default_rng(0).standard_normal((n, d)) * np.sqrt(lam)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.mean(x**2, axis=0)


def _relative_noise(a: float) -> np.ndarray:
    """Per axis: the rounding error's spread over the axis's own spread (what whitening at central sees)."""
    p, lam = _tokens()
    back = shaped_round_trip(p, lam, a, "int4")
    return (back - p).std(axis=0) / p.std(axis=0)


def test_unshaped_int4_noise_swamps_the_low_variance_axes_and_shaping_evens_it() -> None:
    even = _relative_noise(0.0)
    full = _relative_noise(1.0)
    head, tail = slice(0, 8), slice(-8, None)
    assert even[tail].mean() > 5 * even[head].mean()  # today's even noise, large against the small axes
    assert full[tail].mean() < 2 * full[head].mean()  # a = 1: the same share of every axis
    whitened = {a: float(np.mean(_relative_noise(a) ** 2)) for a in (0.0, 0.5, 1.0)}
    assert whitened[1.0] < whitened[0.5] < whitened[0.0] / 2


def test_shaping_keeps_tokens_unit_and_close() -> None:
    p, lam = _tokens(500)
    back = shaped_round_trip(p, lam, 0.5, "int8")
    assert np.allclose(np.linalg.norm(back, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(back * p, axis=1)) > 0.99  # int8: cosine to the original above 0.99


def test_a_shaped_variant_needs_a_projection_and_integer_tokens() -> None:
    assert Variant("s", "new", "int4", 64, shape=0.5).label == "s, PCA 64, int4, shaped a=0.5"
    for bad in (dict(dtype="int4", dims=0), dict(dtype="fp32", dims=64)):
        with pytest.raises(ValueError, match="noise shaping"):
            Variant("s", "new", bad["dtype"], bad["dims"], shape=0.5)
