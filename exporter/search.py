"""Schedule search: the fastest merge schedule whose label-free fidelity to the unmerged encoder fits a budget.

Everything here is a pure, deterministic function of numbers the caller measured:

- ``candidates`` lays a fixed grid over the schedule space: for every schedule shape (``FAMILIES``) and
  every nominal speed-up in ``SPEEDUPS`` the least aggressive setting of that shape whose FLOP model
  (``exporter.vit.gflops``) reaches the speed-up. Cost is that FLOP count, so "fastest" never depends on
  a noisy timing.
- ``fidelity`` compares the global embeddings of calibration images under a candidate with the unmerged
  encoder's, without labels: an estimate of the precision@10 drop in points from the share of nearest
  neighbours that change (see ``Fidelity``), which is the number the budget bounds.
  Given the summary tokens too (a summary budget), it does the same for them: the share of each image's
  top-10 neighbours by the summaries' Chamfer similarity that change, times ``KAPPA_SUMMARY``, an estimate of
  the anomaly AUROC drop in points (see ``Fidelity``); ``fidelity_of`` takes what a search's ``embed`` returns.
- ``search`` walks each shape from mild to aggressive, stops a shape at its first candidate over a budget, and
  ``choose`` returns the cheapest candidate within them; ``pareto`` is what gets printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from exporter.schedule import make_schedule
from exporter.vit import ViTConfig, gflops

MEASURE = "kappa-nn-disagreement@10"  # the name of Fidelity.loss in manifests
KAPPA = 0.07  # share of changed top-10 neighbours counted as lost precision (see Fidelity)
SPEEDUPS: Tuple[float, ...] = (1.1, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0)
NEIGHBOURS = 10  # the k of the neighbour measures (precision@10 is what retrieval users watch)
MIN_IMAGES = 50  # fewer calibration images than this cannot say anything about neighbours
SUMMARY_MEASURE = "kappa-summary-chamfer-nn-disagreement@10"  # the name of Fidelity.summary_loss in manifests
KAPPA_SUMMARY = 1.0  # share of changed Chamfer top-10 neighbours counted as lost anomaly AUROC (see Fidelity)


class SearchError(ValueError):
    """The search cannot run as asked (too few calibration images, a bad budget)."""


@dataclass(frozen=True)
class Candidate:
    """One schedule of the grid: shape, the speed-up level it stands for, and what it merges."""

    family: str
    level: float  # nominal FLOP speed-up this candidate was built to reach
    alpha: float
    pre_r: int
    r_per_block: Tuple[int, ...]
    gflops: float
    speedup: float  # FLOP model: unmerged GFLOPs / this candidate's
    final_patches: int

    @property
    def name(self) -> str:
        pre = f"pre {self.pre_r} + " if self.pre_r else ""
        return f"{self.family} {self.level:g}x ({pre}r {','.join(map(str, self.r_per_block))}; alpha {self.alpha:g})"


@dataclass(frozen=True)
class Fidelity:
    """Label-free fidelity of a candidate's global embeddings to the unmerged encoder's on the same images.

    ``p10_loss`` (points) is the budget's measure: an estimate of the precision@10 drop made without labels,
    ``KAPPA`` x the points of top-10 neighbour disagreement (100 x (1 - ``nn_agreement``)). P@10 can only
    fall where a neighbour changes, and only when the newcomer is of another kind than the one it replaced;
    ``KAPPA`` is about the largest ratio of P@10 drop to disagreement (both in points) among the merge
    schedules measured on NEU-DET halves of 600 images when it was set (0.02 to 0.074), so the estimate errs
    on the safe side there (BENCHMARKS.md, merge_schedules_224px, sets it against the measured drop). Disagreement grows with the number
    of calibration images (more near neighbours to swap), so a larger calibration set is stricter.

    ``summary_loss`` (points, only with a summary budget) does the same for the summary tokens, which anomaly
    flagging scores and the global measure does not see: ``KAPPA_SUMMARY`` x the points of top-10 neighbour
    disagreement when images are compared by their summaries' Chamfer similarity (``chamfer``). Merging changes
    the summary far more than the global embedding; on the reference ViT-S/14 at 224 px (BENCHMARKS.md,
    merge_summary_224px) the ratio of the anomaly AUROC drop (ELPV cells, NEU-DET mosaics) to that disagreement
    was 0 to 1.03 over the constant schedules, ToMe's and Turbo's, so ``KAPPA_SUMMARY`` = 1 errs on the safe side.
    """

    p10_loss: float  # points
    nn_agreement: float  # mean fraction of the unmerged top-10 neighbours the candidate keeps
    cosine_mean: float  # global embedding vs unmerged
    cosine_min: float
    images: int
    summary_loss: Optional[float] = None  # points (a search with a summary budget)
    summary_agreement: Optional[float] = None  # mean fraction of the Chamfer top-10 neighbours kept

    @property
    def loss(self) -> float:
        return self.p10_loss


@dataclass(frozen=True)
class Point:
    candidate: Candidate
    fidelity: Fidelity


@dataclass(frozen=True)
class SearchResult:
    budget: float
    points: Tuple[Point, ...]  # every candidate evaluated, in evaluation order
    chosen: Optional[Point]  # None: nothing fits, do not merge
    precision: str = "fp32"  # the arithmetic every point was measured in ("int8": exporter.int8_cpu)
    base: Optional[Fidelity] = None  # the unmerged encoder in that arithmetic (None: fp32, the reference itself)
    # the unmerged fp32 embeddings every point was measured against (to measure a written file the same way)
    ref: Optional[np.ndarray] = field(default=None, compare=False, repr=False)
    summary_budget: Optional[float] = None  # points of Fidelity.summary_loss every choice had to stay within too

    @property
    def pareto(self) -> List[Point]:
        return pareto(self.points)


# -- the grid ----------------------------------------------------------------------------------------
def _shape(family: str, level: float, n: int, depth: int) -> Tuple[int, List[int]]:
    """(pre_r, wanted r per block) of ``family`` at strength ``level`` (higher merges more)."""
    if family == "constant":
        return 0, [int(level)] * depth
    if family == "decreasing":  # linear from level in block 0 down to level / depth in the last
        return 0, [int(round(level * (depth - i) / depth)) for i in range(depth)]
    if family == "early":  # each block merges the fraction ``level`` of the tokens it sees
        rs, left = [], n
        for _ in range(depth):
            rs.append(int(left * level))
            left -= rs[-1]
        return 0, rs
    if family == "pre":  # a quarter of the patches merged before block 0, then constant r
        return n // 4, [int(level)] * depth
    if family == "floor":  # constant r until a quarter of the patches is left (the floor below), then none
        return 0, [int(level)] * depth
    raise SearchError(f"unknown schedule family {family!r}")


SHAPES: Tuple[str, ...] = ("constant", "decreasing", "early", "floor", "pre")  # what _shape can build
# The grid a search walks. "early" and "pre" were no better than these at equal FLOPs on the reference model, and
# pre-merging ran slower than its FLOPs (BENCHMARKS.md, merge_schedules_224px), so the search leaves them out.
FAMILIES: Tuple[str, ...] = ("constant", "decreasing", "floor")
_LEVELS = {  # strengths tried for each family, mild to aggressive
    "constant": lambda n: [float(r) for r in range(1, n // 2 + 1)],
    "decreasing": lambda n: [float(r) for r in range(1, n // 2 + 1)],
    "early": lambda n: [f / 400 for f in range(1, 201)],
    "floor": lambda n: [float(r) for r in range(1, n // 2 + 1)],
    "pre": lambda n: [float(r) for r in range(0, n // 2 + 1)],
}


def _floor(family: str, n: int, floor: int) -> int:
    return max(floor, n // 4) if family == "floor" else floor


def candidates(cfg: ViTConfig, floor: int, alphas: Sequence[float] = (5.0,),
               families: Sequence[str] = FAMILIES, speedups: Sequence[float] = SPEEDUPS) -> List[Candidate]:
    """The grid: per family and alpha, the mildest strength reaching each nominal FLOP speed-up (deduplicated)."""
    n, depth, p = cfg.num_patches, cfg.depth, cfg.num_prefix
    base = gflops(cfg, [n + p] * depth, [0] * depth)
    out: List[Candidate] = []
    seen = set()  # a schedule two shapes share is kept once, under the first shape
    for family in families:
        built = []  # (speedup, pre_r, r_per_block, gflops, final) for every strength, in order
        for level in _LEVELS[family](n):
            pre, wanted = _shape(family, level, n, depth)
            s = make_schedule(n, depth, r_list=wanted, floor=_floor(family, n, floor), pre_r=pre)
            g = gflops(cfg, [m + p for m in s.patches_per_block], s.r_per_block)
            built.append((base / g, s.pre_r, tuple(s.r_per_block), g, s.final_patches))
        for target in speedups:
            hit = next((b for b in built if b[0] >= target), None)
            if hit is None or hit[1:3] in seen:
                continue
            seen.add(hit[1:3])
            for alpha in alphas:
                out.append(Candidate(family=family, level=target, alpha=float(alpha), pre_r=hit[1],
                                     r_per_block=hit[2], gflops=hit[3], speedup=hit[0], final_patches=hit[4]))
    return out


# -- fidelity ----------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def chamfer(tokens: np.ndarray) -> np.ndarray:
    """[F, F] symmetric Chamfer similarity of F images' summary tokens [F, K, d]: the mean over one image's
    tokens of the best cosine to the other's, averaged both ways."""
    t = _unit(np.asarray(tokens).reshape(-1, tokens.shape[-1])).reshape(tokens.shape)
    best = np.einsum("iad,jbd->ijab", t, t, optimize=True).max(axis=-1).mean(axis=-1)
    return (best + best.T) / 2


