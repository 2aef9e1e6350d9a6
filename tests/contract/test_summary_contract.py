"""The slic summary in the contract: manifests of both schemas (old ones keep their hash), the output table per
method, footprints on a grid of at most 16 x 16 cells."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tokenline import manifest as mf
from tokenline.manifest import Manifest, ManifestError
from tokenline.summary import Layout, Summary, SummaryError, footprint_grid, mask_box, output_shapes

FIXTURE = Path(__file__).parent / "fixtures" / "manifest_v1.json"  # written by the exporter before the slic head


def test_a_manifest_exported_before_reads_and_keeps_its_hash() -> None:
    text = FIXTURE.read_text()
    m = Manifest.from_json(text)
    assert m.schema_ == "tokenline.manifest/1" and m.summary.method == "informativity" and not m.has_footprint
    assert m.to_json() == text  # the canonical JSON, so the hash central registered it under, is unchanged
    assert m.hash() == hashlib.sha256(text.encode()).hexdigest()
    assert m.layout == Layout(k=16, dim=384, token_dim=384, grid=None)


def slic_manifest(**summary) -> dict:
    """A /2 manifest of the slic head (K=4, D=8 global, d=3 tokens, 2x3 footprint) as a JSON document."""
    spec = dict(k=4, dim=3, method="slic", layer=2, footprint_grid=(2, 3), iterations=3, spatial_weight=0.5,
                projection=mf.ProjectionSpec(method="pca", input_dim=8, dims=3, fitted_on="calibration", images=5,
                                             explained_variance=0.8))
    spec.update(summary)
    s = mf.SummarySpec(**spec)
    m = Manifest(
        name="m", family="timm_vit", source_checkpoint="c.pt", source_sha256="0" * 64, exporter_version="0.1.0",
        created_at="2026-12-01T00:00:00+00:00", opset=17, precision="fp32", batch_sizes=[1],
        input=mf.InputSpec(height=32, width=48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize="resize"),
        encoder=mf.EncoderSpec(embed_dim=8, depth=2, num_heads=2, patch_size=16, grid=(2, 3), num_prefix_tokens=1,
                               has_cls=True),
        merge=mf.MergeSpec(method="none", r_per_block=[0, 0], tokens_per_block=[7, 7], final_tokens=7),
        summary=s, outputs=mf.output_specs("slic", Layout(4, 8, 3, (2, 3)), 1), embedding_dim=8,
        files=[mf.FileSpec(path="enc.onnx", sha256="1" * 64, role="encoder", batch=1)],
    )
    return json.loads(m.to_json())


def test_slic_manifest_round_trips_with_its_outputs() -> None:
    d = slic_manifest()
    assert "rotation_seed" not in d["summary"]["projection"]  # absent while None: earlier /2 manifests keep their hash
    rotated = slic_manifest(projection=mf.ProjectionSpec(method="pca", input_dim=8, dims=3, fitted_on="calibration",
                                                         images=5, explained_variance=0.8, rotation_seed=0))
    assert Manifest.from_json(json.dumps(rotated)).summary.projection.rotation_seed == 0
    m = Manifest.from_json(json.dumps(d))
    assert m.schema_ == mf.SCHEMA and m.has_footprint and m.layout == Layout(4, 8, 3, (2, 3))
    assert [(o.name, o.shape, o.dtype) for o in m.outputs] == [
        ("global_embedding", (1, 8), "float32"), ("summary_tokens", (1, 4, 3), "float32"),
        ("summary_footprint", (1, 2, 3), "int32"), ("patch_mean", (1, 3), "float32")]
    assert Manifest.from_json(m.to_json()) == m


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.update(schema="tokenline.manifest/1"), "needs tokenline.manifest/2"),
    (lambda d: d["summary"].pop("layer"), "needs layer"),
    (lambda d: d["summary"].update(layer=3), "beyond the encoder's 2 blocks"),
    (lambda d: d["summary"].update(footprint_grid=[17, 16]), "footprint_grid must have 1..256 cells"),
    (lambda d: d["summary"]["projection"].update(dims=4), "projection.dims 4 differs"),
    (lambda d: d["summary"]["projection"].update(input_dim=16), "16-dimensional, the encoder is 8 wide"),
    (lambda d: d["outputs"][2].update(dtype="float32"), "summary_footprint must be"),
    (lambda d: d["outputs"].pop(), "outputs must be named"),
    (lambda d: d["summary"].update(method="informativity"), "only for the slic summary method"),
])
def test_slic_manifests_are_checked(mutate, msg: str) -> None:
    d = slic_manifest()
    mutate(d)
    with pytest.raises(ManifestError, match=msg):
        Manifest.from_json(json.dumps(d))


def test_footprint_grid_has_at_most_256_cells() -> None:
    assert footprint_grid((16, 16)) == ((16, 16), 1)  # 224 px, patch 14
    assert footprint_grid((32, 32)) == ((16, 16), 2)  # 448 px: cells of 2 x 2 patches
    assert footprint_grid((24, 24)) == ((12, 12), 2)
    assert footprint_grid((37, 37)) == ((1, 1), 37)  # a prime side: one cell (still a valid partition)


def _slic_raw(b: int, layout: Layout, rng: np.random.Generator):
    gh, gw = layout.grid
    return [rng.normal(size=(b, layout.dim)), rng.normal(size=(b, layout.k, layout.token_dim)),
            rng.integers(0, layout.k, size=(b, gh, gw)).astype(np.int32), rng.normal(size=(b, layout.token_dim))]


def test_slic_outputs_make_a_summary_whose_sizes_and_centroids_follow_the_footprint() -> None:
    layout = Layout(k=4, dim=8, token_dim=3, grid=(2, 3))
    assert output_shapes("slic", layout, 2) == [("global_embedding", (2, 8)), ("summary_tokens", (2, 4, 3)),
                                               ("summary_footprint", (2, 2, 3)), ("patch_mean", (2, 3))]
    raw = _slic_raw(2, layout, np.random.default_rng(0))
    raw[2][1] = [[0, 0, 1], [0, 3, 1]]
    s = Summary.from_outputs(raw, "slic", layout, 2)
    assert s.footprint.dtype == np.uint8 and s.token_dim == 3 and s.dim == 8 and s.patch_mean.shape == (2, 3)
    one = s[1]
    np.testing.assert_array_equal(one.sizes, [3, 2, 0, 1])
    np.testing.assert_allclose(one.centroids[0], [(0.5 + 0.5 + 1.5) / 3 / 3, (0.5 + 0.5 + 1.5) / 3 / 2])
    np.testing.assert_allclose(one.centroids[2], [0.5, 0.5])  # a token that stands for no cell
    both = Summary.concat([s, s], 3)
    assert both.footprint.shape == (3, 2, 3) and both.patch_mean.shape == (3, 3)
    assert mask_box(one.footprint == 1) == (2 / 3, 0.0, 1.0, 1.0) and mask_box(one.footprint == 2) is None


@pytest.mark.parametrize("bad,msg", [("range", "outside 0..3"), ("float", "is float"), ("shape", "summary_footprint")])
def test_bad_footprints_are_named(bad: str, msg: str) -> None:
    layout = Layout(k=4, dim=8, token_dim=3, grid=(2, 3))
    raw = _slic_raw(1, layout, np.random.default_rng(1))
    if bad == "range":
        raw[2][0, 0, 0] = 4
    elif bad == "float":
        raw[2] = raw[2].astype(np.float32)
    else:
        raw[2] = raw[2][:, :1]
    with pytest.raises(SummaryError, match=msg):
        Summary.from_outputs(raw, "slic", layout, 1)
