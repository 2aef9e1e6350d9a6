"""The slic summary head in torch: K spatially coherent summary tokens with footprints, for static-shape export.

The executable specification is ``benchmarks/summary_head_ref.py`` (numpy; ``tests/exporter/test_summary_head.py``
checks this module against it). Training-free; every step is a MatMul, ArgMin/ArgMax, an Equal against a
constant arange, Where, Div or Sqrt: static shapes, no scatter, TensorRT-parsable.

Inputs (a batch of B images; N tokens per image, N = Np unmerged, fewer after merging):

- ``feat`` [B, N, D]: the block-``layer`` patch tokens through the final LayerNorm (carried through the later
  merges as size-weighted means, ``exporter.merge``);
- ``size`` [B, N] patches per token, ``pos`` [B, N, 2] their mean patch centre (x, y) in [0, 1];
- ``src`` [B, N, G]: how many original patches of each of the G footprint cells every token stands for
  (a cell is c x c patches; carried additively through the merges, so every patch is counted once).

1. Centring and projection, fitted at export on the calibration images (``fit_projection``) and baked in as
   constants: xn_i = x_i / |x_i|, p_i = normalize((xn_i - mu) @ P) with mu [D] the size-weighted mean of the
   calibration tokens' xn and P = V R: V [D, d] their top d principal axes (V = I when d = D: centring only)
   and R [d, d] a fixed random rotation (orthogonal, seeded: ``rotation``). R changes no cosine, so nothing
   downstream sees it, except the wire's per-token int8/int4 quantization, whose step is max_j |p_ij| / qmax:
   on principal axes the first few coordinates carry most of a token (max |p_ij| ~ 0.57 on NEU-DET), rotated
   the energy spreads over all d (~ 0.28), so the step halves and the int4 rounding error (1 - cosine) falls
   3.5x (BENCHMARKS.md summary_tokens: PCA 96 int4 loses 0.1 point of region mAP instead of 1.6).
2. ``patch_mean`` = normalize(sum_i s_i p_i): the image's (or a query crop's) vector in the tokens' space.
3. Seeds: the cell centres q_j of the most nearly square sh x sw = K grid; c_j = normalize(sum of s_i p_i over
   the tokens nearest to q_j).
4. T iterations of SLIC-like clustering (feature and spatial distance, K ~ 1 / S^2 for seed spacing S):

       dist_ij = (1 - p_i . c_j) + lam * K * |pos_i - q_j|^2
       A = onehot(argmin_j dist_ij);  W = A * s;  n_j = sum_i W_ij
       c_j = normalize(sum_i W_ij p_i);  q_j = sum_i W_ij pos_i / n_j      (kept where n_j = 0)

5. Outputs: ``tokens`` c [B, K, d] (unit norm); ``footprint`` [B, gh, gw] int32, for each cell the token with the
   most of its patches, argmax_j (src^T A)_gj (first index on ties); sizes and centroids derive from it on the
   host (``tokenline.summary.boxes_from_footprint``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn


def seed_grid(k: int) -> Tensor:
    """[k, 2] cell centres (x, y) of the most nearly square sh x sw grid with sh * sw = k (sh <= sw)."""
    sh = max(d for d in range(1, int(math.isqrt(k)) + 1) if k % d == 0)
    sw = k // sh
    ys, xs = torch.meshgrid(torch.arange(sh), torch.arange(sw), indexing="ij")
    return torch.stack([(xs.flatten() + 0.5) / sw, (ys.flatten() + 0.5) / sh], dim=-1).float()


def cell_map(patch_grid: Tuple[int, int], cell: int) -> Tensor:
    """[Np, G] one-hot: the footprint cell (cell x cell patches, row-major) of every patch."""
    gh, gw = patch_grid
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    idx = (ys // cell) * (gw // cell) + xs // cell
    return (idx.flatten()[:, None] == torch.arange((gh // cell) * (gw // cell))).float()


def _normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _onehot_argmin(dist: Tensor) -> Tensor:
    k = dist.shape[-1]
    return (dist.argmin(dim=-1, keepdim=True) == torch.arange(k, device=dist.device)).to(dist.dtype)


class SummaryHead(nn.Module):
    """K summary tokens, their footprints and the patch mean from block features (module docstring)."""

    def __init__(self, in_dim: int, dim: int, k: int, footprint_grid: Tuple[int, int], iters: int = 3,
                 lam: float = 0.5) -> None:
        super().__init__()
        if not 1 <= dim <= in_dim:
            raise ValueError(f"token dimension {dim} must be between 1 and the feature width {in_dim}")
        self.k, self.dim, self.iters, self.lam = k, dim, iters, lam
        self.footprint_grid = tuple(footprint_grid)
        # fitted at export (set_projection), not part of a checkpoint's state
        self.register_buffer("mean", torch.zeros(in_dim), persistent=False)
        self.register_buffer("proj", torch.eye(in_dim)[:, :dim].clone(), persistent=False)
        self.register_buffer("seeds", seed_grid(k), persistent=False)

    def set_projection(self, mean: np.ndarray, proj: np.ndarray) -> None:
        """Bake a fitted centring mean [D] and projection [D, d] into the head."""
        with torch.no_grad():
            self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
            self.proj.copy_(torch.as_tensor(proj, dtype=self.proj.dtype))

    def project(self, feat: Tensor) -> Tensor:
        """p_i = normalize((normalize(x_i) - mu) @ P)."""
        return _normalize((_normalize(feat) - self.mean.to(feat.dtype)) @ self.proj.to(feat.dtype))

    def forward(self, feat: Tensor, size: Tensor, pos: Tensor, src: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(tokens [B, K, d], footprint [B, gh, gw] int32, patch_mean [B, d])."""
        p = self.project(feat)
        w = size.unsqueeze(-1)
        patch_mean = _normalize((w * p).sum(dim=1))
        b = p.shape[0]
        q = self.seeds.to(p.dtype).unsqueeze(0).expand(b, -1, -1)  # [B, K, 2]

        def sqdist(q: Tensor) -> Tensor:  # [B, N, K]
            diff = pos.unsqueeze(2) - q.unsqueeze(1)
            return (diff * diff).sum(dim=-1)

        c = _normalize((_onehot_argmin(sqdist(q)) * w).transpose(1, 2) @ p)
        a = None
        spatial = self.lam * self.k
        for _ in range(max(1, self.iters)):
            a = _onehot_argmin((1.0 - p @ c.transpose(1, 2)) + spatial * sqdist(q))
            wa = a * w
            cnt = wa.sum(dim=1).unsqueeze(-1)  # [B, K, 1]
            live = cnt > 0
            c = torch.where(live, _normalize(wa.transpose(1, 2) @ p), c)
            q = torch.where(live, (wa.transpose(1, 2) @ pos) / cnt.clamp_min(1e-12), q)
        cells = src.transpose(1, 2) @ a  # [B, G, K] patches of each cell per summary token
        footprint = cells.argmax(dim=-1).to(torch.int32).reshape(b, *self.footprint_grid)
        return c, footprint, patch_mean