def _agreement(sim_ref: np.ndarray, sim: np.ndarray, k: int) -> float:
    """Mean fraction of each row's k most similar other rows under ``sim_ref`` that ``sim`` keeps."""
    def top(s: np.ndarray) -> List[set]:
        s = np.array(s, dtype=np.float64)
        np.fill_diagonal(s, -np.inf)
        return [set(r) for r in np.argsort(-s, axis=1, kind="stable")[:, :k].tolist()]
    return float(np.mean([len(a & b) / k for a, b in zip(top(sim_ref), top(sim))]))


def fidelity(ref: np.ndarray, emb: np.ndarray, k: int = NEIGHBOURS, ref_tokens: Optional[np.ndarray] = None,
             tokens: Optional[np.ndarray] = None) -> Fidelity:
    """Label-free fidelity of ``emb`` to ``ref`` (global embeddings of the same images, row by row), and of the
    summary ``tokens`` [F, K, d] to ``ref_tokens`` when both are given."""
    if ref.shape != emb.shape:
        raise SearchError(f"embeddings differ in shape: {ref.shape} vs {emb.shape}")
    n = ref.shape[0]
    if n <= k:
        raise SearchError(f"{n} calibration images cannot rank {k} neighbours")
    sr, se = _unit(ref), _unit(emb)
    agree = _agreement(sr @ sr.T, se @ se.T, k)
    cos = (sr * se).sum(axis=1)
    s_loss = s_agree = None
    if ref_tokens is not None and tokens is not None:
        if ref_tokens.shape != tokens.shape or ref_tokens.shape[0] != n:
            raise SearchError(f"summary tokens differ in shape: {ref_tokens.shape} vs {tokens.shape}")
        s_agree = _agreement(chamfer(ref_tokens), chamfer(tokens), k)
        s_loss = KAPPA_SUMMARY * 100.0 * (1.0 - s_agree)
    return Fidelity(p10_loss=KAPPA * 100.0 * (1.0 - agree), nn_agreement=agree, cosine_mean=float(cos.mean()),
                    cosine_min=float(cos.min()), images=n, summary_loss=s_loss, summary_agreement=s_agree)


