"""Spherical k-means: unit vectors grouped by their nearest centroid (cosine), for inverted lists.

Used by the anomaly banks (``central.anomaly.bank``) and SQLite's vector files (``central.search``). Lloyd's
iterations on the sphere: each row goes to the centroid of largest cosine, each centroid becomes the normalized
sum of its rows; a list left empty keeps its last centroid. Deterministic given the seed rows.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

KMEANS_ITERS = 6


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, float32 (zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def assign(x: np.ndarray, cent: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """[M] the centroid of largest cosine for each row of ``x`` [M, d] (int32)."""
    out = np.empty(x.shape[0], np.int32)
    for i in range(0, x.shape[0], chunk):
        out[i: i + chunk] = np.argmax(np.asarray(x[i: i + chunk], np.float32) @ cent.T, axis=1)
    return out


def spherical_kmeans(x: np.ndarray, n_lists: int, seeds: np.ndarray, iters: int = KMEANS_ITERS
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """(list of each row [M], centroids [C, d]) by spherical k-means from the rows ``seeds``."""
    cent = unit(x[seeds[:n_lists]])
    for _ in range(max(1, iters)):
        a = assign(x, cent)
        sums = np.zeros_like(cent)
        np.add.at(sums, a, x)
        live = np.bincount(a, minlength=n_lists) > 0
        cent = np.where(live[:, None], unit(sums), cent)
    return assign(x, cent).astype(np.int64), cent
