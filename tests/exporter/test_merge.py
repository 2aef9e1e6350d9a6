"""Merge maths: sizes are conserved, r = 0 is the identity, alpha = 0 is plain bipartite matching, Turbo's
semantic term protects salient tokens, and the schedule/summary arithmetic holds."""

from __future__ import annotations

import pytest
import torch

from exporter.merge import Tokens, merge, merge_scores
from exporter.schedule import ScheduleError, make_schedule


def _tokens(b: int = 2, n: int = 20, c: int = 8, seed: int = 0) -> tuple[Tokens, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g)
    size = torch.randint(1, 5, (b, n), generator=g).float()
    pos = torch.rand(b, n, 2, generator=g)
    sem = torch.softmax(torch.randn(b, n, generator=g), dim=-1)
    metric = torch.randn(b, n, c, generator=g)
    return Tokens(x, size, pos, sem), metric


def reference_bipartite(t: Tokens, metric: torch.Tensor, r: int) -> Tokens:
    """Plain bipartite soft matching written independently with loops and scatter-add (ToMe's definition)."""
    b, n, c = t.x.shape
    out = []
    for i in range(b):
        a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
        m = torch.nn.functional.normalize(metric[i], dim=-1)
        sim = m[a_idx] @ m[b_idx].T
        best, dst = sim.max(dim=-1)
        order = torch.argsort(best, descending=True, stable=True)
        src = order[:r].tolist()
        keep = order[r:].tolist()
        wsum = t.x[i][b_idx] * t.size[i][b_idx, None]
        psum = t.pos[i][b_idx] * t.size[i][b_idx, None]
        ssum = t.size[i][b_idx].clone()
        msum = t.sem[i][b_idx].clone()
        for s in src:
            j, ai = int(dst[s]), a_idx[s]
            wsum[j] += t.x[i][ai] * t.size[i][ai]
            psum[j] += t.pos[i][ai] * t.size[i][ai]
            ssum[j] += t.size[i][ai]
            msum[j] += t.sem[i][ai]
        ka = [a_idx[k] for k in keep]
        out.append(Tokens(
            torch.cat([t.x[i][ka], wsum / ssum[:, None]]), torch.cat([t.size[i][ka], ssum]),
            torch.cat([t.pos[i][ka], psum / ssum[:, None]]), torch.cat([t.sem[i][ka], msum]),
        ))
    return Tokens(*(torch.stack([o[j] for o in out]) for j in range(4)))


@pytest.mark.parametrize("n,r", [(20, 1), (20, 7), (20, 10), (21, 10), (9, 4)])
def test_sizes_sum_to_patch_count_and_shapes_shrink_by_r(n: int, r: int) -> None:
    t, metric = _tokens(n=n)
    out = merge(t, metric, r, alpha=5.0)
    assert out.x.shape == (2, n - r, 8)
    torch.testing.assert_close(out.size.sum(-1), t.size.sum(-1))
    torch.testing.assert_close(out.sem.sum(-1), t.sem.sum(-1))  # attention mass is conserved too
    # size-weighted means are conserved: sum(size * x) is invariant under merging
    torch.testing.assert_close((out.x * out.size[..., None]).sum(1), (t.x * t.size[..., None]).sum(1),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close((out.pos * out.size[..., None]).sum(1), (t.pos * t.size[..., None]).sum(1),
                               rtol=1e-5, atol=1e-5)


def test_r_zero_is_identity() -> None:
    t, metric = _tokens()
    out = merge(t, metric, 0, alpha=5.0)
    assert out is t


def test_alpha_zero_equals_plain_bipartite_matching() -> None:
    t, metric = _tokens(n=24, seed=3)
    got = merge(t, metric, 9, alpha=0.0)
    want = reference_bipartite(t, metric, 9)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_semantic_value_protects_salient_tokens() -> None:
    """A token of A that would be merged first by redundancy is kept once its [CLS] attention is high."""
    t, _ = _tokens(b=1, n=10, seed=1)
    metric = torch.randn(1, 10, 8, generator=torch.Generator().manual_seed(5))
    metric[0, 0] = metric[0, 1]  # token 0 (in A) duplicates token 1 (in B): maximal redundancy
    score, _ = merge_scores(metric, t.sem, alpha=0.0)
    assert int(score.argmax()) == 0
    sem = torch.full((1, 10), 0.01)
    sem[0, 0] = 0.9  # but the [CLS] query attends to it
    salient = Tokens(t.x, t.size, t.pos, sem)
    out_tome = merge(Tokens(t.x, t.size, t.pos, sem), metric, 1, alpha=0.0)
    out_turbo = merge(salient, metric, 1, alpha=5.0)
    kept = lambda o: any(torch.allclose(row, t.x[0, 0]) for row in o.x[0])  # noqa: E731
    assert not kept(out_tome)  # ToMe merges the redundant token away
    assert kept(out_turbo)  # Turbo keeps it


def test_merge_rejects_more_than_half() -> None:
    t, metric = _tokens(n=10)
    with pytest.raises(ValueError, match="at most 5"):
        merge(t, metric, 6, alpha=0.0)


def test_schedules_constant_list_target_and_floor() -> None:
    s = make_schedule(196, 12, r=13, floor=16)
    assert s.r_per_block == [13] * 12 and s.final_patches == 196 - 156
    s = make_schedule(196, 12, r=40, floor=16)  # clipped at half, then at the floor
    assert s.r_per_block[0] == 40 and s.final_patches == 16 and min(s.patches_per_block) >= 16
    assert all(r <= n // 2 for r, n in zip(s.r_per_block, s.patches_per_block))
    s = make_schedule(196, 4, r_list=[0, 10, 0, 5], floor=1)
    assert s.r_per_block == [0, 10, 0, 5] and s.final_patches == 181
    s = make_schedule(196, 12, target=64, floor=16)
    assert s.final_patches == 64 and s.total_merged == 132
    assert make_schedule(196, 12).r_per_block == [0] * 12
    with pytest.raises(ScheduleError, match="12 blocks"):
        make_schedule(196, 12, r_list=[1, 2])
    with pytest.raises(ScheduleError, match="only one"):
        make_schedule(196, 12, r=1, target=50)
    with pytest.raises(ScheduleError, match="target"):
        make_schedule(196, 12, target=8, floor=16)
