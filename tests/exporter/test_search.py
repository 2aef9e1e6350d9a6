"""Schedule search: the grid, the label-free fidelity, the choice within a budget, and the search on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.search import (
    FAMILIES,
    KAPPA,
    KAPPA_SUMMARY,
    Candidate,
    Fidelity,
    Point,
    SearchError,
    candidates,
    chamfer,
    choose,
    fidelity,
    fits,
    pareto,
    search,
)
from tests.support.tiny_vit import tiny_vit


def _clusters(n_per: int = 20, n_clusters: int = 6, dim: int = 32, spread: float = 0.35, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    labels = np.repeat(np.arange(n_clusters), n_per)
    return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels, rng


def test_grid_is_deterministic_and_each_candidate_reaches_its_speedup() -> None:
    cfg = tiny_vit().cfg
    grid = candidates(cfg, floor=4)
    assert grid == candidates(cfg, floor=4)
    assert {c.family for c in grid} == set(FAMILIES)
    keys = [(c.pre_r, c.r_per_block, c.alpha) for c in grid]
    assert len(keys) == len(set(keys))  # no schedule twice
    for c in grid:
        assert c.speedup >= c.level
        assert c.final_patches >= 4 and len(c.r_per_block) == cfg.depth
    for fam in ("constant", "early"):  # within a shape, a higher level merges more
        costs = [c.gflops for c in grid if c.family == fam]
        assert costs == sorted(costs, reverse=True)
    two = candidates(cfg, floor=4, alphas=(0.0, 5.0), families=("constant",))
    assert {c.alpha for c in two} == {0.0, 5.0}


def test_fidelity_is_zero_for_the_reference_and_grows_with_distortion() -> None:
    ref, _, rng = _clusters()
    same = fidelity(ref, ref.copy())
    assert same.p10_loss == pytest.approx(0.0) and same.nn_agreement == 1.0 and same.cosine_min == pytest.approx(1.0)
    losses = [fidelity(ref, ref + s * rng.normal(size=ref.shape)).p10_loss for s in (0.1, 0.5, 2.0)]
    assert 0.0 <= losses[0] < losses[1] < losses[2]


def test_loss_is_kappa_times_the_share_of_changed_neighbours() -> None:
    ref, _, rng = _clusters()
    emb = ref + 0.3 * rng.normal(size=ref.shape)

    def top10(e: np.ndarray) -> list:  # written independently: full sort, sets
        u = e / np.linalg.norm(e, axis=1, keepdims=True)
        sim = u @ u.T
        return [set(sorted(set(range(len(e))) - {i}, key=lambda j: -sim[i, j])[:10]) for i in range(len(e))]

    kept = np.mean([len(a & b) / 10 for a, b in zip(top10(ref), top10(emb))])
    f = fidelity(ref, emb)
    assert f.nn_agreement == pytest.approx(kept) and 0.0 < kept < 1.0
    assert f.p10_loss == pytest.approx(KAPPA * 100 * (1 - kept)) and f.images == len(ref)
    cos = (ref * emb).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(emb, axis=1)
    assert f.cosine_mean == pytest.approx(cos.mean()) and f.cosine_min == pytest.approx(cos.min())
    with pytest.raises(SearchError, match="shape"):
        fidelity(ref, emb[:-1])


def _point(name: str, gflops: float, loss: float) -> Point:
    c = Candidate(family=name, level=1.0, alpha=5.0, pre_r=0, r_per_block=(1,), gflops=gflops, speedup=10 / gflops,
                  final_patches=1)
    return Point(c, Fidelity(p10_loss=loss, nn_agreement=1.0, cosine_mean=1.0, cosine_min=1.0, images=100))


def test_choose_takes_the_cheapest_within_budget_and_pareto_drops_dominated_points() -> None:
    pts = [_point("a", 8.0, 0.2), _point("b", 6.0, 0.9), _point("c", 5.0, 1.4), _point("d", 7.0, 1.0),
           _point("e", 4.0, 3.0)]
    assert choose(pts, 1.0).candidate.family == "b"
    assert choose(pts, 1.5).candidate.family == "c"
    assert choose(pts, 0.1) is None
    assert choose(list(reversed(pts)), 1.0) == choose(pts, 1.0)  # order does not matter
    assert [p.candidate.family for p in pareto(pts)] == ["e", "c", "b", "a"]  # d: costlier and worse than b


def _fake_embed(ref: np.ndarray):
    """Embeddings that degrade with a candidate's speed-up (deterministic per candidate)."""
    def embed(c: Candidate) -> np.ndarray:
        rng = np.random.default_rng(abs(hash((c.pre_r, c.r_per_block))) % 2**32)
        return ref + (c.speedup - 1.0) ** 2 * 2.0 * rng.normal(size=ref.shape)
    return embed


def test_search_respects_the_budget_and_stops_each_shape_at_its_first_miss() -> None:
    ref, _, _ = _clusters(n_per=12)
    grid = candidates(tiny_vit().cfg, floor=4)
    res = search(grid, _fake_embed(ref), ref, budget=0.4)
    assert res.chosen is not None and res.chosen.fidelity.loss <= 0.4
    assert res.chosen == choose(res.points, 0.4)
    for fam in {c.family for c in grid}:
        seen = [p for p in res.points if p.candidate.family == fam]
        over = [i for i, p in enumerate(seen) if p.fidelity.loss > 0.4]
        assert not over or over[0] == len(seen) - 1  # nothing evaluated after the first miss
    assert len(res.points) < len(grid)
    loose = search(grid, _fake_embed(ref), ref, budget=50.0)
    assert len(loose.points) == len(grid) and loose.chosen.candidate.gflops == min(c.gflops for c in grid)
    assert loose.chosen.candidate.gflops < res.chosen.candidate.gflops