ROTATION_SEED = 0  # the seed of R in the projection (recorded in the manifest's projection.rotation_seed)


def rotation(d: int, seed: int = ROTATION_SEED) -> np.ndarray:
    """A fixed random rotation [d, d] (orthogonal, uniformly distributed: QR of a seeded Gaussian matrix with
    the signs of R's diagonal folded in), float64."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]


def fit_projection(feat: np.ndarray, size: np.ndarray, dims: int,
                   rotation_seed: Optional[int] = ROTATION_SEED) -> Tuple[np.ndarray, np.ndarray, float]:
    """(mean [D], projection [D, d], explained variance) of calibration tokens ``feat`` [M, D] with patch counts
    ``size`` [M]: the size-weighted mean of the unit tokens and their top ``dims`` principal axes (I when
    ``dims`` = D: centring only, explained variance 1), times ``rotation(dims, rotation_seed)`` (none when
    ``rotation_seed`` is None)."""
    x = np.asarray(feat, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    w = np.asarray(size, np.float64)
    w = w / w.sum()
    mu = (w[:, None] * x).sum(0)
    d_in = x.shape[1]
    rot = np.eye(min(dims, d_in)) if rotation_seed is None else rotation(min(dims, d_in), rotation_seed)
    if dims >= d_in:
        return mu.astype(np.float32), rot.astype(np.float32), 1.0
    xc = (x - mu) * np.sqrt(w)[:, None]
    _, sv, vt = np.linalg.svd(xc, full_matrices=False)
    var = sv**2
    return (mu.astype(np.float32), (vt[:dims].T @ rot).astype(np.float32),
            float(var[:dims].sum() / max(var.sum(), 1e-30)))


def fit_head(vit, calib: np.ndarray, batch: int = 8) -> float:
    """Fit ``vit.head``'s centring and projection (``fit_projection``) on the calibration images' summary-layer
    tokens, as ``vit`` is configured (merges included), and bake them into the head; returns the explained
    variance. ``calib``: preprocessed images [B, 3, H, W]."""
    head = vit.head
    assert head is not None
    feats, sizes = [], []
    with torch.no_grad():
        for i in range(0, len(calib), batch):
            f, s = vit.summary_features(torch.from_numpy(np.ascontiguousarray(calib[i : i + batch])))
            feats.append(f.reshape(-1, f.shape[-1]).float().numpy())
            sizes.append(s.reshape(-1).float().numpy())
    mean, proj, explained = fit_projection(np.concatenate(feats), np.concatenate(sizes), head.dim, ROTATION_SEED)
    head.set_projection(mean, proj)
    return explained
