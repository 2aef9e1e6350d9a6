"""k-means for inverted lists: spherical (unit vectors, cosine) or Euclidean.

Used by the anomaly banks (``central.anomaly.bank``) and SQLite's vector files (``central.search``). Lloyd's
iterations: each row goes to the centroid of largest cosine (spherical) or the nearest one (Euclidean: largest
x . c - |c|^2 / 2), each centroid becomes the normalized sum (the mean) of its rows; a list left empty keeps its
last centroid. Deterministic given the seed rows.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

KMEANS_ITERS = 6


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, float32 (zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def assign(x: np.ndarray, cent: np.ndarray, chunk: int = 8192, euclidean: bool = False) -> np.ndarray:
    """[M] the centroid of largest cosine (``euclidean``: the nearest) for each row of ``x`` [M, d] (int32)."""
    out = np.empty(x.shape[0], np.int32)
    half = 0.5 * np.einsum("ij,ij->i", cent, cent) if euclidean else 0.0
    for i in range(0, x.shape[0], chunk):
        out[i: i + chunk] = np.argmax(np.asarray(x[i: i + chunk], np.float32) @ cent.T - half, axis=1)
    return out


def kmeans(x: np.ndarray, n_lists: int, seeds: np.ndarray, iters: int = KMEANS_ITERS,
           euclidean: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """(list of each row [M], centroids [C, d]) by spherical k-means from the rows ``seeds`` (``euclidean``:
    plain k-means, centroids the means of their rows)."""
    x = np.asarray(x, np.float32)
    cent = x[seeds[:n_lists]].copy() if euclidean else unit(x[seeds[:n_lists]])
    for _ in range(max(1, iters)):
        a = assign(x, cent, euclidean=euclidean)
        sums = np.zeros_like(cent)
        np.add.at(sums, a, x)
        n = np.bincount(a, minlength=n_lists)
        cent = np.where((n > 0)[:, None], sums / np.maximum(n, 1)[:, None] if euclidean else unit(sums), cent)
    return assign(x, cent, euclidean=euclidean).astype(np.int64), cent