def fidelity_of(ref: np.ndarray, out, ref_tokens: Optional[np.ndarray] = None) -> Fidelity:
    """``fidelity`` of what a search's ``embed`` returned: the global embeddings, or (them, summary tokens) when
    ``ref_tokens`` (the unmerged summaries) are given."""
    if ref_tokens is None:
        return fidelity(ref, out)
    emb, tokens = out
    return fidelity(ref, emb, ref_tokens=ref_tokens, tokens=tokens)


# -- choice ------------------------------------------------------------------------------------------
def _order(p: Point) -> tuple:
    c = p.candidate
    return (c.gflops, p.fidelity.loss, c.family, c.alpha, c.pre_r, c.r_per_block)


def pareto(points: Sequence[Point]) -> List[Point]:
    """Points no other point beats on both cost (GFLOPs) and loss, cheapest first."""
    front: List[Point] = []
    for p in sorted(points, key=_order):
        if not front or p.fidelity.loss < front[-1].fidelity.loss:
            front.append(p)
    return front


def fits(f: Fidelity, budget: float, summary_budget: Optional[float] = None) -> bool:
    """Within ``budget`` and, when given, within ``summary_budget`` (a loss not measured does not fit it)."""
    return f.loss <= budget and (summary_budget is None or
                                 (f.summary_loss is not None and f.summary_loss <= summary_budget))


