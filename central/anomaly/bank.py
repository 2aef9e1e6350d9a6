"""Building a reference set's memory bank from its frames: whitening, coreset, inverted lists, leave-one-out threshold.

Pure functions on arrays. The token pool (every summary token of the set's frames that stands for at least
``min_token_size`` patches), in metric ``whitened`` first whitened by its own mean and shrunk covariance
(``fit_whitening``; tokenline.anomaly says why; a pool of fewer than ``WHITEN_MIN_TOKENS_PER_DIM`` tokens per
dimension gets a cosine bank instead), is subsampled to ``max_bank_tokens`` by a greedy k-center coreset
(PatchCore's subsampling: each step keeps the token farthest from those kept, on a fixed random projection for
speed); a bank of ``tokenline.anomaly.LISTS_FROM`` tokens or more is then grouped into about sqrt(M) inverted lists
by k-means (spherical for cosine, Euclidean for whitened banks) seeded with the coreset's first picks (smaller
banks keep one list): the lists bound each token's distance when scoring, and above
``tokenline.anomaly.EXHAUSTIVE_UP_TO`` tokens they are what is searched. The threshold is a quantile of the set's
own frames' leave-one-out scores (each frame scored against the bank without its own tokens), or given by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from central.kmeans import KMEANS_ITERS, kmeans, unit
from tokenline import anomaly
from tokenline.anomaly import Bank, BankInfo

PROJECTION_DIM = 64  # coreset selection runs on this many random projections of the tokens
# a whitened bank needs a pool of at least this many tokens per dimension; smaller sets get cosine banks: their
# covariance is too poorly known, and their leave-one-out thresholds flag far more good frames than the quantile
# says (ELPV cells, K=16, d=96, threshold at the 0.99 quantile: 37 % of new good frames flagged from a 10-frame set,
# 7.5 % from 30 frames, 1.9 % from 100 frames; cosine 5.8 / 4.5 / 1.6 %)
WHITEN_MIN_TOKENS_PER_DIM = 10


@dataclass(frozen=True)
class SetFrames:
    """The frames of a reference set as arrays: tokens [F, K, d], sizes [F, K], globals [F, D]."""

    tokens: np.ndarray
    sizes: np.ndarray
    globals: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True)
class Built:
    """A bank and what it was calibrated on: the set frames' leave-one-out scores."""

    bank: Bank
    loo_scores: np.ndarray


def greedy_coreset(x: np.ndarray, m: int, proj_dim: int = PROJECTION_DIM, seed: int = 0) -> np.ndarray:
    """Indices of ``m`` rows of ``x`` [N, d] chosen greedily, each the farthest from those already chosen
    (k-center); the first is row 0. Distances on a fixed Gaussian projection to ``proj_dim`` dims when d is larger.

    Each pick updates every row's distance to the nearest pick with one matrix-vector product, done by ``einsum``
    (its own loop, not BLAS): a threaded BLAS call per pick costs milliseconds of thread hand-off on a busy
    machine, which made 10,000 picks take minutes."""
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    if m >= n:
        return np.arange(n)
    if x.shape[1] > proj_dim:
        p = np.random.default_rng(seed).standard_normal((x.shape[1], proj_dim)).astype(np.float32)
        z = x @ (p / np.sqrt(proj_dim))
    else:
        z = x
    z = np.ascontiguousarray(z)
    sq = np.einsum("ij,ij->i", z, z)
    picked = np.empty(m, np.int64)
    mind = np.full(n, np.inf, np.float32)
    cur = 0
    for i in range(m):
        picked[i] = cur
        d = np.einsum("ij,j->i", z, z[cur])
        d *= -2.0
        d += sq
        d += sq[cur]
        np.minimum(mind, d, out=mind)
        mind[cur] = -1.0
        cur = int(np.argmax(mind))
    return picked


def fit_whitening(x: np.ndarray) -> np.ndarray:
    """[d + 1, d] float32: the mean m of tokens ``x`` [N, d] and W = V L^-1/2, where V L V^T is their covariance S
    shrunk towards mu I (mu = tr(S) / d) by Oracle Approximating Shrinkage (Chen et al. 2010; what scikit-learn's
    OAS computes): rho = min(1, (tr(S^2) / d + mu^2) / ((N + 1) (tr(S^2) / d - mu^2 / d))), no parameter. The
    shrinkage keeps W finite when the set has fewer tokens than dimensions."""
    x = np.asarray(x, np.float64)
    n, d = x.shape
    m = x.mean(axis=0)
    s = (x - m).T @ (x - m) / max(n, 1)
    mu = float(np.trace(s)) / d
    alpha = float(np.mean(s * s))
    den = (n + 1.0) * (alpha - mu * mu / d)
    rho = 1.0 if den <= 0 else min(1.0, (alpha + mu * mu) / den)
    s = (1.0 - rho) * s + rho * mu * np.eye(d)
    lam, v = np.linalg.eigh(s)
    w = v / np.sqrt(np.maximum(lam, 1e-12 * max(mu, 1e-30)))[None, :]
    return np.concatenate([m[None, :], w]).astype(np.float32)


