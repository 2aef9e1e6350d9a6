"""The exporter's slic summary head (exporter/summary_head.py) against its numpy specification
(benchmarks/summary_head_ref.py): tokens, footprints through merges, cells of patches, the fitted projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.summary_head_ref import patch_centres, summarize
from exporter.merge import Tokens, merge
from exporter.options import MergeConfig
from exporter.summary_head import SummaryHead, cell_map, fit_projection, rotation
from tests.support.tiny_vit import tiny_vit
from tokenline.summary import Layout, Summary
from tokenline.wire.common import as_decoded


def _textured(rng: np.random.Generator, grid=(16, 16), d=48) -> np.ndarray:
    """A background direction plus noise with a distinct 4x4 region (a defect)."""
    gh, gw = grid
    x = rng.normal(size=d) + 0.6 * rng.normal(size=(gh, gw, d))
    x[2:6, 9:13] = rng.normal(size=d) + 0.6 * rng.normal(size=(4, 4, d))
    return x.reshape(gh * gw, d).astype(np.float32)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _run(head: SummaryHead, x: np.ndarray, size: np.ndarray, pos: np.ndarray, src: np.ndarray):
    with torch.no_grad():
        out = head(*(torch.from_numpy(np.asarray(a, np.float32))[None] for a in (x, size, pos, src)))
    return [o[0].numpy() for o in out]


@pytest.mark.parametrize("dims", [48, 12])
def test_matches_the_reference_on_projected_features(dims: int) -> None:
    rng = np.random.default_rng(0)
    x = _textured(rng)
    calib = np.concatenate([_textured(rng) for _ in range(4)])
    mean, proj, explained = fit_projection(calib, np.ones(len(calib)), dims)
    head = SummaryHead(48, dims, 16, (16, 16))
    head.set_projection(mean, proj)
    tokens, fp, pm = _run(head, x, np.ones(256), patch_centres((16, 16)), np.eye(256))
    p = _unit((_unit(x) - mean) @ proj)  # step 1 of the specification
    ref = summarize(p, np.eye(256, dtype=np.float32), (16, 16), k=16, iters=3, lam=0.5)
    np.testing.assert_array_equal(fp.reshape(-1), ref.footprint)
    np.testing.assert_allclose(tokens, ref.tokens, atol=1e-5)
    np.testing.assert_allclose(pm, _unit(p.mean(0)), atol=1e-5)
    assert (explained == 1.0) == (dims == 48) and 0 < explained <= 1


def test_rotated_projection_keeps_cosines_and_quantizes_finer() -> None:
    """The fitted projection is the principal axes times a fixed rotation: the head's tokens have the same cosines
    as on the bare axes (nothing downstream sees R), while the wire's per-token int4 (and int8) rounding loses
    less, since the first axes no longer carry most of each token."""
    rng = np.random.default_rng(3)
    calib = np.concatenate([_textured(rng) for _ in range(4)])
    r = rotation(12)
    np.testing.assert_allclose(r @ r.T, np.eye(12), atol=1e-12)
    np.testing.assert_array_equal(r, rotation(12))  # seeded: every export of the same inputs bakes the same R
    mean, bare, _ = fit_projection(calib, np.ones(len(calib)), 12, rotation_seed=None)
    mean_r, rotated, _ = fit_projection(calib, np.ones(len(calib)), 12)
    np.testing.assert_array_equal(mean_r, mean)  # the rotation turns the axes only: the same centring mean
    np.testing.assert_allclose(rotated, bare @ r, atol=1e-5)
    x = _textured(rng)
    outs = []
    for proj in (bare, rotated):
        head = SummaryHead(48, 12, 16, (16, 16))
        head.set_projection(mean, proj)
        outs.append(_run(head, x, np.ones(256), patch_centres((16, 16)), np.eye(256)))
    (t0, fp0, _), (t1, fp1, _) = outs
    np.testing.assert_array_equal(fp0, fp1)
    np.testing.assert_allclose(t1 @ t1.T, t0 @ t0.T, atol=1e-5)
    # features whose variance falls off along their principal axes, as a ViT's do (NEU-DET: std 0.42 on the
    # first of 96 axes, 0.02 on the last)
    feats = (rng.normal(size=(2000, 128)) * 0.97 ** np.arange(128)) @ rotation(128, seed=7) + rng.normal(size=128)
    mean, bare, _ = fit_projection(feats, np.ones(len(feats)), 96, rotation_seed=None)
    _, rotated, _ = fit_projection(feats, np.ones(len(feats)), 96)
    tokens = np.stack([_unit((_unit(feats) - mean) @ p) for p in (bare, rotated)])

    def loss(t: np.ndarray, mode: str) -> float:
        back = _unit(as_decoded(t, mode))
        return float(np.mean(1.0 - (back * t).sum(-1)))

    for mode in ("int4", "int8"):
        assert loss(tokens[1], mode) < 0.6 * loss(tokens[0], mode), mode  # measured 0.46 (int4), 0.43 (int8)


def test_footprint_follows_merges_back_to_the_original_patches() -> None:
    """Tokens merged three times carry their block features and patch counts; the head on them equals the
    reference given the same merged tokens and their 0/1 source map."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(_textured(rng))[None]
    n = x.shape[1]
    t = Tokens(x, torch.ones(1, n), torch.from_numpy(patch_centres((16, 16)))[None], torch.zeros(1, n),
               feat=x.clone(), src=torch.eye(n)[None])
    for r in (64, 64, 32):
        t = merge(t, t.x, r, 0.0)
    src = t.src[0].numpy()
    np.testing.assert_array_equal(src.sum(0), np.ones(n))  # every patch in exactly one merged token
    np.testing.assert_allclose(src.sum(1), t.size[0].numpy())
    torch.testing.assert_close((t.feat * t.size[..., None]).sum(1), x.sum(1), rtol=1e-5, atol=1e-3)  # size-averaged
    head = SummaryHead(48, 48, 16, (16, 16))
    tokens, fp, _ = _run(head, t.feat[0].numpy(), t.size[0].numpy(), t.pos[0].numpy(), src)
    ref = summarize(t.feat[0].numpy(), src, (16, 16), k=16)
    np.testing.assert_array_equal(fp.reshape(-1), ref.footprint)
    np.testing.assert_allclose(tokens, ref.tokens, atol=1e-5)
    for row in src.astype(bool):  # all patches of a merged token share its summary token
        assert len(set(fp.reshape(-1)[row].tolist())) == 1