def choose(points: Sequence[Point], budget: float, summary_budget: Optional[float] = None) -> Optional[Point]:
    """The cheapest point within the budgets (``fits``; ties: lower loss, then name); None if none fits."""
    ok = [p for p in points if fits(p.fidelity, budget, summary_budget)]
    return min(ok, key=_order) if ok else None


def search(cands: Sequence[Candidate], embed: Callable[[Candidate], Any], ref: np.ndarray, budget: float,
           progress: Callable[[str], None] = lambda _m: None, precision: str = "fp32",
           base: Optional[Fidelity] = None, summary_budget: Optional[float] = None,
           ref_tokens: Optional[np.ndarray] = None) -> SearchResult:
    """Evaluate ``cands`` (grouped by family and alpha, mild to aggressive) until each group leaves the budget.

    ``embed(candidate)`` returns the calibration images' global embeddings under that candidate, ``ref``
    the unmerged fp32 encoder's; with ``summary_budget`` it returns (global embeddings, summary tokens) and
    ``ref_tokens`` are the unmerged encoder's summaries, and a candidate must stay within both budgets;
    ``precision`` and ``base`` (the unmerged encoder's fidelity in that
    precision) are recorded with the result when ``embed`` computes in another arithmetic than fp32. A group stops at its first candidate over the budget: a stronger one of the same
    shape merges more, and a lucky measurement below the budget would be noise, not a better schedule.
    """
    if not budget >= 0:
        raise SearchError(f"budget must be >= 0 points, got {budget}")
    if ref.shape[0] < MIN_IMAGES:
        raise SearchError(f"the schedule search needs at least {MIN_IMAGES} calibration images, got {ref.shape[0]}")
    if summary_budget is not None and not (summary_budget >= 0 and ref_tokens is not None):
        raise SearchError(f"a summary budget needs the unmerged summaries and >= 0 points, got {summary_budget}")
    groups: Dict[Tuple[str, float], List[Candidate]] = {}
    for c in cands:
        groups.setdefault((c.family, c.alpha), []).append(c)
    points: List[Point] = []
    for (family, alpha), group in groups.items():
        for c in sorted(group, key=lambda c: c.gflops, reverse=True):
            f = fidelity_of(ref, embed(c), ref_tokens)
            points.append(Point(c, f))
            progress(f"{c.name}: {c.speedup:.2f}x FLOPs, loss {f.loss:.2f} points"
                     + ("" if f.summary_loss is None else f", summary {f.summary_loss:.2f}"))
            if not fits(f, budget, summary_budget):
                break
    return SearchResult(budget=float(budget), points=tuple(points), chosen=choose(points, budget, summary_budget),
                        precision=precision, base=base, ref=ref,
                        summary_budget=None if summary_budget is None else float(summary_budget))
