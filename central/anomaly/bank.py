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
own frames' leave-one-out scores (each frame scored against the bank without its own tokens and, in metric
whitened, with a whitening fitted without them too: ``loo_whitened_scores``), or given by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np

from central.kmeans import KMEANS_ITERS, kmeans, unit
from tokenline import anomaly
from tokenline.anomaly import Bank, BankInfo

PROJECTION_DIM = 64  # coreset selection runs on this many random projections of the tokens
HOT_SHARE = 0.01  # greedy_coreset updates this share of the rows at every pick, the rest now and then
# a whitened bank needs a pool of at least this many tokens per dimension; smaller sets get cosine banks: their
# covariance is too poorly known to rank better, and their thresholds flag more new good frames than cosine ones do
# (ELPV mono cells, the default export's K=16 d=96 summaries, threshold at the 0.99 quantile, 5 draws; BENCHMARKS.md
# `elpv_metric`: sets of 5 and 6 frames (0.8 and 1 token per dimension) rank no better whitened and flag 19 and 21 %
# of new good cells against cosine's 12 and 15 %; from 10 frames (1.7 per dimension) whitened ranks better, AUROC
# 0.852 against 0.836, and flags as many, 8.8 against 9.2 %)
WHITEN_MIN_TOKENS_PER_DIM = 1.5


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

    Exact, with lazy updates: a row's squared distance to the nearest pick only falls as picks are added, so a value
    last computed some picks ago is an upper bound. Only the ``HOT_SHARE`` of rows with the largest values (at or
    above tau, the quantile at the last split) are updated at every pick, by one matrix-vector product done by
    ``einsum`` (its own loop: a threaded BLAS call per pick costs milliseconds of thread hand-off on a busy machine);
    while the largest of them is >= tau it is the farthest row of all, since every other row's bound is below tau.
    When it falls below tau, the other rows catch up on the picks since in blocks of one BLAS matrix product each,
    and the rows are split again. Same picks as updating every row at every pick, up to float32 rounding of ties;
    3.5-5x faster on 11,000-240,000 tokens (10,000 picks), which streamed the whole pool through memory per pick."""
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
    picked = np.zeros(m, np.int64)  # the first pick: row 0
    mind = np.einsum("ij,j->i", z, z[0])  # each row's squared distance to its nearest pick (an upper bound)
    mind *= -2.0
    mind += sq
    mind += sq[0]
    mind[0] = -1.0
    done = 1  # every row is up to date with picks[:done]; the hot rows with all picks

    def split() -> Tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        tau = float(np.quantile(mind, 1.0 - HOT_SHARE))
        hot = np.flatnonzero(mind >= tau)
        return tau, hot, np.ascontiguousarray(z[hot]), sq[hot], mind[hot]

    tau, hot, z_hot, sq_hot, mind_hot = split()
    i = 1
    while i < m:
        j = int(np.argmax(mind_hot))
        if mind_hot[j] < tau:  # a cold row may be the farthest now: bring every row up to date, split again
            mind[hot] = mind_hot
            cold = np.ones(n, bool)
            cold[hot] = False
            rows = np.flatnonzero(cold)
            z_new, sq_new = z[picked[done:i]], sq[picked[done:i]]
            for a in range(0, rows.size, 8192):
                r = rows[a: a + 8192]
                d2 = z[r] @ z_new.T
                d2 *= -2.0
                d2 += sq[r][:, None]
                d2 += sq_new[None, :]
                mind[r] = np.minimum(mind[r], d2.min(axis=1))
            done = i
            tau, hot, z_hot, sq_hot, mind_hot = split()
            continue
        cur = int(hot[j])
        picked[i] = cur
        d = np.einsum("ij,j->i", z_hot, z[cur])
        d *= -2.0
        d += sq_hot
        d += sq[cur]
        np.minimum(mind_hot, d, out=mind_hot)
        mind_hot[j] = -1.0
        i += 1
    return picked


def shrunk_covariance(s: np.ndarray, n: int) -> np.ndarray:
    """The covariance ``s`` [d, d] of ``n`` tokens shrunk towards mu I (mu = tr(S) / d) by Oracle Approximating
    Shrinkage (Chen et al. 2010; what scikit-learn's OAS computes): (1 - rho) S + rho mu I with
    rho = min(1, (tr(S^2) / d + mu^2) / ((n + 1) (tr(S^2) / d - mu^2 / d))), no parameter. The shrinkage keeps it
    invertible when the set has fewer tokens than dimensions."""
    rho, mu = oas_shrinkage(s, n)
    return (1.0 - rho) * s + rho * mu * np.eye(s.shape[0])


def oas_shrinkage(s: np.ndarray, n: int) -> Tuple[float, float]:
    """(rho, mu) of ``shrunk_covariance``."""
    d = s.shape[0]
    mu = float(np.trace(s)) / d
    alpha = float(np.mean(s * s))
    den = (n + 1.0) * (alpha - mu * mu / d)
    return (1.0 if den <= 0 else min(1.0, (alpha + mu * mu) / den)), mu


def fit_whitening(x: np.ndarray) -> np.ndarray:
    """[d + 1, d] float32: the mean m of tokens ``x`` [N, d] and W = V L^-1/2, where V L V^T is their covariance
    shrunk by ``shrunk_covariance``."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    m = x.mean(axis=0)
    s = shrunk_covariance((x - m).T @ (x - m) / max(n, 1), n)
    lam, v = np.linalg.eigh(s)
    w = v / np.sqrt(np.maximum(lam, 1e-12 * max(float(np.trace(s)) / len(m), 1e-30)))[None, :]
    return np.concatenate([m[None, :], w]).astype(np.float32)


def loo_whitened_scores(pool: np.ndarray, src: np.ndarray, bank: Bank, queries: np.ndarray, ok: np.ndarray
                        ) -> np.ndarray:
    """[F] each set frame's leave-one-out score in metric whitened, *its whitening fitted without it too*.

    ``pool`` [N, d] the unit tokens the whitening was fitted on, ``src`` [N] their frames; ``bank`` the whitened
    bank built from them; ``queries`` [F, K, d] the frames' unit tokens, ``ok`` [F, K] those that count. Frame i's
    score is the largest, over its tokens x, distance to the nearest bank token b of another frame, measured with
    S_i, the shrunk covariance of the pool without frame i's tokens: d_i(x, b)^2 = (x - b)^T S_i^-1 (x - b).

    Why: a frame's own tokens shape the set's covariance, so measured with it they look more typical than a new
    good frame does; thresholds from such scores flag several times the quantile's share of new good frames
    (BENCHMARKS.md, `elpv_metric`).

    How, without a d x d inverse per frame. In the set's whitening z = W^T (x - m), d_i^2 = u^T A_i^-1 u for
    u = z_x - z_b and A_i = W^T S_i W. With C the pool's covariance, Z the frame's c tokens (centred on the pool's
    mean, whitened) and L = N - c tokens left, S_i = (1 - rho_i) C_i + rho_i mu_i I (OAS) and
    W^T C_i W = (N / L) M - Z^T Z / L - z' z'^T, z' = -sum(Z) / L, where M = W^T C W and W^T W are fixed. One basis T
    for the whole set makes both diagonal (T^T W^T W T = I, T^T M T = Gamma): there, with v = T^T u,
    A_i = D_i - Y^T Y, D_i = (1 - rho_i)(N / L) Gamma + rho_i mu_i (a vector), Y the (c + 1) rows sqrt(1 - rho_i)
    [Z T / sqrt(L); z' T]. Woodbury: d_i^2 = |p|^2 + |p J|^2 with p = D_i^-1/2 v and J = Y_d^T U (1 - g)^-1/2 for
    Y_d = Y D_i^-1/2, Y_d Y_d^T = U g U^T: a Euclidean distance after a (d + c + 1)-column map of p, O(d c) per
    token instead of O(d^2). Candidates: with D_0 = (1 - rho) Gamma + rho mu (the set's A = I in this basis) and
    r = D_0 / D_i, d_i^2 lies within [r_min |u|^2, r_max |u|^2 / (1 - g_max)], so the nearest token under S_i is
    among those whose |u|^2 is at most r_max / (r_min (1 - g_max)) times the smallest; only those are measured."""
    w = bank.whiten
    assert w is not None
    x = np.asarray(pool, np.float64)
    n, d = x.shape
    xc = x - x.mean(axis=0)
    cov = xc.T @ xc / n
    rho, mu = oas_shrinkage(cov, n)
    wm = w[1:].astype(np.float64)
    ww = wm.T @ wm
    nu, qn = np.linalg.eigh(ww)
    half = (qn / np.sqrt(np.maximum(nu, 1e-30 * nu.max()))) @ qn.T  # (W^T W)^-1/2
    gamma, r = np.linalg.eigh(half @ (wm.T @ cov @ wm) @ half)
    gamma = np.maximum(gamma, 0.0)
    t = half @ r  # T^T W^T W T = I, T^T (W^T C W) T = diag(gamma)
    d0 = (1.0 - rho) * gamma + rho * mu
    d0 = np.maximum(d0, 1e-12 * d0.max())
    vpool = xc @ (wm @ t)  # the pool's tokens, centred, in the basis T: the frames' Y
    zq = anomaly.apply_whitening(unit(queries), w).astype(np.float32)  # [F, K, d]
    zb = bank.tokens.astype(np.float32)
    zb2 = np.einsum("ij,ij->i", zb, zb)
    tf = t.astype(np.float32)
    vq, vb = zq @ tf, zb @ tf
    f = queries.shape[0]
    by_frame = np.argsort(src, kind="stable")  # the pool's rows of frame i: by_frame[starts[i]:starts[i + 1]]
    starts = np.searchsorted(src[by_frame], np.arange(f + 1))
    out = np.zeros(f, np.float32)
    for i in range(f):
        rows = np.flatnonzero(ok[i])
        if rows.size == 0:
            continue  # no token counts: score 0, as Bank.score_arrays
        mine = by_frame[starts[i]: starts[i + 1]]
        left = n - mine.size
        others = bank.src != i
        if left < 2 or not others.any():
            out[i] = anomaly.FAR
            continue
        xm = xc[mine]
        shift = xm.sum(axis=0) / left  # minus the mean of the tokens left
        rho_i, mu_i = oas_shrinkage((n * cov - xm.T @ xm) / left - np.outer(shift, shift), left)
        dg = (1.0 - rho_i) * (n / left) * gamma + rho_i * mu_i
        dg = np.maximum(dg, 1e-12 * dg.max())  # a direction the pool has no variance in, and no shrinkage
        vm = vpool[mine]
        y = np.sqrt(1.0 - rho_i) * np.vstack([vm / np.sqrt(left), -vm.sum(axis=0, keepdims=True) / left])
        yd = y / np.sqrt(dg)
        g, u = np.linalg.eigh(yd @ yd.T)
        g = np.minimum(np.maximum(g, 0.0), 1.0 - 1e-9)  # < 1: A_i is positive definite (rounding aside)
        jm = (yd.T @ (u / np.sqrt(1.0 - g))).astype(np.float32)
        ratio = d0 / dg
        z = zq[i, rows]
        z2 = np.einsum("ij,ij->i", z, z)[:, None]
        d2 = z2 + zb2[None, :] - 2.0 * (z @ zb.T)
        d2[:, ~others] = np.inf
        # |u|^2 in float32 is off by up to anomaly.ROUNDING (|z|^2 + |z_b|^2) (cancellation when u is small): widen
        # the reach by that much, so that the nearest token is among the candidates whatever the rounding
        slack = anomaly.ROUNDING * (z2 + zb2.max())
        reach = (np.maximum(d2.min(axis=1, keepdims=True), 0.0) + slack) * (
            ratio.max() / (ratio.min() * (1.0 - g.max()))) + slack
        cand = np.flatnonzero((d2 <= reach).any(axis=0))
        # measured as the scorer measures (tokenline.anomaly.Bank.nearest_distance): the nearest candidate found by
        # float32 products (|a|^2 - 2 a.b + |b|^2), its distance computed directly
        scale = (1.0 / np.sqrt(dg)).astype(np.float32)
        px, pb = vq[i, rows] * scale, vb[cand] * scale
        fx, fb = np.hstack([px, px @ jm]), np.hstack([pb, pb @ jm])
        dist = np.einsum("ij,ij->i", fx, fx)[:, None] + np.einsum("ij,ij->i", fb, fb)[None, :] - 2.0 * (fx @ fb.T)
        diff = fx - fb[dist.argmin(axis=1)]
        out[i] = min(float(np.sqrt(np.einsum("ij,ij->i", diff, diff).max())), anomaly.FAR)
    return out


def rounding_floor(bank: Bank) -> float:
    """The smallest whitened distance the search tells from 0: sqrt(anomaly.ROUNDING (|z|^2 + |z_b|^2)) at the
    bank's largest |z_b|, below which the float32 products that choose the nearest bank token cannot tell
    candidates apart. A quantile threshold is never set below it: a set of identical frames (a static scene) has
    leave-one-out scores near 0, and new frames of that scene, with their sensor noise, would all flag against such
    a threshold."""
    zb = bank.tokens.astype(np.float32)
    return float(np.sqrt(anomaly.ROUNDING * 2.0 * float(np.einsum("ij,ij->i", zb, zb).max())))


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
    pool = units = unit(frames.tokens.reshape(f * k, d)[ok])
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
    if whiten is not None:  # each frame measured with a whitening fitted without it (loo_whitened_scores)
        tok = loo_whitened_scores(units, src, bank, frames.tokens, ok.reshape(f, k))
    else:
        tok = replace(bank, info=replace(info, mode="tokens")).score_arrays(frames.tokens, frames.sizes,
                                                                          exclude=every).score
    stats = {"token_stats": (float(tok.mean()), float(tok.std()))}
    loo = tok
    if info.mode != "tokens":
        glob = 1.0 - bank.global_similarity(unit(frames.globals), exclude=every)
        stats["global_stats"] = (float(glob.mean()), float(glob.std()))
        loo = glob if info.mode == "global" else anomaly.standardized_sum(tok, glob, stats["token_stats"],
                                                                             stats["global_stats"])
    bank = replace(bank, info=replace(bank.info, **stats))
    t = float(threshold) if threshold is not None else float(np.quantile(loo, quantile))
    if threshold is None and whiten is not None and info.mode == "tokens":
        t = max(t, rounding_floor(bank))
    return Built(replace(bank, info=replace(bank.info, threshold=t)), loo)


def with_threshold(bank: Bank, threshold: float) -> Bank:
    return replace(bank, info=replace(bank.info, threshold=float(threshold)))
