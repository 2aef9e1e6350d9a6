"""The ELPV all-cells study's draws and scores (benchmarks/bench_elpv_cells.py): a draw's held-out normal cells are
never in its bank, banks of different sizes are nested, a cell that is its own bank neighbour scores 0, and the
label-free rank agreement is Spearman's correlation."""

from __future__ import annotations

import numpy as np

from benchmarks.bench_elpv_cells import EVAL_NORMAL, Cells, cell_scores, draws, rank_agreement
from benchmarks.bench_summary import Variant, patch_rep


def _cells(normal: int = 400, defective: int = 60) -> Cells:
    probs = np.r_[np.zeros(normal), np.ones(defective)][np.random.default_rng(3).permutation(normal + defective)]
    return Cells("mono", probs, {}, np.flatnonzero(probs > 0)[:10])


def test_draws_hold_normal_cells_out_of_every_bank_and_nest_the_banks() -> None:
    cells = _cells()
    ds = draws(cells, 3)
    assert len({tuple(ev) for ev, _ in ds}) == 3  # the draws differ
    for ev, pool in ds:
        assert len(ev) == EVAL_NORMAL and len(ev) + len(pool) == len(cells.normals)
        assert not set(ev) & set(pool)  # a bank of any size leaves the scored normal cells out
        assert set(ev) | set(pool) == set(cells.normals)
        assert (cells.probs[pool] == 0).all()
        assert list(pool[:50]) == list(pool[:100][:50])  # the bank of 50 is inside the bank of 100
    assert [list(p) for _, p in draws(cells, 3)] == [list(p) for _, p in ds]  # seeded


def test_cell_scores_are_zero_for_a_bank_cell_and_grow_with_distance() -> None:
    rng = np.random.default_rng(0)
    tok = rng.standard_normal((60, 8, 16)).astype(np.float32)
    tok /= np.linalg.norm(tok, axis=-1, keepdims=True)
    rep = patch_rep(tok)
    bank = np.arange(40)
    s = cell_scores(rep, Variant("b", "patches", "fp32"), bank, np.array([0, 1, 50]))
    assert s[0] < 1e-2 and s[1] < 1e-2  # bank cells: every token has itself in the bank (float32 rounding)
    assert s[2] > 1.0  # a cell the bank never saw: whitened distances of order sqrt(d)


def test_rank_agreement_is_spearmans_correlation() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal(200)
    assert rank_agreement(a, np.exp(3 * a)) == 1.0  # any increasing transform: the same order
    assert abs(rank_agreement(a, -a) + 1.0) < 1e-12
    b = a + rng.standard_normal(200)  # against Spearman's formula (no ties): 1 - 6 sum d^2 / (n (n^2 - 1))
    d = np.argsort(np.argsort(a)) - np.argsort(np.argsort(b))
    assert abs(rank_agreement(a, b) - (1 - 6 * (d**2).sum() / (200 * (200**2 - 1)))) < 1e-12
