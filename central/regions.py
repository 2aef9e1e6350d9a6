"""Region search: frames that hold a region like the query anywhere, scored by their best-matching summary token.

Three queries, one vector in the summary tokens' space (d dims; crops and boxes need a model with footprints):

- a **crop** (an image file): encoded by the model like a frame; its ``patch_mean`` (the unit mean of its centred,
  projected patch tokens) is the query vector;
- a **box on a stored frame** ("find frames with this anywhere"): the box, given as fractions of the original
  frame, is mapped into the model input (``tokenline.preprocess.frame_to_input``: ROI, letterbox and centre crop
  aware); each summary token whose footprint overlaps it weighs by the overlap's area, and the query vector is
  the unit weighted mean of those tokens. The frame itself is left out of the results;
- a **token of a stored frame** (frames like a flagged frame's anomalous region, ``central.anomaly.queries``).

Scoring is exact: every frame of the model that passes the filters is read (in id order, ``SCAN_ROWS`` at a
time) and scored by max_j cos(q, t_j) over its tokens that stand for at least one cell; the top k by score,
ties by row id. Each result names its matched token and that token's footprint in the original frame's
coordinates (``match_json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from central import store
from central.errors import Invalid
from central.kmeans import unit
from central.store import FrameData, ModelInfo
from sql.models import Frame
from sql.types import unpack_f32_rows, unpack_token_rows
from tokenline.manifest import InputSpec
from tokenline.preprocess import Box, FrameGeometry, frame_to_input, input_to_frame, mask_to_frame
from tokenline.summary import mask_box

if TYPE_CHECKING:  # pragma: no cover
    from central.encoder import EncoderPool

BAD_QUERY = "bad_query"
SCAN_ROWS = 2000  # frames read per round trip of the scan


@dataclass
class RegionQuery:
    """A region query: the unit vector [d] and where it came from (for the answer)."""

    model_id: int
    vector: np.ndarray
    kind: str  # "crop", "box" or "token"
    frame_id: Optional[str] = None  # box: the frame it was drawn on (never its own result)
    box: Optional[Box] = None  # box: fractions of that frame
    tokens: List[Dict[str, Any]] = field(default_factory=list)  # box: the tokens it drew on, with their weights

    def public(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"kind": self.kind}
        if self.kind == "box":
            out.update(frame_id=self.frame_id, box=[round(v, 4) for v in self.box or ()], tokens=self.tokens)
        return out


@dataclass
class RegionHit:
    id: int
    score: float
    token: int
    frame: FrameData
    spec: InputSpec

    def public(self) -> Dict[str, Any]:
        meta = self.frame.meta()
        for key in ("centroids", "sizes", "footprint"):
            meta.pop(key, None)
        return {"frame_id": self.frame.frame_id, "score": round(self.score, 6),
                "match": match_json(self.frame, self.token, self.score, self.spec), **meta}


def needs_footprints(model: ModelInfo) -> None:
    if not model.has_footprint:
        raise Invalid(f"model {model.name!r} has no footprints ({model.manifest.summary.method} summary); region "
                      "search needs a model exported with the slic summary head", reason=BAD_QUERY)


def frame_geometry_or_input(frame: FrameData, spec: InputSpec) -> Tuple[FrameGeometry, bool]:
    """The frame's geometry, or (for frames sent without it) the model input's own, and whether it was known."""
    if frame.geometry is not None:
        return frame.geometry, True
    return FrameGeometry(spec.width, spec.height), False


# -- queries (central.search.build_region_query resolves the model and picks one) -------------------------------
def crop_query(encoders: "EncoderPool", model: ModelInfo, image: bytes, max_pixels: int) -> RegionQuery:
    """The query of a crop (an encoded image file, at most ``max_pixels`` by its header): its patch mean."""
    needs_footprints(model)
    summary = encoders.get(model).encode_image_bytes(image, max_pixels)
    if summary.patch_mean is None:
        raise Invalid(f"model {model.name!r} gives no patch mean", reason=BAD_QUERY)
    return RegionQuery(model.id, unit(summary.patch_mean), "crop")


def box_weights(footprint: np.ndarray, box: Box, k: int) -> np.ndarray:
    """[K] area of each token's footprint inside ``box`` (fractions of the model input)."""
    gh, gw = footprint.shape
    xs, ys = np.arange(gw + 1) / gw, np.arange(gh + 1) / gh
    ox = np.clip(np.minimum(xs[1:], box[2]) - np.maximum(xs[:-1], box[0]), 0, None)  # [gw]
    oy = np.clip(np.minimum(ys[1:], box[3]) - np.maximum(ys[:-1], box[1]), 0, None)  # [gh]
    area = oy[:, None] * ox[None, :]
    return np.bincount(footprint.reshape(-1).astype(np.int64), weights=area.reshape(-1), minlength=k)[:k]


def box_query(fr: FrameData, model: ModelInfo, box: Box) -> RegionQuery:
    """The query of a box (x0, y0, x1, y1 as fractions of the original frame) drawn on the stored frame ``fr``."""
    if not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise Invalid("box must be x0,y0,x1,y1 with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of the "
                      "frame)", reason=BAD_QUERY)
    needs_footprints(model)
    fp = fr.summary.footprint
    if fp is None:
        raise Invalid(f"frame {fr.frame_id} was stored without a footprint (a version 1 message)", reason=BAD_QUERY)
    spec = model.manifest.input
    geo, _ = frame_geometry_or_input(fr, spec)
    px = (box[0] * geo.width, box[1] * geo.height, box[2] * geo.width, box[3] * geo.height)
    inside = frame_to_input(px, spec, geo)
    w = np.zeros(fr.summary.k) if inside is None else box_weights(fp, inside, fr.summary.k)
    if w.sum() <= 0:
        raise Invalid("the box covers no part of the frame the model saw", reason=BAD_QUERY)
    vec = unit((w[:, None] * fr.summary.tokens).sum(0))
    used = [{"token": int(j), "weight": round(float(w[j] / w.sum()), 4)} for j in np.flatnonzero(w)]
    return RegionQuery(model.id, vec, "box", frame_id=fr.frame_id, box=tuple(float(v) for v in box), tokens=used)


