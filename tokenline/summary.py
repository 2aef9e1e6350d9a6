"""The summary of a frame (global embedding + K summary tokens with footprints or sizes/centroids): one type, one table.

Everything that carries a frame's summary holds a ``Summary``: the encoder runners (a batch, with a leading
batch axis), the edge agent's results, the wire format's ``TokenMessage``, central's query encoder, stored
frames and search hits (one frame). ``OUTPUTS`` lists, per summary method, the encoder's output tensors: their
ONNX names, in order, their dtypes and their shapes as functions of the model's ``Layout`` (K tokens of dim d,
a global embedding of dim D, the footprint grid); ``output_shapes`` derives every shape from it, for the
exporter's graph, the manifest and the runners' checks. A new part of the summary (a field here, a row in
``OUTPUTS``) lands in this file first.

Methods:

- ``slic`` (the exporter's head): K spatially coherent summary tokens of dim d (block-L features, centred and
  projected) and a footprint [grid_h, grid_w] naming for every cell of the model input the token that stands
  for it; sizes and centroids derive from the footprint (``boxes_from_footprint``). ``patch_mean`` [d] is the
  unit mean of the same centred, projected patch tokens: the query vector of a crop in region search.
- ``informativity`` (models exported before): K tokens of dim D with sizes and centroids as outputs; still
  read by the runners, the wire format and central.

Python 3.8+, numpy only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np


class SummaryError(ValueError):
    """Arrays that do not form a summary of the expected shape (wrong count, shape, or non-finite values)."""


@dataclass(frozen=True)
class Layout:
    """The dimensions of a model's summary: K tokens of dim ``token_dim`` (d), a global embedding of dim ``dim``
    (D) and, for footprint methods, the footprint ``grid`` (rows, cols)."""

    k: int
    dim: int
    token_dim: int
    grid: Optional[Tuple[int, int]] = None


@dataclass(frozen=True)
class OutputSpec:
    """One encoder output: the ``Summary`` field it fills, its ONNX tensor name, dtype and per-image shape."""

    field: str
    name: str
    shape: Callable[[Layout], Tuple[int, ...]]  # layout -> shape without the batch axis
    dtype: str = "float32"


def _grid(layout: Layout) -> Tuple[int, int]:
    if layout.grid is None:
        raise SummaryError("this summary method needs a footprint grid")
    return (int(layout.grid[0]), int(layout.grid[1]))


_GLOBAL = OutputSpec("global_embedding", "global_embedding", lambda lay: (lay.dim,))
_TOKENS = OutputSpec("tokens", "summary_tokens", lambda lay: (lay.k, lay.token_dim))
OUTPUTS: Dict[str, Tuple[OutputSpec, ...]] = {
    "slic": (
        _GLOBAL,
        _TOKENS,
        OutputSpec("footprint", "summary_footprint", _grid, "int32"),
        OutputSpec("patch_mean", "patch_mean", lambda lay: (lay.token_dim,)),
    ),
    "informativity": (
        _GLOBAL,
        _TOKENS,
        OutputSpec("sizes", "summary_sizes", lambda lay: (lay.k,)),
        OutputSpec("centroids", "summary_centroids", lambda lay: (lay.k, 2)),
    ),
}
METHODS: Tuple[str, ...] = tuple(OUTPUTS)
FOOTPRINT_METHODS: Tuple[str, ...] = ("slic",)  # methods whose sizes and centroids derive from a footprint
MAX_FOOTPRINT_CELLS = 256  # a footprint grid has at most 16 x 16 cells (128 bytes at 4 bits, K <= 16)


def outputs(method: str) -> Tuple[OutputSpec, ...]:
    """The output table of a summary method; ``SummaryError`` for an unknown one."""
    try:
        return OUTPUTS[method]
    except KeyError:
        raise SummaryError(f"unknown summary method {method!r} (known: {', '.join(METHODS)})") from None


def output_names(method: str) -> Tuple[str, ...]:
    return tuple(o.name for o in outputs(method))


def output_shapes(method: str, layout: Layout, batch: Optional[int] = None) -> List[Tuple[str, Tuple[int, ...]]]:
    """``[(ONNX name, shape)]`` of the encoder's outputs in order; ``batch`` None leaves the batch axis out,
    ``-1`` marks it dynamic (the manifest's convention)."""
    lead: Tuple[int, ...] = () if batch is None else (int(batch),)
    return [(o.name, lead + tuple(o.shape(layout))) for o in outputs(method)]


def footprint_grid(patch_grid: Tuple[int, int], max_cells: int = MAX_FOOTPRINT_CELLS) -> Tuple[Tuple[int, int], int]:
    """``((rows, cols), cell)``: the footprint grid of a model with ``patch_grid`` patches, whose cells are
    cell x cell patches, the smallest cell (1, 2, 3, ...) that divides both sides and leaves at most
    ``max_cells`` cells (224 px / 14: 16x16 patches, cell 1; 448 px / 14: 32x32 patches, cell 2)."""
    gh, gw = int(patch_grid[0]), int(patch_grid[1])
    for cell in range(1, max(gh, gw) + 1):
        if gh % cell == 0 and gw % cell == 0 and (gh // cell) * (gw // cell) <= max_cells:
            return (gh // cell, gw // cell), cell
    raise SummaryError(f"no footprint grid of at most {max_cells} cells divides the {gh}x{gw} patch grid")


@dataclass(frozen=True, eq=False)
class Summary:
    """A frame's summary, float32. Arrays have a leading batch axis when the summary holds a batch
    (what a runner returns); ``summary[i]`` is frame i's own summary.

    ``global_embedding`` [D] and ``tokens`` [K, d] are unit-norm (after dequantization: nearly);
    ``sizes`` [K] count the cells (patches, or cells of patches for a footprint) each token stands for;
    ``centroids`` [K, 2] are (x, y) in [0, 1] of the model input. ``footprint`` [grid_h, grid_w] (uint8), when
    the model gives one, names for every cell of the model input the token that stands for it; sizes and
    centroids then derive from it (``boxes_from_footprint``). ``patch_mean`` [d], when the model gives it, is the
    unit mean of the frame's patch tokens in the tokens' space (a crop's query vector); it is not sent on the wire.
    """

    global_embedding: np.ndarray
    tokens: np.ndarray
    sizes: np.ndarray
    centroids: np.ndarray
    footprint: Optional[np.ndarray] = None
    patch_mean: Optional[np.ndarray] = None

    # -- shape ----------------------------------------------------------------------------------------------
    def arrays(self) -> Dict[str, np.ndarray]:
        """Every array the summary holds, by field name (absent optional fields left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def batched(self) -> bool:
        return self.tokens.ndim == 3

    @property
    def k(self) -> int:
        return int(self.tokens.shape[-2])

    @property
    def dim(self) -> int:
        """D, the global embedding's dimension."""
        return int(self.global_embedding.shape[-1])

    @property
    def token_dim(self) -> int:
        """d, the summary tokens' dimension (D unless the model projects them)."""
        return int(self.tokens.shape[-1])

    def __len__(self) -> int:
        if not self.batched:
            raise TypeError("a single frame's summary has no length; only a batch does")
        return int(self.global_embedding.shape[0])

    def __getitem__(self, i: int) -> "Summary":
        """Frame ``i`` of a batch."""
        if not self.batched:
            raise TypeError("only a batch can be indexed")
        return Summary(**{name: a[i] for name, a in self.arrays().items()})

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_outputs(cls, outs: Sequence[np.ndarray], method: str, layout: Layout,
                     batch: Optional[int] = None) -> "Summary":
        """Validate raw encoder outputs (the method's ``OUTPUTS`` order) against the layout and the batch size;
        float32 copies only where needed, a footprint as uint8 with sizes and centroids derived from it.
        ``SummaryError`` names the tensor that differs."""
        specs = outputs(method)
        if len(outs) != len(specs):
            raise SummaryError(f"model returned {len(outs)} outputs, expected {len(specs)} {output_names(method)}")
        got: Dict[str, np.ndarray] = {}
        for spec, (name, shape), arr in zip(specs, output_shapes(method, layout, batch), outs):
            arr = np.asarray(arr)
            if tuple(arr.shape) != shape:
                raise SummaryError(f"output {name} has shape {tuple(arr.shape)}, the manifest says {shape}")
            if spec.dtype == "int32":
                if not np.issubdtype(arr.dtype, np.integer):
                    raise SummaryError(f"output {name} is {arr.dtype}, the manifest says int32")
                if arr.size and (arr.min() < 0 or arr.max() >= layout.k):
                    raise SummaryError(f"output {name} names tokens outside 0..{layout.k - 1}")
                arr = arr.astype(np.uint8)
            else:
                arr = arr.astype(np.float32, copy=False)
                if not np.all(np.isfinite(arr)):
                    raise SummaryError(f"output {name} contains NaN or Inf")
            got[spec.field] = arr
        if "footprint" in got:
            fp = got["footprint"]
            flat = fp.reshape((-1,) + fp.shape[-2:])
            boxes = [boxes_from_footprint(f, layout.k) for f in flat]
            lead = fp.shape[:-2]
            got["sizes"] = np.stack([b[0] for b in boxes]).reshape(lead + (layout.k,))
            got["centroids"] = np.stack([b[1] for b in boxes]).reshape(lead + (layout.k, 2))
        return cls(**got)

    @classmethod
    def concat(cls, parts: Sequence["Summary"], n: Optional[int] = None) -> "Summary":
        """Batches joined along the batch axis, cut to the first ``n`` frames (padding dropped)."""
        if not parts:
            raise SummaryError("nothing to concatenate")
        names = list(parts[0].arrays())
        if any(list(p.arrays()) != names for p in parts):
            raise SummaryError("cannot concatenate summaries with different fields")
        return cls(**{name: np.concatenate([p.arrays()[name] for p in parts])[:n] for name in names})

    def without_query_fields(self) -> "Summary":
        """The summary as stored and sent: ``patch_mean`` (a query-side vector) dropped."""
        return replace(self, patch_mean=None)


def boxes_from_footprint(footprint: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Sizes [K] (cells per token) and centroids [K, 2] (mean cell centre, (x, y) in [0, 1]) of one frame's
    footprint [grid_h, grid_w]; a token that stands for no cell has size 0 and centroid (0.5, 0.5)."""
    fp = np.asarray(footprint)
    flat = fp.reshape(-1)
    wx, wy = _cell_centres(*fp.shape)
    sizes = np.bincount(flat, minlength=k)[:k].astype(np.float32)
    cent = np.full((k, 2), 0.5, np.float32)
    used = sizes > 0
    cent[used, 0] = np.bincount(flat, weights=wx, minlength=k)[:k][used] / sizes[used]
    cent[used, 1] = np.bincount(flat, weights=wy, minlength=k)[:k][used] / sizes[used]
    return sizes, cent


@functools.lru_cache(maxsize=32)
def _cell_centres(gh: int, gw: int) -> Tuple[np.ndarray, np.ndarray]:
    """x and y [gh * gw] of each footprint cell's centre in [0, 1], row-major."""
    ys, xs = np.divmod(np.arange(gh * gw), gw)
    return (xs + 0.5) / gw, (ys + 0.5) / gh


def footprint_mask(footprint: np.ndarray, token: int) -> np.ndarray:
    """[grid_h, grid_w] bool: the cells ``token`` stands for."""
    return np.asarray(footprint) == int(token)


def mask_box(mask: np.ndarray) -> Optional[Tuple[float, float, float, float]]:
    """The bounding box (x0, y0, x1, y1) in [0, 1] of the model input of a footprint mask; None when empty."""
    m = np.asarray(mask, bool)
    if not m.any():
        return None
    return tuple(float(v) for v in mask_boxes(m[None])[0])


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """``mask_box`` of many footprint masks [F, grid_h, grid_w] at once: [F, 4], all 0 for an empty mask."""
    m = np.asarray(masks, bool)
    _, gh, gw = m.shape
    rows, cols = m.any(axis=2), m.any(axis=1)  # [F, gh], [F, gw]
    boxes = np.stack([cols.argmax(axis=1) / gw, rows.argmax(axis=1) / gh,
                      (gw - cols[:, ::-1].argmax(axis=1)) / gw, (gh - rows[:, ::-1].argmax(axis=1)) / gh], axis=1)
    boxes[~rows.any(axis=1)] = 0.0
    return boxes


