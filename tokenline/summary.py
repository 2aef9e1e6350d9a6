"""The summary of a frame (global embedding + K summary tokens with sizes and centroids): one type, one table.

Everything that carries a frame's summary holds a ``Summary``: the encoder runners (a batch, with a leading
batch axis), the edge agent's results, the wire format's ``TokenMessage``, central's query encoder, stored
frames and search hits (one frame). ``OUTPUTS`` is the single list of the encoder's output tensors: their ONNX
names, in order, and their shapes as functions of K (summary tokens) and D (embedding dimension);
``output_shapes`` derives every shape from it, for the exporter's graph, the manifest and the runners' checks.
A new part of the summary (a field here, a row in ``OUTPUTS``) lands in this file first.

Python 3.8+, numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np


class SummaryError(ValueError):
    """Arrays that do not form a summary of the expected shape (wrong count, shape, or non-finite values)."""


@dataclass(frozen=True)
class OutputSpec:
    """One encoder output: the ``Summary`` field it fills, its ONNX tensor name, its per-image shape."""

    field: str
    name: str
    shape: Callable[[int, int], Tuple[int, ...]]  # (K, D) -> shape without the batch axis


OUTPUTS: Tuple[OutputSpec, ...] = (
    OutputSpec("global_embedding", "global_embedding", lambda k, d: (d,)),
    OutputSpec("tokens", "summary_tokens", lambda k, d: (k, d)),
    OutputSpec("sizes", "summary_sizes", lambda k, d: (k,)),
    OutputSpec("centroids", "summary_centroids", lambda k, d: (k, 2)),
)
OUTPUT_NAMES: Tuple[str, ...] = tuple(o.name for o in OUTPUTS)


def output_shapes(k: int, d: int, batch: Optional[int] = None) -> List[Tuple[str, Tuple[int, ...]]]:
    """``[(ONNX name, shape)]`` of the encoder's outputs in order; ``batch`` None leaves the batch axis out,
    ``-1`` marks it dynamic (the manifest's convention)."""
    lead: Tuple[int, ...] = () if batch is None else (int(batch),)
    return [(o.name, lead + tuple(o.shape(k, d))) for o in OUTPUTS]


@dataclass(frozen=True, eq=False)
class Summary:
    """A frame's summary, float32. Arrays have a leading batch axis when the summary holds a batch
    (what a runner returns); ``summary[i]`` is frame i's own summary.

    ``global_embedding`` [D] and ``tokens`` [K, D] are unit-norm (after dequantization: nearly);
    ``sizes`` [K] count the patches each token stands for; ``centroids`` [K, 2] are (x, y) in [0, 1] of the
    model input. ``footprint`` [grid_h, grid_w] (uint8), when the model gives one, names for every patch of
    the model input the token that stands for it; sizes and centroids then derive from it
    (``boxes_from_footprint``).
    """

    global_embedding: np.ndarray
    tokens: np.ndarray
    sizes: np.ndarray
    centroids: np.ndarray
    footprint: Optional[np.ndarray] = None

    # -- shape ----------------------------------------------------------------------------------------------
    def arrays(self) -> Tuple[np.ndarray, ...]:
        """The arrays in ``OUTPUTS`` order."""
        return tuple(getattr(self, o.field) for o in OUTPUTS)

    @property
    def batched(self) -> bool:
        return self.tokens.ndim == 3

    @property
    def k(self) -> int:
        return int(self.tokens.shape[-2])

    @property
    def dim(self) -> int:
        return int(self.global_embedding.shape[-1])

    def __len__(self) -> int:
        if not self.batched:
            raise TypeError("a single frame's summary has no length; only a batch does")
        return int(self.global_embedding.shape[0])

    def __getitem__(self, i: int) -> "Summary":
        """Frame ``i`` of a batch."""
        if not self.batched:
            raise TypeError("only a batch can be indexed")
        return Summary(*(a[i] for a in self.arrays()), footprint=None if self.footprint is None else self.footprint[i])

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_outputs(cls, outs: Sequence[np.ndarray], k: int, d: int, batch: Optional[int] = None) -> "Summary":
        """Validate raw encoder outputs (``OUTPUTS`` order) against K, D and the batch size; float32 copies
        only where needed. ``SummaryError`` names the tensor that differs."""
        if len(outs) != len(OUTPUTS):
            raise SummaryError(f"model returned {len(outs)} outputs, expected {len(OUTPUTS)} {OUTPUT_NAMES}")
        fixed = []
        for (name, shape), arr in zip(output_shapes(k, d, batch), outs):
            arr = np.asarray(arr)
            if tuple(arr.shape) != shape:
                raise SummaryError(f"output {name} has shape {tuple(arr.shape)}, the manifest says {shape}")
            arr = arr.astype(np.float32, copy=False)
            if not np.all(np.isfinite(arr)):
                raise SummaryError(f"output {name} contains NaN or Inf")
            fixed.append(arr)
        return cls(*fixed)

    @classmethod
    def concat(cls, parts: Sequence["Summary"], n: Optional[int] = None) -> "Summary":
        """Batches joined along the batch axis, cut to the first ``n`` frames (padding dropped)."""
        if not parts:
            raise SummaryError("nothing to concatenate")
        joined = [np.concatenate(arrs)[:n] for arrs in zip(*(p.arrays() for p in parts))]
        fps = [p.footprint for p in parts]
        footprint = None if any(f is None for f in fps) else np.concatenate(fps)[:n]
        return cls(*joined, footprint=footprint)


def boxes_from_footprint(footprint: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Sizes [K] (patches per token) and centroids [K, 2] (mean patch centre, (x, y) in [0, 1]) of one frame's
    footprint [grid_h, grid_w]; a token that stands for no patch has size 0 and centroid (0.5, 0.5)."""
    fp = np.asarray(footprint)
    gh, gw = fp.shape
    flat = fp.reshape(-1).astype(np.int64)
    ys, xs = np.divmod(np.arange(gh * gw), gw)
    sizes = np.bincount(flat, minlength=k)[:k].astype(np.float32)
    sx = np.bincount(flat, weights=(xs + 0.5) / gw, minlength=k)[:k]
    sy = np.bincount(flat, weights=(ys + 0.5) / gh, minlength=k)[:k]
    safe = np.maximum(sizes, 1.0)
    cent = np.stack([np.where(sizes > 0, sx / safe, 0.5), np.where(sizes > 0, sy / safe, 0.5)], axis=-1)
    return sizes, cent.astype(np.float32)