def _tokens(ref: np.ndarray, k: int = 4, seed: int = 1) -> np.ndarray:
    """[F, k, D] summary-like token sets around each image's embedding."""
    rng = np.random.default_rng(seed)
    return ref[:, None, :] + 0.5 * rng.normal(size=(ref.shape[0], k, ref.shape[1]))


def test_chamfer_is_the_mean_best_cosine_both_ways_and_ignores_token_order() -> None:
    t = np.random.default_rng(0).normal(size=(5, 3, 8))
    sim = chamfer(t)
    u = t / np.linalg.norm(t, axis=-1, keepdims=True)
    for i in range(5):
        for j in range(5):
            one = np.mean([max(u[i, a] @ u[j, b] for b in range(3)) for a in range(3)])
            other = np.mean([max(u[j, b] @ u[i, a] for a in range(3)) for b in range(3)])
            assert sim[i, j] == pytest.approx((one + other) / 2)
    shuffled = t[:, ::-1]  # the same sets in another order
    assert np.allclose(chamfer(shuffled), sim)


def test_summary_loss_is_kappa_times_the_changed_chamfer_neighbours() -> None:
    ref, _, rng = _clusters(n_per=12)
    toks = _tokens(ref)
    same = fidelity(ref, ref, ref_tokens=toks, tokens=toks[:, ::-1].copy())
    assert same.summary_loss == 0.0 and same.summary_agreement == 1.0 and same.p10_loss == 0.0
    moved = toks + 1.5 * rng.normal(size=toks.shape)
    f = fidelity(ref, ref, ref_tokens=toks, tokens=moved)
    assert f.p10_loss == 0.0 and 0.0 < f.summary_agreement < 1.0  # the global embedding did not move, the summary did
    assert f.summary_loss == pytest.approx(KAPPA_SUMMARY * 100 * (1 - f.summary_agreement))
    worse = fidelity(ref, ref, ref_tokens=toks, tokens=toks + 4.0 * rng.normal(size=toks.shape))
    assert worse.summary_loss > f.summary_loss
    assert fidelity(ref, ref).summary_loss is None  # measured only when asked
    assert not fits(fidelity(ref, ref), 1.0, summary_budget=5.0)  # a summary budget needs a measured summary
    with pytest.raises(SearchError, match="summary tokens differ"):
        fidelity(ref, ref, ref_tokens=toks, tokens=toks[:, :2])


def test_search_with_a_summary_budget_chooses_within_both_budgets() -> None:
    ref, _, _ = _clusters(n_per=12)
    toks = _tokens(ref)
    grid = candidates(tiny_vit().cfg, floor=4)
    glob = _fake_embed(ref)

    def embed(c: Candidate):  # the global embedding barely moves, the summary moves with the speed-up
        rng = np.random.default_rng(abs(hash((c.pre_r, c.r_per_block, 1))) % 2**32)
        return ref + 1e-6 * (glob(c) - ref), toks + (c.speedup - 1.0) * 3.0 * rng.normal(size=toks.shape)

    global_only = search(grid, lambda c: embed(c)[0], ref, budget=1.0)
    assert global_only.chosen.candidate.gflops == min(c.gflops for c in grid)  # nothing stops it
    res = search(grid, embed, ref, budget=1.0, summary_budget=20.0, ref_tokens=toks)
    assert res.summary_budget == 20.0 and all(p.fidelity.summary_loss is not None for p in res.points)
    assert res.chosen is not None and res.chosen.fidelity.summary_loss <= 20.0
    assert res.chosen == choose(res.points, 1.0, summary_budget=20.0)
    assert res.chosen.candidate.gflops > global_only.chosen.candidate.gflops
    for fam in {c.family for c in grid}:
        seen = [p for p in res.points if p.candidate.family == fam]
        over = [i for i, p in enumerate(seen) if p.fidelity.summary_loss > 20.0]
        assert not over or over[0] == len(seen) - 1  # each shape stops at its first summary miss
    assert search(grid, embed, ref, budget=1.0, summary_budget=0.0, ref_tokens=toks).chosen is None
    with pytest.raises(SearchError, match="summary budget"):
        search(grid, embed, ref, budget=1.0, summary_budget=5.0)  # without the unmerged summaries


def test_search_refuses_too_few_images_and_a_negative_budget() -> None:
    ref, _, _ = _clusters(n_per=5)
    grid = candidates(tiny_vit().cfg, floor=4)
    with pytest.raises(SearchError, match="at least 50"):
        search(grid, _fake_embed(ref), ref, budget=1.0)
    ref, _, _ = _clusters(n_per=10)
    with pytest.raises(SearchError, match="budget"):
        search(grid, _fake_embed(ref), ref, budget=-1.0)


def test_search_on_a_tiny_model_is_deterministic_and_within_budget() -> None:
    """The real forward pass of every candidate on 60 smooth random images, searched twice."""
    from exporter.options import MergeConfig

    vit = tiny_vit(seed=1)
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.interpolate(torch.rand(60, 3, 6, 6, generator=g), size=(48, 48), mode="bilinear")

    def embed(c: Candidate) -> np.ndarray:
        vit.configure_merging(MergeConfig(r_list=list(c.r_per_block), pre_r=c.pre_r, alpha=c.alpha, k=4))
        with torch.inference_mode():
            return vit(images)[0].numpy()

    vit.configure_merging(MergeConfig(k=4))
    with torch.inference_mode():
        ref = vit(images)[0].numpy()
    grid = candidates(vit.cfg, floor=4)
    first, second = search(grid, embed, ref, budget=3.0), search(grid, embed, ref, budget=3.0)
    assert first == second
    assert first.chosen is not None and first.chosen.fidelity.loss <= 3.0
    assert all(p.fidelity.images == 60 for p in first.points)
