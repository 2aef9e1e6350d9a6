"""The reference summary head (benchmarks/summary_head_ref.py): footprints, sizes, static shapes, merged sources."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.summary_head_ref import pack_footprint, patch_centres, summarize, unpack_footprint


def _textured(rng: np.random.Generator, grid=(16, 16), d=64, block=(slice(2, 6), slice(9, 13))) -> np.ndarray:
    """Tokens of a common background direction plus noise, with a distinct region at ``block``."""
    gh, gw = grid
    bg, odd = rng.normal(size=d), rng.normal(size=d)
    x = bg + 0.6 * rng.normal(size=(gh, gw, d))
    x[block] = odd + 0.6 * rng.normal(size=x[block].shape)
    return x.reshape(gh * gw, d).astype(np.float32)


@pytest.mark.parametrize("k_protect", [0, 2, 4])
def test_footprints_partition_patches_and_define_sizes_and_centroids(k_protect: int) -> None:
    rng = np.random.default_rng(0)
    x = _textured(rng)
    out = summarize(x, np.eye(256, dtype=np.float32), (16, 16), k=16, k_protect=k_protect)
    assert out.tokens.shape == (16, 64) and out.sizes.shape == (16,) and out.centroids.shape == (16, 2)
    assert out.footprint.shape == (256,) and out.footprint.dtype == np.uint8 and out.footprint.max() < 16
    np.testing.assert_array_equal(np.bincount(out.footprint, minlength=16), out.sizes)
    pp = patch_centres((16, 16))
    for j in np.flatnonzero(out.sizes):
        np.testing.assert_allclose(out.centroids[j], pp[out.footprint == j].mean(0), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out.tokens, axis=1), 1.0, atol=1e-5)


def test_distinct_region_is_not_averaged_into_the_background() -> None:
    rng = np.random.default_rng(1)
    x = _textured(rng)
    region = np.zeros((16, 16), bool)
    region[2:6, 9:13] = True
    for k_protect in (0, 2):
        labels = summarize(x, np.eye(256, dtype=np.float32), (16, 16), k_protect=k_protect).footprint.reshape(16, 16)
        for j in np.unique(labels[region]):  # every token holding region patches is (almost) all region
            assert region[labels == j].mean() >= 0.8, (k_protect, j)
    # with a protected seed the whole region is one token that does not spread over the frame
    labels = summarize(x, np.eye(256, dtype=np.float32), (16, 16), k_protect=2).footprint.reshape(16, 16)
    inside = np.bincount(labels[region], minlength=16)
    assert inside.max() == region.sum() and (labels == inside.argmax()).sum() <= 2 * region.sum()


def test_shapes_are_static_whatever_the_content() -> None:
    rng = np.random.default_rng(2)
    shapes = set()
    for x in (np.ones((256, 32), np.float32), rng.normal(size=(256, 32)).astype(np.float32), _textured(rng, d=32)):
        out = summarize(x, np.eye(256, dtype=np.float32), (16, 16), k=16, k_protect=4)
        shapes.add(tuple(a.shape for a in out))
    assert shapes == {((16, 32), (16,), (16, 2), (256,))}


def test_footprint_follows_merges_back_to_the_original_patches() -> None:
    torch = pytest.importorskip("torch")
    from exporter.merge import Tokens, merge

    rng = np.random.default_rng(3)
    x = torch.from_numpy(_textured(rng))[None]
    n = x.shape[1]
    # the source map rides through the merges where a centroid would (src / size, size-averaged)
    t = Tokens(x, torch.ones(1, n), torch.eye(n)[None], torch.zeros(1, n))
    for r in (64, 64, 32):
        t = merge(t, t.x, r, 0.0)
    src = (t.pos * t.size[..., None])[0].numpy()
    np.testing.assert_allclose(src, np.round(src), atol=1e-4)
    np.testing.assert_array_equal(src.sum(0), np.ones(n))  # every patch in exactly one merged token
    np.testing.assert_allclose(src.sum(1), t.size[0].numpy(), atol=1e-4)
    out = summarize(t.x[0].numpy(), np.round(src), (16, 16), k=16)
    np.testing.assert_array_equal(np.bincount(out.footprint, minlength=16), out.sizes)
    for row in np.round(src).astype(bool):  # all patches of one merged token share its summary token
        assert len(set(out.footprint[row].tolist())) == 1


def test_packed_footprint_is_4_bits_per_patch() -> None:
    fp = np.random.default_rng(4).integers(0, 16, 256).astype(np.uint8)
    buf = pack_footprint(fp)
    assert len(buf) == 128
    np.testing.assert_array_equal(unpack_footprint(buf, 256), fp)
    with pytest.raises(ValueError):
        pack_footprint(np.array([16], np.uint8))


def test_bad_arguments_are_refused() -> None:
    x = np.ones((256, 8), np.float32)
    with pytest.raises(ValueError, match="src"):
        summarize(x, np.eye(255, dtype=np.float32), (16, 16))
    with pytest.raises(ValueError, match="k_protect"):
        summarize(x, np.eye(256, dtype=np.float32), (16, 16), k=4, k_protect=4)
