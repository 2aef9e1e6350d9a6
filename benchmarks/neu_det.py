"""NEU-DET retrieval evaluation: load the data set and score embeddings (1-NN accuracy, precision@10, mAP)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NEU_DET = ROOT.parent / "shared" / "datasets" / "neu-det" / "images"


def load_neu_det(folder: Path = NEU_DET, per_class: int = 0) -> Tuple[List[Path], np.ndarray, List[str]]:
    """Image paths, integer labels and class names (the class is the file name's prefix); ``per_class`` > 0
    keeps the first that many images of each class."""
    if not folder.is_dir():
        raise SystemExit(f"NEU-DET not found at {folder} (expected ../shared/datasets/neu-det/images)")
    paths = sorted(folder.glob("*.jpg"))
    names = [p.stem.rsplit("_", 1)[0] for p in paths]
    classes = sorted(set(names))
    labels = np.array([classes.index(n) for n in names])
    if per_class:
        keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(classes))])
        paths, labels = [paths[i] for i in keep], labels[keep]
    return paths, labels, classes


def retrieval_metrics(emb: np.ndarray, labels: np.ndarray, k: int = 10) -> Dict[str, float]:
    """Leave-one-out image-to-image retrieval with cosine similarity; class = relevance.

    Returns 1-NN accuracy, precision@k and mAP (mean over queries of average precision over the full ranking).
    """
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1)[:, :-1]  # drop the query itself (last after -inf)
    rel = labels[order] == labels[:, None]
    nn1 = float(rel[:, 0].mean())
    p_at_k = float(rel[:, :k].mean())
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    ap = (rel * hits / ranks).sum(axis=1) / np.maximum(rel.sum(axis=1), 1)
    return {"1nn": nn1, f"p@{k}": p_at_k, "map": float(ap.mean())}


def split_halves(labels: np.ndarray, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """A seeded half of each class's images (calibration) and the other half (held out), as sorted indices."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        first.append(idx[: len(idx) // 2])
        second.append(idx[len(idx) // 2 :])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def first_per_class(rows: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` of each class among ``rows`` (e.g. the calibration half, which is seeded and shuffled
    within each class by ``split_halves``), sorted; ``n`` = 0 keeps them all."""
    if not n:
        return rows
    return np.sort(np.concatenate([rows[labels[rows] == c][:n] for c in np.unique(labels)]))


def calibration_split(calib_per_class: int, per_class: int = 0):
    """NEU-DET as the budget studies use it: (paths, labels, calib, held), ``calib`` the first ``calib_per_class``
    images per class of the calibration half (what a search sees, 0: all of it), ``held`` the other half."""
    paths, labels, _ = load_neu_det(per_class=per_class)
    calib_half, held = split_halves(labels)
    return paths, labels, first_per_class(calib_half, labels, calib_per_class), held