# -- scoring ---------------------------------------------------------------------------------------------------
def best_tokens(vector: np.ndarray, tokens: np.ndarray, sizes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(score [F], token [F]): each frame's best cosine to ``vector`` over its tokens that stand for a cell
    (``sizes`` > 0); a frame with none scores -inf."""
    sims = tokens @ vector  # [F, K]
    sims = np.where(sizes > 0, sims, -np.inf)
    best = sims.argmax(axis=1)
    return sims[np.arange(len(sims)), best], best


def region_search(engine: Engine, model: ModelInfo, query: RegionQuery, k: int, where: Sequence[Any],
                  max_results: int) -> List[RegionHit]:
    """The top ``k`` frames of ``model`` by best-matching token (exact scan, module docstring); ``where``: the
    filters' SQL conditions on ``frames`` (``central.search.frame_conditions``), the model's included. Crop and box
    queries need footprints; a stored token as the query does not."""
    if query.kind != "token":
        needs_footprints(model)
    k = max(1, min(int(k), max_results))
    vec = unit(query.vector)
    if vec.shape[0] != model.token_dim:
        raise Invalid(f"query dimension {vec.shape[0]} != model {model.name!r} token dimension {model.token_dim}",
                      reason=BAD_QUERY)
    kk = model.k
    top_ids = np.zeros(0, np.int64)
    top_scores = np.zeros(0, np.float32)
    top_tokens = np.zeros(0, np.int64)
    after = 0
    with Session(engine) as s:
        while True:
            rows = s.execute(select(Frame.id, Frame.frame_id, Frame.tokens, Frame.sizes)
                             .where(*where, Frame.id > after).order_by(Frame.id).limit(SCAN_ROWS)).all()
            if not rows:
                break
            after = int(rows[-1][0])
            keep = [r for r in rows if r[1] != query.frame_id]
            if keep:
                toks = unpack_token_rows([r[2] for r in keep], kk, model.token_dim)
                sizes = unpack_f32_rows([r[3] for r in keep], (kk,))
                score, tok = best_tokens(vec, toks, sizes)
                ids = np.fromiter((r[0] for r in keep), np.int64, len(keep))
                top_ids = np.concatenate([top_ids, ids])
                top_scores = np.concatenate([top_scores, score.astype(np.float32)])
                top_tokens = np.concatenate([top_tokens, tok])
                order = np.lexsort((top_ids, -top_scores))[:k]
                top_ids, top_scores, top_tokens = top_ids[order], top_scores[order], top_tokens[order]
            if len(rows) < SCAN_ROWS:
                break
        ok = np.isfinite(top_scores)
        top_ids, top_scores, top_tokens = top_ids[ok], top_scores[ok], top_tokens[ok]
        frames = store.get_frames(s, top_ids.tolist(), model)
    spec = model.manifest.input
    return [RegionHit(int(i), float(sc), int(t), frames[int(i)], spec)
            for i, sc, t in zip(top_ids, top_scores, top_tokens) if int(i) in frames]


# -- answers ---------------------------------------------------------------------------------------------------
def match_json(frame: FrameData, token: int, sim: float, spec: InputSpec) -> Dict[str, Any]:
    """A matched token and where it is: ``box`` (x0, y0, x1, y1) and ``cells`` (its footprint as boxes, one per
    run of cells in a row) as fractions of the original frame, ``box_px`` in its pixels (None when the frame came
    without its geometry: then the frame is taken to be the model input), ``mask`` the footprint on its grid."""
    s = frame.summary
    out: Dict[str, Any] = {"token": int(token), "sim": round(float(sim), 4),
                           "x": round(float(s.centroids[token, 0]), 4), "y": round(float(s.centroids[token, 1]), 4),
                           "size": round(float(s.sizes[token]), 2)}
    if s.footprint is None:
        return out
    geo, known = frame_geometry_or_input(frame, spec)
    mask = s.footprint == token
    inner = mask_box(mask)
    box_px = None if inner is None else input_to_frame(inner, spec, geo)

    def frac(b: Box) -> List[float]:
        return [round(b[0] / geo.width, 5), round(b[1] / geo.height, 5), round(b[2] / geo.width, 5),
                round(b[3] / geo.height, 5)]

    out.update(box=None if box_px is None else frac(box_px),
               box_px=None if box_px is None or not known else [round(v, 1) for v in box_px],
               cells=[frac(b) for b in mask_to_frame(mask, spec, geo)],
               mask={"grid": list(mask.shape), "rows": ["".join("1" if v else "0" for v in row) for row in mask]})
    return out


def parse_box(text: str) -> Box:
    """``"x0,y0,x1,y1"`` (fractions of the frame) -> a box; ``Invalid`` otherwise."""
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        vals = []
    if len(vals) != 4 or not all(np.isfinite(vals)):
        raise Invalid("box must be four numbers x0,y0,x1,y1 (fractions of the frame)", reason=BAD_QUERY)
    return (vals[0], vals[1], vals[2], vals[3])
