"""Reference summary head: K spatially coherent summary tokens with footprints, as a pure numpy function.

Training-free, static shapes, and written only with operations an ONNX graph for TensorRT 8.5 can hold
(MatMul, ReduceSum, TopK with a constant k, ArgMin, Equal against a constant arange, Gather, Where, Div,
Sqrt): this module is the executable specification the exporter's torch head must match.

Inputs (one image; a batch adds a leading axis in the graph):

- ``x`` [N, D]: the backbone's tokens (N = Np for an unmerged backbone; fewer after Turbo/ToMe merging);
- ``src`` [N, Np]: which of the Np original patches each token stands for (0/1, every patch in exactly one
  token). Unmerged: the identity. Merged: tracked through every merge by carrying it the way the merge
  carries centroids (``src / size`` is size-averaged like a position, so ``size * that`` is the union);
- ``grid`` (gh, gw): the patch grid, Np = gh * gw.

Notation: xn_i = x_i / |x_i|; s_i = sum_p src[i, p] (patches of token i); pp_p the centre of patch p in
[0, 1]^2 (x, y); pos_i = sum_p src[i, p] pp_p / s_i.

1. Kg = K - Kp grid seeds at the cell centres q_j of a fixed sh x sw grid over the image (sh * sw = Kg),
   their features the size-weighted mean of the tokens nearest to each centre; T clustering steps (3.).
2. Kp protected seeds (optional) where those clusters represent their tokens worst: err_i = 1 - xn_i . c_a(i);
   Kp times: j = argmax err (TopK 1), seed (xn_j, pos_j), err = min(err, 1 - xn . xn_j); then step 3 again
   with all K = Kg + Kp centres. Measured (BENCHMARKS summary_tokens): Kp = 0 is best for kNN anomaly
   scoring (protected seeds turn the rarest patches of normal frames into small, noisy tokens), Kp = 2-4
   gains about one point of region mAP.
3. T iterations of SLIC-like clustering of the tokens with feature and spatial distance

       dist_ij = (1 - xn_i . c_j) + lam * Kg * |pos_i - q_j|^2        (Kg ~ 1 / S^2, S the seed spacing)
       A = onehot(argmin_j dist_ij)            (ArgMin, then Equal against arange(K))
       W = A * s[:, None];  n_j = sum_i W_ij
       c_j = normalize(sum_i W_ij xn_i);  q_j = sum_i W_ij pos_i / n_j      (kept as they were where n_j = 0)

4. Outputs: tokens c [K, D] (unit norm), sizes n [K] (patches), centroids q [K, 2], and the footprint
   fp [Np] = argmax_j (src^T A)_pj, the summary token each original patch belongs to (uint8; 4 bits at
   K <= 16). The footprints partition the patches; n_j = |{p : fp_p = j}|; q_j is the mean patch centre of
   footprint j (an empty cluster has size 0, the centroid of its last members and its last feature).

The spatial term keeps footprints compact, so a matched token points at one place; the feature term lets a
region unlike its surroundings (a defect) form its own cluster instead of being averaged into a grid cell.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np


class HeadOutput(NamedTuple):
    tokens: np.ndarray  # [K, D] float32, unit norm
    sizes: np.ndarray  # [K] float32, patches per token
    centroids: np.ndarray  # [K, 2] float32, (x, y) in [0, 1]
    footprint: np.ndarray  # [Np] uint8, summary token of each original patch


def patch_centres(grid: Tuple[int, int]) -> np.ndarray:
    """[gh * gw, 2] centres (x, y) of the patches in [0, 1], row-major."""
    gh, gw = grid
    ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([(xs.ravel() + 0.5) / gw, (ys.ravel() + 0.5) / gh], axis=1).astype(np.float32)


def seed_grid(kg: int) -> np.ndarray:
    """[kg, 2] cell centres of the most nearly square sh x sw grid with sh * sw = kg (sh <= sw)."""
    sh = max(d for d in range(1, int(np.sqrt(kg)) + 1) if kg % d == 0)
    sw = kg // sh
    ys, xs = np.meshgrid(np.arange(sh), np.arange(sw), indexing="ij")
    return np.stack([(xs.ravel() + 0.5) / sw, (ys.ravel() + 0.5) / sh], axis=1).astype(np.float32)


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _onehot_argmin(dist: np.ndarray) -> np.ndarray:
    k = dist.shape[-1]
    return (np.argmin(dist, axis=-1)[..., None] == np.arange(k)).astype(np.float32)


def summarize(
    x: np.ndarray,
    src: np.ndarray,
    grid: Tuple[int, int],
    k: int = 16,
    k_protect: int = 0,
    iters: int = 3,
    lam: float = 0.5,
) -> HeadOutput:
    """K summary tokens with footprints (module docstring). ``k_protect`` in [0, k)."""
    x = np.asarray(x, dtype=np.float32)
    src = np.asarray(src, dtype=np.float32)
    n, _ = x.shape
    if src.shape != (n, grid[0] * grid[1]):
        raise ValueError(f"src must be [{n}, {grid[0] * grid[1]}], got {src.shape}")
    if not 0 <= k_protect < k or k > n:
        raise ValueError(f"need 0 <= k_protect < k <= N tokens; got k_protect={k_protect}, k={k}, N={n}")
    pp = patch_centres(grid)
    size = src.sum(axis=1)
    pos = (src @ pp) / size[:, None]
    xn = _normalize(x)
    kg = k - k_protect

    def cluster(c: np.ndarray, q: np.ndarray, steps: int):
        """SLIC-like steps from centres (c, q); returns the last assignment, centres and counts."""
        a = w = cnt = None
        for _ in range(max(1, steps)):
            d2 = ((pos[:, None, :] - q[None]) ** 2).sum(-1)
            a = _onehot_argmin((1.0 - xn @ c.T) + lam * kg * d2)
            w = a * size[:, None]
            cnt = w.sum(axis=0)
            live = cnt > 0
            c = np.where(live[:, None], _normalize(w.T @ xn), c)
            q = np.where(live[:, None], (w.T @ pos) / np.maximum(cnt, 1e-12)[:, None], q)
        return a, c, q, cnt

    # 1: grid seeds, features = mean of the tokens nearest to each cell centre; Kg-cluster pass
    q = seed_grid(kg)
    a0 = _onehot_argmin(((pos[:, None, :] - q[None]) ** 2).sum(-1))
    c = _normalize((a0 * size[:, None]).T @ xn)
    a, c, q, cnt = cluster(c, q, iters)
    # 2: protected seeds where the Kg clusters represent their tokens worst, greedily suppressing similar ones
    if k_protect:
        err = 1.0 - (xn * (a @ c)).sum(-1)  # cosine distance of each token to its cluster centre
        c_p, q_p = [], []
        for _ in range(k_protect):
            j = int(np.argmax(err))  # TopK(err, 1)
            c_p.append(xn[j])
            q_p.append(pos[j])
            err = np.minimum(err, 1.0 - xn @ xn[j])
        c = np.concatenate([c, np.stack(c_p)]).astype(np.float32)
        q = np.concatenate([q, np.stack(q_p)]).astype(np.float32)
        # 3: all K clusters
        a, c, q, cnt = cluster(c, q, iters)

    # 4: footprints
    f = src.T @ a  # [Np, K], one 1 per row
    footprint = np.argmax(f, axis=1).astype(np.uint8)
    return HeadOutput(c.astype(np.float32), cnt.astype(np.float32), q.astype(np.float32), footprint)


def footprint_from_sources(src: np.ndarray) -> np.ndarray:
    """[Np] index of the token that stands for each patch, from a [K, Np] 0/1 (or size-scaled) source map."""
    return np.argmax(np.asarray(src), axis=0).astype(np.uint8)


def pack_footprint(fp: np.ndarray) -> bytes:
    """4 bits per patch (K <= 16): patch 2i in the low nibble, 2i+1 in the high nibble."""
    fp = np.asarray(fp, dtype=np.uint8)
    if fp.size and int(fp.max()) > 15:
        raise ValueError("4-bit footprints need K <= 16")
    if fp.size % 2:
        fp = np.concatenate([fp, np.zeros(1, np.uint8)])
    return (fp[0::2] | (fp[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_footprint(buf: bytes, n: int) -> np.ndarray:
    b = np.frombuffer(buf, dtype=np.uint8)
    out = np.empty(b.size * 2, dtype=np.uint8)
    out[0::2], out[1::2] = b & 0x0F, b >> 4
    return out[:n]
