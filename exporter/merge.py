"""Informativity-driven token merging (Turbo; ToMe is the alpha = 0 case), written for static-shape export.

One call merges ``r`` of the ``N`` patch tokens of every image into others, leaving ``N - r``.

Bipartite split. The patch tokens are split alternately into a source set A (even positions) and a
destination set B (odd positions); [CLS]/register tokens are kept out of the split by the caller, so they are
never merged and never merged into.

Mutual redundancy. For every a in A, with keys k (averaged over heads) as the similarity metric,

    R(a) = max_b cos(k_a, k_b),        dst(a) = argmax_b cos(k_a, k_b).

Semantic value. S(a) = the attention the [CLS] query pays to a (the [CLS] row of the attention map, averaged
over heads; for models without [CLS], the mean attention a receives from all queries). Both are
probabilities that sum to 1 over the tokens, so alpha has the same meaning at every depth.

Informativity-driven merge score (Turbo):

    E(a) = R(a) - alpha * S(a)

The r tokens of A with the highest E are merged into dst(a); the rest of A and all of B are kept. With
alpha = 0 this is ToMe's bipartite soft matching.

Size-weighted merging. Each token carries a size s (patches it stands for) and a centroid p (mean patch
position). With the one-hot assignment M[j, i] = 1 if source i is merged into destination j,

    s_j' = s_j + sum_i M[j, i] s_i
    x_j' = (s_j x_j + sum_i M[j, i] s_i x_i) / s_j'        (the same for p)
    S_j' = S_j + sum_i M[j, i] S_i                          (semantic mass is additive)

i.e. merged = (M @ (s * x)) / (M @ s) with B's own identity rows included. Attention afterwards is
proportional: softmax(q k^T / sqrt(d) + log s), so a merged token keeps the attention weight of the patches
it replaced.

What the summary head needs rides along (``Tokens.feat``, ``Tokens.src``, both optional): ``feat``, an earlier
block's features of the same tokens, is size-averaged like x and p; ``src`` [N, G], how many of each footprint
cell's original patches a token stands for, is additive like s (src_j' = src_j + sum_i M[j, i] src_i), so after
any number of merges every patch is counted in exactly one token: the footprint follows the merges back to the
original patches.

Export. Everything is a gather, a TopK with a constant k (sorted), an Equal against a constant arange and
a dense matmul: no ScatterElements (whose reductions TensorRT < 10 cannot run), every shape static.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class Tokens(NamedTuple):
    """Patch tokens and what they carry through merging (prefix tokens excluded)."""

    x: Tensor  # [B, N, C] features
    size: Tensor  # [B, N] patches covered
    pos: Tensor  # [B, N, 2] centroid (x, y), normalized to [0, 1]
    sem: Tensor  # [B, N] semantic value (attention mass)
    feat: Optional[Tensor] = None  # [B, N, C'] an earlier block's features (the summary head's), size-averaged
    src: Optional[Tensor] = None  # [B, N, G] original patches per footprint cell, additive


def _gather_rows(t: Tensor, idx: Tensor) -> Tensor:
    """t[b, idx[b, i], ...] for a [B, N] or [B, N, C] tensor t and [B, M] indices."""
    if t.dim() == 2:
        return torch.gather(t, 1, idx)
    return torch.gather(t, 1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def merge_scores(metric: Tensor, sem: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """E = R - alpha * S for the tokens of A, and each one's best destination in B.

    metric: [B, N, Ck] keys averaged over heads; sem: [B, N]. Returns (E [B, Na], dst [B, Na]).
    """
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    a, b = m[:, ::2], m[:, 1::2]
    redundancy, dst = (a @ b.transpose(1, 2)).max(dim=-1)
    score = redundancy - alpha * sem[:, ::2] if alpha else redundancy
    return score, dst


def merge(tokens: Tokens, metric: Tensor, r: int, alpha: float) -> Tokens:
    """Merge r tokens of A into B by informativity (see module docstring). r = 0 returns the input."""
    n = tokens.x.shape[1]
    if r <= 0:
        return tokens
    n_a, n_b = (n + 1) // 2, n // 2
    if r > n_b:
        raise ValueError(f"cannot merge {r} of {n} tokens in one step (at most {n_b}, half of them)")

    score, dst = merge_scores(metric, tokens.sem, alpha)
    order = torch.topk(score, n_a, dim=-1, largest=True, sorted=True).indices  # [B, Na], constant k
    unm_idx = order[:, r:]  # kept tokens of A, in score order
    # is_src[b, i] = 1 when token i of A is among the r highest scores, via a one-hot sum (no scatter).
    ar_a = torch.arange(n_a, device=score.device)
    is_src = (order[:, :r].unsqueeze(-1) == ar_a).to(tokens.x.dtype).sum(dim=1)  # [B, Na]
    ar_b = torch.arange(n_b, device=score.device)
    assign = (dst.unsqueeze(1) == ar_b.view(1, n_b, 1)).to(tokens.x.dtype) * is_src.unsqueeze(1)  # M [B,Nb,Na]

    s_a, s_b = tokens.size[:, ::2], tokens.size[:, 1::2]
    size_b = s_b + (assign @ s_a.unsqueeze(-1)).squeeze(-1)
    w_a, w_b = s_a.unsqueeze(-1), s_b.unsqueeze(-1)

    def averaged(t: Tensor) -> Tensor:  # x, pos, feat: size-weighted means of the merged tokens
        return (w_b * t[:, 1::2] + assign @ (w_a * t[:, ::2])) / size_b.unsqueeze(-1)

    def additive(t: Tensor) -> Tensor:  # sem [B, N], src [B, N, G]: sums
        if t.dim() == 2:
            return t[:, 1::2] + (assign @ t[:, ::2].unsqueeze(-1)).squeeze(-1)
        return t[:, 1::2] + assign @ t[:, ::2]

    merged_b = {"x": averaged(tokens.x), "size": size_b, "pos": averaged(tokens.pos), "sem": additive(tokens.sem),
                "feat": None if tokens.feat is None else averaged(tokens.feat),
                "src": None if tokens.src is None else additive(tokens.src)}
    if r == n_a:  # all of A merged: no empty gathers in the graph (they trace to wrong static shapes)
        return Tokens(**merged_b)
    return Tokens(**{name: None if b is None else torch.cat([_gather_rows(getattr(tokens, name)[:, ::2], unm_idx), b],
                                                             dim=1)
                     for name, b in merged_b.items()})