def test_cells_of_two_by_two_patches_take_their_majority_token() -> None:
    """At 448 px (32x32 patches) the footprint is 16x16 cells: each cell names the token that holds most of
    its four patches (the first on a tie), computed from counts carried per cell."""
    rng = np.random.default_rng(2)
    x = _textured(rng, grid=(32, 32))
    head = SummaryHead(48, 48, 16, (16, 16))
    cells = cell_map((32, 32), 2).numpy()
    _, fp, _ = _run(head, x, np.ones(1024), patch_centres((32, 32)), cells)
    ref = summarize(x, np.eye(1024, dtype=np.float32), (32, 32), k=16)  # patch level
    counts = cells.T @ np.eye(16)[ref.footprint]  # [cells, K]
    np.testing.assert_array_equal(fp.reshape(-1), counts.argmax(1))
    layout = Layout(k=16, dim=48, token_dim=48, grid=(16, 16))
    s = Summary.from_outputs([np.ones((1, 48)), np.ones((1, 16, 48)), fp[None], np.ones((1, 48))], "slic", layout, 1)
    assert s.sizes.sum() == 256 and set(np.flatnonzero(s.sizes[0])) == set(np.unique(fp))


def test_the_defect_gets_its_own_token() -> None:
    rng = np.random.default_rng(3)
    head = SummaryHead(48, 48, 16, (16, 16))
    _, fp, _ = _run(head, _textured(rng), np.ones(256), patch_centres((16, 16)), np.eye(256))
    fp = fp.reshape(16, 16)
    region = np.zeros((16, 16), bool)
    region[2:6, 9:13] = True
    for j in np.unique(fp[region]):
        assert region[fp == j].mean() >= 0.8  # tokens on the defect stand for (almost) nothing else


def test_vit_carries_block_features_and_cells_through_merges() -> None:
    """The tiny ViT (3 blocks, 6x6 patches) with merging in every block: the head gets the block-2 features
    (block 2 of 3 by default) and a footprint that covers every patch once; shapes never depend on the input."""
    vit = tiny_vit()
    vit.configure_merging(MergeConfig(r=6, alpha=5.0, k=4))
    assert vit.summary_layer == 2 and vit.footprint_grid == (6, 6) and vit.head.dim == 32
    shapes = set()
    for seed in range(3):
        with torch.no_grad():
            px = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(seed))
            _, patches = vit.forward_tokens(px)
            out = vit(px)
        assert patches.x.shape[1] == 36 - 18 and patches.feat.shape == patches.x.shape
        np.testing.assert_allclose(patches.src.sum(1).numpy(), 1.0)  # each patch (cell) counted once
        shapes.add(tuple(tuple(o.shape) for o in out))
    assert shapes == {((2, 32), (2, 4, 32), (2, 6, 6), (2, 32))}
    vit.configure_merging(MergeConfig(r=6, alpha=5.0, k=4, summary_layer=3, summary_dim=8))
    assert vit.summary_layer == 3 and vit.head.dim == 8
