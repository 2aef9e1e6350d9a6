"""Test data for anomaly scoring: frames made of a fixed vocabulary of "normal" token patterns, and odd ones.

Normal frames: each of the K=16 tokens is one of 24 vocabulary vectors plus a little noise, so a bank of normal
frames holds every pattern a normal frame shows; an odd frame has one token (its "defect") that is no pattern.
Centroids are the 4 x 4 patch centres of the tiny model, so a token's region is its patch.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from tokenline.frame_id import new_frame_id
from tokenline.manifest import Manifest
from tokenline.summary import Summary
from tokenline.wire import TokenMessage

K, GRID = 16, (4, 4)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def vocabulary(d: int = 384, n: int = 24, seed: int = 42) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def patch_centres() -> np.ndarray:
    ys, xs = np.divmod(np.arange(K), GRID[1])
    return np.stack([(xs + 0.5) / GRID[1], (ys + 0.5) / GRID[0]], axis=1).astype(np.float32)


def frame_message(manifest: Manifest, rng: np.random.Generator, ts_us: int, *, odd: Optional[int] = None,
                  site: str = "s1", line: str = "l1", camera: str = "c1", seq: int = 0,
                  vocab: Optional[np.ndarray] = None) -> TokenMessage:
    """A normal frame, or with ``odd`` the index of its one unusual token."""
    v = vocabulary(manifest.embedding_dim) if vocab is None else vocab
    tokens = unit(v[rng.integers(0, len(v), K)] + 0.03 * unit(rng.standard_normal((K, v.shape[1]))))
    if odd is not None:
        tokens[odd] = unit(rng.standard_normal(v.shape[1]))
    g = unit(tokens.mean(0))
    return TokenMessage(frame_id=new_frame_id(ts_us), device="d1", site=site, line=line, camera=camera,
                        capture_ts_us=ts_us, seq=seq, manifest_hash=manifest.hash_bytes(),
                        summary=Summary(g, tokens, np.ones(K, np.float32), patch_centres()), token_dtype="int8")
