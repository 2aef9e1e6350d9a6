"""Exact search over embedding rows held in memory: place codes, the filter mask, a deterministic top k.

Used by SQLite's vector files (``central.search.VectorIndex``) and PostgreSQL's open-segment mirror
(``central.hot``): rows carry site/line/camera as small integer codes and a capture time; a query's filters become
one boolean mask; the top k is by cosine, ties by row id (the same order on every run).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

PLACES = ("site", "line", "camera")


def new_codes() -> Dict[str, Dict[str, int]]:
    return {k: {} for k in PLACES}


def code(codes: Dict[str, Dict[str, int]], kind: str, value: str) -> int:
    """The code of ``value`` (a site, line or camera name), assigned on first sight."""
    c = codes[kind]
    if value not in c:
        c[value] = len(c)
    return c[value]


def filter_mask(mask: np.ndarray, codes: Mapping[str, Mapping[str, int]], place: Mapping[str, np.ndarray],
                ts: np.ndarray, site: Optional[str], line: Optional[str], camera: Optional[str],
                since_us: Optional[int], until_us: Optional[int]) -> np.ndarray:
    """``mask`` (modified) narrowed to the rows at the place and in ``[since_us, until_us)``."""
    for kind, want in zip(PLACES, (site, line, camera)):
        if want is not None:
            c = codes[kind].get(want)
            mask &= (place[kind] == c) if c is not None else False
    if since_us is not None:
        mask &= ts >= since_us
    if until_us is not None:
        mask &= ts < until_us
    return mask


def top_positions(sims: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` best rows by cosine ``sims``, best first, ties by ``ids``."""
    k = min(int(k), sims.size)
    if k <= 0:
        return np.zeros(0, np.int64)
    top = np.argpartition(-sims, k - 1)[:k]
    return top[np.lexsort((ids[top], -sims[top]))]


def top_k(sims: np.ndarray, ids: np.ndarray, k: int) -> List[Tuple[int, float]]:
    """The ``k`` best ``(id, cosine)`` by cosine, ties by id."""
    return [(int(ids[i]), float(sims[i])) for i in top_positions(sims, ids, k)]
