"""Anomaly scoring against a reference bank: a frame's score, its most anomalous token and region; the bank file.

A reference set's memory bank (built at central from frames an engineer marked as good) holds the summary tokens
of those frames, grouped into inverted lists (IVF) when it is large, and optionally their global embeddings. A frame's
score in mode ``tokens`` is the largest distance (1 - cosine) of any of its summary tokens to its nearest bank
token, over the tokens that stand for at least ``min_token_size`` patches (an empty token's feature is stale);
``global`` scores the global embedding against the bank's; ``both`` adds the two scores standardized by the
set's own leave-one-out scores. The most anomalous token (and its footprint) is where the frame is unusual.

Metric. ``cosine``: a token's distance is 1 - cosine. ``whitened`` (what central builds): distances are Euclidean
after whitening by the set's own tokens, z = (q - m) W with m the mean of the set's (unit) tokens and W = V L^-1/2
from the eigendecomposition V L V^T of their covariance shrunk towards a multiple of I (Oracle Approximating
Shrinkage, parameter-free): directions in which the set's normal tokens barely vary count more, so an odd patch
averaged into a summary token with its normal neighbours still stands out (the Mahalanobis idea of PaDiM and
Gaussian AD, applied to a nearest-neighbour bank; ELPV gains in BENCHMARKS.md elpv_metric and anomaly). The search
stays a largest inner product: a bank token z_b is searched as [z_b, -|z_b|^2 / 2] and a query as [z, 1], so
|z - z_b|^2 = |z|^2 - 2 (their product), and inverted lists (Euclidean k-means centroids, searched the same way)
and the bound below carry over unchanged. Once the search has found the nearest token, its distance is computed
directly, |z - z_b|: near 0 the square root of a difference of large products is rounding (a frame identical to a
bank frame scored 0.007 on one CPU and 0.012 on another), the direct difference is not.

Nearest-neighbour search is exhaustive (one matrix product per block of a batch's tokens) for banks of up to
``EXHAUSTIVE_UP_TO`` tokens, or when the bank has one list or ``nprobe`` covers all of them; above that size it
probes the ``nprobe`` lists whose centroids are closest to each token. Edge and central run this same code on the same
bank bytes (the bank file below), so a score computed at the edge equals central's up to float rounding.

A frame's score needs only its farthest token, so scoring bounds before it searches (bound and refine). Banks
of ``LISTS_FROM`` tokens or more have inverted lists whatever their search; every token q gets the upper bound
u(q) = 1 - max cos(q, b) over the bank tokens b of the list whose centroid is nearest to q (an actual bank
token's distance, so u(q) >= d(q), its distance to the bank; and the nearest list is among those an inverted-list
search probes, so u(q) bounds that search too; whitened: its distance widened by the float32 rounding of the
products, ``Bank.distance(widen=True)``, which keeps it a bound for tokens next to a bank token). Each frame first
searches its token of largest u; with m the largest distance found, a token with u(q) < m - ``TIE`` can be neither
the farthest nor tied with it, so only the tokens with u(q) >= m - ``TIE`` are searched next, and after that round
none is left. Score and token are those of searching every token; the search costs one bank search per frame plus the
few tokens whose bound does not clear, instead of K (about a tenth of the tokens on NEU-DET summaries, BENCHMARKS.md
anomaly).
``FrameScores.distances`` holds the searched tokens' distances and the others' bounds (below the score).

The bank file (``Bank.to_bytes``, written by ``tokenline-central reference-set export``, read by the edge) is an
uncompressed ``.npz`` with the arrays ``tokens`` (float16 [M, d], unit norm, grouped by list), ``offsets``
(int64 [C + 1]), ``centroids`` (float32 [C, d]), ``src`` (int32 [M], the set frame each token came from),
``globals`` (float16 [F, D]), in metric ``whitened`` also ``whiten`` (float32 [d + 1, d]: m, then W; the tokens
and centroids are then whitened ones) and ``meta`` (UTF-8 JSON: ``BankInfo``, with the sha256 of the arrays; files
without a ``metric`` are cosine banks). The file lives in the model directory as
``anomaly/<site>/<line>/<camera>.npz`` (``bank_path``).

Python 3.8+, numpy only.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from tokenline.summary import Summary, mask_boxes

SCHEMA = "tokenline.anomaly-bank/1"
MODES = ("tokens", "global", "both")
METRICS = ("cosine", "whitened")
BANK_DIR = "anomaly"  # inside the model directory
ARRAYS = ("tokens", "offsets", "centroids", "src", "globals")
WHITEN = "whiten"  # the whitening's array, in banks of metric "whitened" only
# banks up to this many tokens are searched exhaustively (exact; bound and refine): on real banks of 8,000-48,000
# tokens nprobe 8 was at most 2.2x as fast but raised a fifth to a quarter of the frames' scores (by up to 1.9), above
# the exact distances a set's threshold is calibrated on, while the exact search cost 0.08-0.55 ms a frame in the
# scorer's batches (BENCHMARKS.md anomaly_search); synthetic banks of 100,000 tokens: 0.36-0.45 ms (anomaly)
EXHAUSTIVE_UP_TO = 100_000
LISTS_FROM = 1_000  # banks of this many tokens or more get inverted lists (bound and refine; the search above EXHAUSTIVE_UP_TO)
TIE = 2e-5  # distances this close to the farthest token's may tie with it (token choice rounds to 1e-5); whitened
# distances (about 1-20) get TIE times the farthest distance
FAR = 1e4  # a whitened token's distance when no bank token is left to compare with (cosine: 2, the largest)
ROUNDING = 1e-5  # relative float32 rounding of a squared distance |z|^2 - 2 z.z_b + |z_b|^2, with room to spare


class BankError(ValueError):
    """A bank file that is missing, corrupt, or made for another model or camera."""


@dataclass(frozen=True)
class AnomalyScore:
    """One frame's anomaly score against one reference set's bank (what the wire's ANOMALY section carries).

    ``token`` is the most anomalous summary token (-1 when no token qualifies); ``flagged`` is
    ``score > threshold``."""

    score: float
    threshold: float
    token: int
    flagged: bool
    set_id: int
    set_version: int


@dataclass(frozen=True)
class BankInfo:
    """What a bank is for and how it scores (the bank file's ``meta``)."""

    set_id: int
    set_version: int
    name: str
    site: str
    line: str
    camera: str
    manifest_hash: str  # 32 hex: the first 16 bytes of the model's manifest hash (as on the wire)
    mode: str = "tokens"
    metric: str = "cosine"
    threshold: float = float("inf")
    nprobe: int = 8
    min_token_size: float = 1.0
    frames: int = 0  # frames of the set the bank was built from
    pool_tokens: int = 0  # their tokens before the coreset
    created_us: int = 0
    # standardization of the two scores in mode "both": (mean, std) of the set's leave-one-out scores
    token_stats: Tuple[float, float] = (0.0, 1.0)
    global_stats: Tuple[float, float] = (0.0, 1.0)
    content_sha256: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "BankInfo":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise BankError("bank meta is not a JSON object")
        schema = data.pop("schema", None)
        if schema != SCHEMA:
            raise BankError(f"bank schema is {schema!r}, this build reads {SCHEMA!r}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise BankError(f"bank meta has unknown keys {unknown}")
        try:
            for k in ("token_stats", "global_stats"):
                if k in data:
                    data[k] = tuple(float(v) for v in data[k])
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise BankError(f"bank meta is invalid: {exc}") from None


@dataclass(frozen=True)
class FrameScores:
    """Scores of a batch of frames: ``score`` [F], ``token`` [F] (most anomalous token, -1 none),
    ``distances`` [F, K] (each token's distance to the bank; 0 for tokens that do not qualify), and the two
    parts (``token_score``, ``global_score``, NaN where the mode does not use them)."""

    score: np.ndarray
    token: np.ndarray
    distances: np.ndarray
    token_score: np.ndarray
    global_score: np.ndarray


def bank_file(root: Union[str, Path], site: str, line: str, camera: str) -> Path:
    """A camera's bank under a banks directory: ``<root>/<site>/<line>/<camera>.npz``."""
    return Path(root) / site / line / f"{camera}.npz"


def bank_path(model_dir: Union[str, Path], site: str, line: str, camera: str) -> Path:
    """Where a camera's bank lives in a model directory (``anomaly/<site>/<line>/<camera>.npz``)."""
    return bank_file(Path(model_dir) / BANK_DIR, site, line, camera)


def apply_whitening(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Tokens ``x`` [..., d] whitened by a bank's whitening ``w`` [d + 1, d] (its mean m, then W): (x - m) W."""
    return (x - w[0]) @ w[1:]


def standardized_sum(tok: np.ndarray, glob: np.ndarray, token_stats: Tuple[float, float],
                     global_stats: Tuple[float, float]) -> np.ndarray:
    """Mode ``both``: the token and global scores, each standardized by its (mean, sd) over the set's frames, summed."""
    (mt, st), (mg, sg) = token_stats, global_stats
    return (tok - mt) / max(st, 1e-6) + (glob - mg) / max(sg, 1e-6)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass(eq=False)
class Bank:
    """A reference set's memory bank (module docstring); float32 in memory, float16 tokens in the file."""

    tokens: np.ndarray  # [M, d] float32, unit norm, grouped by list
    offsets: np.ndarray  # [C + 1] int64, list c is tokens[offsets[c]:offsets[c + 1]]
    centroids: np.ndarray  # [C, d] float32
    src: np.ndarray  # [M] int32, index of the set frame each token came from
    globals: np.ndarray  # [F, D] float32 (empty [0, D] when the mode does not use them)
    info: BankInfo
    whiten: Optional[np.ndarray] = None  # [d + 1, d] float32 (m, then W) in metric whitened, else None

    def __post_init__(self) -> None:
        self.tokens = np.ascontiguousarray(self.tokens, np.float32)
        self.offsets = np.asarray(self.offsets, np.int64)
        self.centroids = np.ascontiguousarray(self.centroids, np.float32)
        self.src = np.asarray(self.src, np.int32)
        self.globals = np.ascontiguousarray(self.globals, np.float32)
        if self.whiten is not None:
            self.whiten = np.ascontiguousarray(self.whiten, np.float32)
        self.check()
        # what the search multiplies (module docstring): the tokens and centroids, or in metric whitened
        # [z, -|z|^2 / 2], whose first d columns then are the tokens (one copy in memory, not two)
        self._search_tokens = self._searched(self.tokens)
        self._search_centroids = self._searched(self.centroids)
        if self._search_tokens is not self.tokens:
            self.tokens = self._search_tokens[:, :-1]
        # the largest |z_b|^2: how far float32 rounding can move a squared distance from products (``distance``)
        self._zb2_max = float(-2.0 * self._search_tokens[:, -1].min()) if self.whitened else 0.0

    @property
    def whitened(self) -> bool:
        return self.info.metric == "whitened"

    def _searched(self, z: np.ndarray) -> np.ndarray:
        if not self.whitened:
            return z
        return np.ascontiguousarray(np.concatenate([z, -0.5 * np.einsum("ij,ij->i", z, z)[:, None]], axis=1))

    def queries(self, q: np.ndarray) -> np.ndarray:
        """Unit tokens [..., d] as the search takes them: themselves, or in metric whitened [(q - m) W, 1]."""
        q = np.asarray(q, np.float32)
        if not self.whitened:
            return np.ascontiguousarray(q)
        assert self.whiten is not None
        z = apply_whitening(_unit(q), self.whiten)
        return np.ascontiguousarray(np.concatenate([z, np.ones(z.shape[:-1] + (1,), np.float32)], axis=-1))

    def distance(self, qs: np.ndarray, sim: np.ndarray, widen: bool = False) -> np.ndarray:
        """Distances from search queries ``qs`` [..., ds] (``queries``) and their largest products ``sim`` [...]:
        1 - cosine, or in metric whitened |z - z_b| = sqrt(|z|^2 - 2 sim) (``FAR`` where no token was left).
        ``widen`` (an upper bound): whitened, plus what float32 rounding can take off the square, ``ROUNDING``
        (|z|^2 + |z_b|^2), so that it stays above the distance to the token whose product is ``sim`` even where that
        distance is near 0 and the products' difference is all rounding."""
        if not self.whitened:
            return (1.0 - sim).astype(np.float32)
        z2 = np.einsum("...i,...i->...", qs[..., :-1], qs[..., :-1])
        d2 = np.maximum(z2 - 2.0 * sim, 0.0)
        d = np.sqrt(d2 + ROUNDING * (z2 + self._zb2_max) if widen else d2)
        return np.where(np.isfinite(sim), np.minimum(d, FAR), FAR).astype(np.float32)

    def nearest_distance(self, qs: np.ndarray, sim: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Distances of search queries ``qs`` [N, ds] to their nearest bank tokens ``idx`` [N] (-1: none left) whose
        products are ``sim`` [N]: in metric whitened |z - z_b| computed directly, which is exact near 0 where
        sqrt(|z|^2 - 2 sim) is the square root of a difference of large products (a frame identical to a bank frame:
        about 1e-6 instead of rounding up to ``central.anomaly.bank.rounding_floor``); 1 - cosine otherwise."""
        if not self.whitened:
            return self.distance(qs, sim)
        have = idx >= 0
        d = np.full(idx.shape, FAR, np.float32)
        diff = qs[have, :-1] - self.tokens[idx[have]]
        d[have] = np.minimum(np.sqrt(np.einsum("ij,ij->i", diff, diff)), FAR)
        return d

    # -- shape ------------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def dim(self) -> int:
        """The summary tokens' dimension d (whitened tokens have the same)."""
        return int(self.tokens.shape[1])

    @property
    def lists(self) -> int:
        return int(len(self.offsets) - 1)

    def check(self) -> None:
        """``BankError`` unless the arrays are consistent with each other and with the meta."""
        t, off, cen = self.tokens, self.offsets, self.centroids
        info = self.info
        if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 1:
            raise BankError(f"bank tokens must be [M >= 1, d], got {t.shape}")
        if off.ndim != 1 or len(off) < 2 or off[0] != 0 or off[-1] != t.shape[0] or np.any(np.diff(off) < 0):
            raise BankError("bank list offsets must rise from 0 to the number of tokens")
        if cen.shape != (len(off) - 1, t.shape[1]):
            raise BankError(f"bank centroids must be [{len(off) - 1}, {t.shape[1]}], got {cen.shape}")
        if self.src.shape != (t.shape[0],):
            raise BankError(f"bank src must be [{t.shape[0]}], got {self.src.shape}")
        if info.mode not in MODES:
            raise BankError(f"bank mode must be one of {MODES}, got {info.mode!r}")
        if info.metric not in METRICS:
            raise BankError(f"bank metric must be one of {METRICS}, got {info.metric!r}")
        if (info.metric == "whitened") != (self.whiten is not None):
            raise BankError(f"a bank of metric {info.metric!r} "
                            f"{'needs a whitening' if info.metric == 'whitened' else 'cannot have a whitening'}")
        if self.whiten is not None and self.whiten.shape != (t.shape[1] + 1, t.shape[1]):
            raise BankError(f"bank whitening must be [{t.shape[1] + 1}, {t.shape[1]}], got {self.whiten.shape}")
        if info.mode != "tokens" and (self.globals.ndim != 2 or self.globals.shape[0] < 1):
            raise BankError(f"bank mode {info.mode!r} needs global embeddings")
        if info.nprobe < 1:
            raise BankError("bank nprobe must be >= 1")
        for a in (t, cen, self.globals, np.zeros(0) if self.whiten is None else self.whiten):
            if not np.all(np.isfinite(a)):
                raise BankError("bank arrays contain NaN or Inf")

    # -- nearest neighbours -------------------------------------------------------------------------------------
    def nn_similarity(self, q: np.ndarray, exclude: Optional[np.ndarray] = None) -> np.ndarray:
        """[N] largest product of each search query [N, ds] (``queries``) with a bank token: the cosine to the
        nearest one, or in metric whitened what ``distance`` turns into the distance to it. Exhaustive up to
        ``EXHAUSTIVE_UP_TO`` bank tokens, one list or ``nprobe`` covering all; else the probed lists.
        ``exclude`` [N]: ignore bank tokens whose ``src`` equals the query's entry (leave-one-frame-out); a query
        whose probed lists hold nothing else is searched exhaustively. -1 (whitened: -inf) when no bank token is
        left at all."""
        return self.nearest(q, exclude)[0]

    def nearest(self, q: np.ndarray, exclude: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """``nn_similarity`` and [N] the bank row of each query's nearest token (-1 when none is left)."""
        q = np.ascontiguousarray(q, np.float32)
        n = q.shape[0]
        c = self.lists
        if n == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        if c <= 1 or self.info.nprobe >= c or self.size <= EXHAUSTIVE_UP_TO:
            return self._exact(q, exclude)
        probe = np.argpartition(-(q @ self._search_centroids.T), self.info.nprobe - 1, axis=1)[:, : self.info.nprobe]
        best, idx = self._search_lists(q, probe, exclude)
        missing = np.flatnonzero(~np.isfinite(best))
        if missing.size:
            best[missing], idx[missing] = self._exact(q[missing], None if exclude is None else exclude[missing])
        return best, idx

    def _search_lists(self, q: np.ndarray, probe: np.ndarray,
                      exclude: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """([N] largest product of each search query [N, ds] with a bank token in its lists ``probe`` [N, P], [N]
        that token's row) (one matrix product per list, over the queries that probe it); -inf and -1 where those
        lists hold nothing."""
        n, p = probe.shape
        rows = np.repeat(np.arange(n), p)
        cols = probe.reshape(-1)
        order = np.argsort(cols, kind="stable")
        rows, cols = rows[order], cols[order]
        bounds = np.searchsorted(cols, np.arange(self.lists + 1))
        best = np.full(n, -np.inf, np.float32)
        idx = np.full(n, -1, np.int64)
        for j in np.flatnonzero(np.diff(bounds)):
            lo, hi = int(self.offsets[j]), int(self.offsets[j + 1])
            if hi == lo:
                continue
            r = rows[bounds[j]: bounds[j + 1]]  # distinct: a query probes a list once
            s = q[r] @ self._search_tokens[lo:hi].T
            if exclude is not None:
                s[exclude[r][:, None] == self.src[lo:hi][None, :]] = -np.inf
            at = s.argmax(axis=1)
            top = s[np.arange(len(r)), at]
            better = top > best[r]
            best[r[better]] = top[better]
            idx[r[better]] = lo + at[better]
        return best, idx

    def _none_left(self, sim: np.ndarray) -> np.ndarray:
        """-inf products (no bank token) as -1 in metric cosine (distance 2); whitened keeps -inf (``FAR``)."""
        return sim if self.whitened else np.where(np.isfinite(sim), sim, -1.0).astype(np.float32)

    def nearest_list_similarity(self, q: np.ndarray) -> np.ndarray:
        """[N] largest product of each search query [N, ds] with a bank token in the list of its nearest centroid
        (no token: as ``nn_similarity``)."""
        return self._none_left(self._search_lists(q, np.argmax(q @ self._search_centroids.T, axis=1)[:, None],
                                                  None)[0])

    def frame_distances(self, q: np.ndarray, ok: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Bound and refine (module docstring) over frames' search queries ``q`` [F, K, ds] (``queries``) that
        qualify where ``ok`` [F, K]: (distances [F, K], searched [F, K]); where not searched the distance is the
        token's bound, which is below its frame's farthest distance by more than the tie; 0 where not ``ok``."""
        f, k, ds = q.shape
        dist = np.zeros((f, k), np.float32)
        searched = np.zeros((f, k), bool)
        if f == 0 or not ok.any():
            return dist, searched
        near = self.nearest_list_similarity(q.reshape(f * k, ds)).reshape(f, k)
        bound = np.where(ok, self.distance(q, near, widen=True), -np.inf)

        def search(mask: np.ndarray) -> None:
            if mask.any():
                sim, idx = self.nearest(q[mask])
                if self.whitened:
                    dist[mask] = self.nearest_distance(q[mask], sim, idx)
                else:
                    dist[mask] = self.distance(q[mask], np.maximum(sim, near[mask]))  # rounding: keep d <= u
                searched[mask] = True

        first = np.zeros((f, k), bool)
        rows = np.flatnonzero(ok.any(axis=1))
        first[rows, bound[rows].argmax(axis=1)] = True
        search(first)
        far = np.where(searched, dist, -np.inf).max(axis=1)
        tie = TIE * np.maximum(1.0, far) if self.whitened else np.float32(TIE)
        search(ok & ~searched & (bound >= (far - tie)[:, None]))
        rest = ok & ~searched
        dist[rest] = bound[rest]
        return dist, searched

    def _exact(self, q: np.ndarray, exclude: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        out = np.empty(q.shape[0], np.float32)
        idx = np.empty(q.shape[0], np.int64)
        step = max(1, 4_000_000 // max(1, self.size))  # bound the [rows, M] block
        for i in range(0, q.shape[0], step):
            s = q[i: i + step] @ self._search_tokens.T
            if exclude is not None:
                s[exclude[i: i + step][:, None] == self.src[None, :]] = -np.inf
            at = s.argmax(axis=1)
            idx[i: i + step] = at
            out[i: i + step] = s[np.arange(len(at)), at]
        return self._none_left(out), np.where(np.isfinite(out), idx, -1)

    def global_similarity(self, g: np.ndarray, exclude: Optional[np.ndarray] = None) -> np.ndarray:
        """[F] cosine of each global embedding [F, D] to the nearest bank frame's (``exclude``: a frame index)."""
        s = np.ascontiguousarray(g, np.float32) @ self.globals.T
        if exclude is not None:
            s[exclude[:, None] == np.arange(self.globals.shape[0])[None, :]] = -np.inf
        m = s.max(axis=1)
        return np.where(np.isfinite(m), m, -1.0).astype(np.float32)

    # -- scoring ------------------------------------------------------------------------------------------------
    def score_arrays(self, tokens: np.ndarray, sizes: np.ndarray, globals_: Optional[np.ndarray] = None,
                     exclude: Optional[np.ndarray] = None, every_token: bool = False) -> FrameScores:
        """Scores of F frames: ``tokens`` [F, K, d] (unit norm), ``sizes`` [F, K], ``globals_`` [F, D] (modes global and
        both), ``exclude`` [F] the set-frame index of each frame to leave out (threshold calibration).
        Bound and refine unless ``exclude`` or ``every_token`` asks for every token's distance."""
        tokens = np.ascontiguousarray(tokens, np.float32)
        f, k, d = tokens.shape
        if d != self.dim:
            raise BankError(f"tokens have dimension {d}, the bank {self.dim}")
        ok = np.asarray(sizes, np.float32).reshape(f, k) >= self.info.min_token_size
        q = self.queries(tokens)
        if exclude is None and not every_token and self.lists > 1:
            dist, _ = self.frame_distances(q, ok)
        else:
            flat = q.reshape(f * k, q.shape[-1])
            keep = np.flatnonzero(ok.reshape(-1))
            dist = np.zeros(f * k, np.float32)
            ex = None if exclude is None else np.repeat(np.asarray(exclude, np.int64), k)[keep]
            dist[keep] = self.nearest_distance(flat[keep], *self.nearest(flat[keep], ex))
        dist = np.clip(dist, 0.0, FAR if self.whitened else 2.0).reshape(f, k)
        masked = np.where(ok, dist, -1.0)
        # the farthest token; distances within 1e-5 count as a tie, taken by the lowest index, so that the edge and
        # central name the same token although their BLAS calls may round differently
        token = np.where(ok.any(axis=1), np.round(masked, 5).argmax(axis=1), -1).astype(np.int64)
        tok_score = np.where(token >= 0, masked.max(axis=1), 0.0).astype(np.float32)
        nan = np.full(f, np.nan, np.float32)
        glob_score = nan
        if self.info.mode != "tokens":
            if globals_ is None:
                raise BankError(f"mode {self.info.mode!r} needs the frames' global embeddings")
            glob_score = 1.0 - self.global_similarity(globals_, None if exclude is None else np.asarray(exclude))
        if self.info.mode == "tokens":
            score = tok_score
        elif self.info.mode == "global":
            score, tok_score = glob_score, nan
        else:
            score = standardized_sum(tok_score, glob_score, self.info.token_stats, self.info.global_stats)
        return FrameScores(np.asarray(score, np.float32), token, dist, tok_score, np.asarray(glob_score, np.float32))

    def score(self, summary: Summary) -> AnomalyScore:
        """One frame's ``AnomalyScore`` from its (unbatched) summary."""
        fs = self.score_arrays(summary.tokens[None], summary.sizes[None], summary.global_embedding[None])
        return self.anomaly_score(float(fs.score[0]), int(fs.token[0]))

    def anomaly_score(self, score: float, token: int) -> AnomalyScore:
        t = self.info.threshold
        return AnomalyScore(score=score, threshold=t, token=token, flagged=bool(score > t),
                            set_id=self.info.set_id, set_version=self.info.set_version)

    # -- the file -----------------------------------------------------------------------------------------------
    def arrays(self) -> Dict[str, np.ndarray]:
        """The file's arrays in their stored dtypes (float16 tokens and globals)."""
        out = {"tokens": self.tokens.astype(np.float16), "offsets": self.offsets.astype("<i8"),
               "centroids": self.centroids.astype("<f4"), "src": self.src.astype("<i4"),
               "globals": self.globals.astype(np.float16)}
        if self.whiten is not None:
            out[WHITEN] = self.whiten.astype("<f4")
        return out

    def to_bytes(self) -> bytes:
        arrays = self.arrays()
        meta = json.loads(BankInfo(**{**asdict(self.info), "content_sha256": _content_sha256(arrays)}).to_json())
        meta["schema"] = SCHEMA
        if meta["metric"] == "cosine":
            del meta["metric"]  # cosine files stay readable by builds from before the metric existed
        buf = io.BytesIO()
        np.savez(buf, meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), np.uint8), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "<bank>") -> "Bank":
        """Read and verify a bank file's bytes (checksums, shapes); ``BankError`` names what is wrong."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                names = set(z.files)
                missing = sorted((set(ARRAYS) | {"meta"}) - names)
                if missing:
                    raise BankError(f"{where}: not a bank file (missing {missing})")
                arrays = {k: z[k] for k in ARRAYS + ((WHITEN,) if WHITEN in names else ())}
                meta = bytes(z["meta"].astype(np.uint8).tobytes()).decode("utf-8")
        except BankError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, KeyError, UnicodeDecodeError, EOFError) as exc:
            raise BankError(f"{where}: not a readable bank file ({exc})") from None
        try:
            info = BankInfo.from_json(meta)
        except (BankError, ValueError) as exc:
            raise BankError(f"{where}: {exc}") from None
        if info.content_sha256 != _content_sha256(arrays):
            raise BankError(f"{where}: content does not match its checksum (corrupt or edited)")
        try:
            bank = cls(arrays["tokens"], arrays["offsets"], arrays["centroids"], arrays["src"], arrays["globals"], info,
                       arrays.get(WHITEN))
        except BankError as exc:
            raise BankError(f"{where}: {exc}") from None
        return bank  # float32 in memory only: to_bytes makes the file's float16 arrays again (exact round trip)

    @classmethod
    def load(cls, path: Union[str, Path], manifest_hash: Optional[str] = None,
             camera: Optional[Tuple[str, str, str]] = None) -> "Bank":
        """Read a bank file and check it is for this model (``manifest_hash``, 32 hex) and camera
        (``(site, line, camera)``)."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise BankError(f"cannot read bank {p}: {exc.strerror or exc}") from None
        bank = cls.from_bytes(data, where=str(p))
        if manifest_hash is not None and bank.info.manifest_hash != manifest_hash:
            raise BankError(f"{p}: bank is for model {bank.info.manifest_hash}, this model is {manifest_hash}")
        have = (bank.info.site, bank.info.line, bank.info.camera)
        if camera is not None and have != tuple(camera):
            raise BankError(f"{p}: bank is for camera {'/'.join(have)}, not {'/'.join(camera)}")
        return bank

    def save(self, path: Union[str, Path]) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(p)
        return p


def _content_sha256(arrays: Dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in ARRAYS + ((WHITEN,) if WHITEN in arrays else ()):  # cosine banks: as before the whitening existed
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape}".encode("ascii"))
        h.update(a.tobytes())
    return h.hexdigest()


# -- the anomalous region --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """Where a token stands on the model input: a box (x0, y0, x1, y1) in [0, 1] and, when the summary has a
    footprint, the mask of its patches ([grid_h, grid_w] bool)."""

    box: Tuple[float, float, float, float]
    mask: Optional[np.ndarray] = None

    def public(self) -> Dict[str, object]:
        out: Dict[str, object] = {"box": [round(float(v), 4) for v in self.box]}
        if self.mask is not None:
            out["mask"] = {"grid": list(self.mask.shape), "rows": ["".join("1" if v else "0" for v in r)
                                                                   for r in self.mask]}
        return out


def token_region(summary: Summary, token: int, grid: Tuple[int, int]) -> Region:
    """The region of ``token`` of one frame: its footprint's cells and their bounding box, or without a
    footprint a square of the token's size (in patches of the ``grid``) around its centroid."""
    fp = summary.footprint
    if fp is not None:
        boxes, masks = footprint_regions(np.asarray(fp)[None], np.array([token]))
        return Region(tuple(float(v) for v in boxes[0]), masks[0])
    cx, cy = (float(v) for v in summary.centroids[token])
    gh, gw = grid
    half_w = np.sqrt(max(float(summary.sizes[token]), 1.0) / (gh * gw)) / 2.0
    half_h = half_w
    return Region((max(0.0, cx - half_w), max(0.0, cy - half_h), min(1.0, cx + half_w), min(1.0, cy + half_h)))


def footprint_regions(footprints: np.ndarray, tokens: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Regions of many frames at once: footprints [F, grid_h, grid_w] and one token each [F] -> (boxes [F, 4] as
    (x0, y0, x1, y1) in [0, 1] of the model input, all 0 where the token stands for no cell; masks [F, gh, gw])."""
    masks = np.asarray(footprints) == np.asarray(tokens).reshape(-1, 1, 1)
    return mask_boxes(masks), masks


def pack_masks(masks: np.ndarray) -> List[bytes]:
    """``pack_mask`` of each of [F, grid_h, grid_w] masks."""
    m = np.asarray(masks, bool)
    packed = np.packbits(m.reshape(m.shape[0], -1), axis=1, bitorder="little")
    return [row.tobytes() for row in packed]


def pack_mask(mask: np.ndarray) -> bytes:
    """A [grid_h, grid_w] bool mask as bits, row-major, the first cell in the lowest bit."""
    return pack_masks(np.asarray(mask, bool)[None])[0]


def unpack_mask(data: bytes, grid: Tuple[int, int]) -> np.ndarray:
    n = grid[0] * grid[1]
    return np.unpackbits(np.frombuffer(data, np.uint8), count=n, bitorder="little").astype(bool).reshape(grid)


def stack_summaries(summaries: List[Summary]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [F, K, d], sizes [F, K], globals [F, D]) of frames with the same K and dims."""
    return (np.stack([s.tokens for s in summaries]).astype(np.float32),
            np.stack([s.sizes for s in summaries]).astype(np.float32),
            np.stack([s.global_embedding for s in summaries]).astype(np.float32))