def n_lists_for(m: int) -> int:
    """Inverted lists for a bank of m tokens: one below ``LISTS_FROM``, else about sqrt(m)."""
    return 1 if m < anomaly.LISTS_FROM else int(round(np.sqrt(m)))


def build_bank(frames: SetFrames, info: BankInfo, max_tokens: int, quantile: float,
               threshold: Optional[float] = None) -> Built:
    """The bank of a set's frames (at least two) and its threshold: ``threshold`` when given, else the
    ``quantile`` of the frames' leave-one-out scores. ``info`` supplies the set's identity, mode, nprobe and
    minimum token size and metric (whitened falls back to cosine for a small pool, ``WHITEN_MIN_TOKENS_PER_DIM``);
    counts, statistics and the threshold are filled in here."""
    f, k, d = frames.tokens.shape
    if f < 2:
        raise ValueError("a reference set needs at least two frames (its threshold comes from leave-one-out scores)")
    ok = frames.sizes.reshape(-1) >= info.min_token_size
    pool = unit(frames.tokens.reshape(f * k, d)[ok])
    src = np.repeat(np.arange(f, dtype=np.int32), k)[ok]
    if pool.shape[0] == 0:
        raise ValueError(f"no token of the set's frames stands for >= {info.min_token_size} patches")
    whiten = None
    if info.metric == "whitened" and pool.shape[0] < WHITEN_MIN_TOKENS_PER_DIM * d:
        info = replace(info, metric="cosine")
    if info.metric == "whitened":
        whiten = fit_whitening(pool)
        pool = anomaly.apply_whitening(pool, whiten)
    n_bank = min(max_tokens, pool.shape[0])
    c = n_lists_for(n_bank)
    if n_bank < pool.shape[0] or c > 1:
        order = greedy_coreset(pool, n_bank)  # the kept tokens; their first picks seed the lists
    else:
        order = np.arange(pool.shape[0])
    kept, kept_src = pool[order], src[order]
    if c > 1:
        assign, cent = kmeans(kept, c, np.arange(c), KMEANS_ITERS, euclidean=whiten is not None)
        by_list = np.argsort(assign, kind="stable")
        kept, kept_src = kept[by_list], kept_src[by_list]
        offsets = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=c))])
    else:
        cent = kept.mean(0, keepdims=True) if whiten is not None else unit(kept.mean(0, keepdims=True))
        offsets = np.array([0, kept.shape[0]])
    globals_ = unit(frames.globals) if info.mode != "tokens" else np.zeros((0, frames.globals.shape[-1]), np.float32)
    info = replace(info, frames=f, pool_tokens=int(pool.shape[0]))
    # the half-precision tokens are what the file stores and every scorer uses: calibrate on them too
    bank = Bank(kept.astype(np.float16), offsets, cent, kept_src, globals_.astype(np.float16), info, whiten)
    every = np.arange(f)
    tok = replace(bank, info=replace(info, mode="tokens")).score_arrays(frames.tokens, frames.sizes,
                                                                      exclude=every).score
    stats = {"token_stats": (float(tok.mean()), float(tok.std()))}
    if info.mode != "tokens":
        glob = 1.0 - bank.global_similarity(unit(frames.globals), exclude=every)
        stats["global_stats"] = (float(glob.mean()), float(glob.std()))
    bank = replace(bank, info=replace(bank.info, **stats))
    # mode tokens: the leave-one-out scores are the token scores above (one search of the pool, not two)
    loo = tok if info.mode == "tokens" else bank.score_arrays(frames.tokens, frames.sizes, frames.globals,
                                                              exclude=every).score
    t = float(threshold) if threshold is not None else float(np.quantile(loo, quantile))
    return Built(replace(bank, info=replace(bank.info, threshold=t)), loo)


def with_threshold(bank: Bank, threshold: float) -> Bank:
    return replace(bank, info=replace(bank.info, threshold=float(threshold)))
