"""Export pipeline on tiny random ViTs: ONNX Runtime round trip, static shapes, no scatter, manifest, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporter.errors import ExportError
from exporter.export import export_encoder
from exporter.options import ExportOptions, MergeConfig
from exporter.summary_head import ROTATION_SEED
from exporter.vit import ViT
from tests.support.tiny_vit import tiny_vit
from tokenline import manifest as mf
from tokenline.summary import Summary, output_names


def _export(vit: ViT, out: Path, merge: MergeConfig, **opts) -> "mf.Manifest":
    opts.setdefault("bench_runs", 2)
    o = ExportOptions(out_dir=out, name="tiny", calib_count=4, **opts)
    return export_encoder(vit, merge, o, family="timm_vit", source_path="tiny.safetensors", source_sha256="a" * 64)


@pytest.mark.parametrize("merge", [MergeConfig(k=4), MergeConfig(r=6, alpha=5.0, k=4), MergeConfig(r=6, alpha=0.0, k=4),
                                   MergeConfig(pre_r=9, r=4, alpha=5.0, k=4)],
                         ids=["unmerged", "turbo", "tome", "pre-merge"])
def test_round_trip_fixed_batch_static_and_scatter_free(tmp_path: Path, merge: MergeConfig) -> None:
    import onnxruntime as ort

    vit = tiny_vit(num_registers=1)
    res = _export(vit, tmp_path, merge, batch_sizes=[2])
    man = mf.Manifest.from_file(tmp_path)
    assert man == res.manifest
    mf.verify_files(man, tmp_path)
    # merged graphs are also measured against torch itself (near-ties); unmerged ones keep the /1 JSON
    assert (man.validation.images_torch_matches_itself is None) == (merge.method == "none")
    enc = man.file("encoder", batch=2)
    model = onnx.load(str(tmp_path / enc.path))
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"ScatterElements", "ScatterND", "Scatter", "LayerNormalization"}
    # every value in the graph has a fully static shape
    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), f"{vi.name} has a dynamic dimension"
    # ONNX Runtime agrees with torch
    x = torch.randn(2, 3, 48, 48)
    sess = ort.InferenceSession(str(tmp_path / enc.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixels": x.numpy()})
    with torch.no_grad():
        want = [t.numpy() for t in vit(x)]
    assert [o.name for o in sess.get_outputs()] == list(output_names("slic"))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
    g, s, fp, pm = got
    # d = 32 (the width: centred only), the footprint on the 6x6 patch grid, every cell a token's
    assert g.shape == (2, 32) and s.shape == (2, 4, 32) and fp.shape == (2, 6, 6) and pm.shape == (2, 32)
    assert fp.dtype == np.int32 and fp.min() >= 0 and fp.max() < 4
    summary = Summary.from_outputs(got, "slic", man.layout, 2)
    np.testing.assert_allclose(summary.sizes.sum(-1), 36.0)  # 6x6 cells, each in exactly one token
    np.testing.assert_allclose(np.linalg.norm(g, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(s, axis=-1), 1.0, rtol=1e-5)
    assert man.summary.method == "slic" and man.summary.layer == 2 and man.summary.footprint_grid == (6, 6)
    assert man.summary.projection.fitted_on == "synthetic" and man.summary.projection.method == "centre"
    assert man.summary.projection.rotation_seed == ROTATION_SEED
    assert man.merge.method == ("none" if not merge.r else "turbo" if merge.alpha else "tome")
    assert man.merge.tokens_per_block[0] == 36 - merge.pre_r + 2  # [CLS] + 1 register never merged
    assert man.merge.pre_r == merge.pre_r
    if merge.pre_r:
        assert man.merge.tokens_per_block == [29, 25, 21] and man.merge.final_tokens == 17
    elif merge.r:
        assert man.merge.tokens_per_block == [38, 32, 26] and man.merge.final_tokens == 20
    if merge.r:
        assert man.file("encoder_unmerged").batch == 2
        assert 0.0 < res.table["cosine_vs_unmerged_min"] <= 1.0 + 1e-6
        assert res.table["gflops"] < res.table["gflops_unmerged"]


def test_dynamic_batch_and_fp16(tmp_path: Path) -> None:
    import onnxruntime as ort

    vit = tiny_vit(1)
    res = _export(vit, tmp_path, MergeConfig(r=4, alpha=5.0, k=4), batch_sizes=[], precision="fp16",
                  export_unmerged=False)
    man = res.manifest
    assert man.precision == "fp16" and man.batch_sizes == [] and man.outputs[0].shape == (-1, 32)
    sess = ort.InferenceSession(str(tmp_path / man.file("encoder").path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 48, 48)
    g, s, fp, pm = sess.run(None, {"pixels": x.numpy()})
    assert g.dtype == np.float32 and g.shape == (3, 32) and s.shape == (3, 4, 32)
    with torch.no_grad():
        ref = vit(x)[0].numpy()
    assert (g * ref).sum(-1).min() > 0.999  # fp16 keeps the global embedding
    model = onnx.load(str(tmp_path / man.file("encoder").path))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


def test_export_fails_over_tolerance(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="disagrees with torch"):
        _export(tiny_vit(), tmp_path, MergeConfig(k=4), batch_sizes=[1], precision="fp16", tolerance=0.0)


def _outputs(rng, n: int = 8, d: int = 32, k: int = 4, grid=(4, 4)) -> list:
    g = rng.standard_normal((n, d)).astype(np.float32)
    t = rng.standard_normal((n, k, d)).astype(np.float32)
    fp = rng.integers(0, k, (n, *grid)).astype(np.int32)
    pm = rng.standard_normal((n, d)).astype(np.float32)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return [unit(g), unit(t), fp, unit(pm)]


def test_validation_tells_near_ties_from_a_wrong_graph() -> None:
    """A merged graph whose every image took one merge decision the other way (global cosine 0.9998, one footprint
    cell of 16 moved, one token off) fails, and the error says why and what to do; a wrong graph (unrelated
    outputs) fails without that explanation."""
    from exporter.validate import compare

    rng = np.random.default_rng(0)
    ref = _outputs(rng)
    flipped = [ref[0] + 0.01 * _outputs(rng)[0], ref[1].copy(), ref[2].copy(), ref[3]]
    flipped[0] /= np.linalg.norm(flipped[0], axis=-1, keepdims=True)
    flipped[1][:, 0] = _outputs(rng)[1][:, 0]  # one token of each image stands for other cells
    flipped[2][:, 0, 0] = (flipped[2][:, 0, 0] + 1) % 4
    stats, problems = compare(ref, flipped, 1e-4, merged=True, precision="fp32")
    assert stats["matched_fraction"] == 0.0 and stats["global_cos_min"] > 0.999
    assert any("near-ties" in p for p in problems) and "merge fewer tokens" in problems[-1]
    assert compare(ref, ref, 1e-4, merged=True, precision="fp32")[1] == []
    _, wrong = compare(ref, _outputs(np.random.default_rng(1)), 1e-4, merged=True, precision="fp32")
    assert any("global embedding cosine" in p for p in wrong) and not any("near-ties" in p for p in wrong)
    _, unmerged = compare(ref, flipped, 1e-4, merged=False, precision="fp32")
    assert not any("near-ties" in p for p in unmerged)  # an unmerged graph has no decisions to blame


def _moved(ref: list, scale: float, rng, images=None) -> list:
    """``ref`` with the global embedding of ``images`` (default all) moved by ``scale`` and re-normalized, as a
    flipped merge decision moves it, and the first token and footprint cell of those images changed."""
    at = np.arange(len(ref[0])) if images is None else np.asarray(images)
    out = [ref[0].copy(), ref[1].copy(), ref[2].copy(), ref[3]]
    out[0][at] += scale * _outputs(rng)[0][at]
    out[0] /= np.linalg.norm(out[0], axis=-1, keepdims=True)
    out[1][at, 0] = _outputs(rng)[1][at, 0]
    out[2][at, 0, 0] = (out[2][at, 0, 0] + 1) % 4
    return out


def test_validation_measures_near_ties_against_torch_itself() -> None:
    """With hundreds of merges per image (448 px) torch itself flips near-ties when its input moves by one part in
    a million: a merged graph matching no image passes when torch matches itself on none either and the errors
    are of the same size; it fails when torch matches itself on half the images, or when its median error is over
    3x torch's own (a systematic error, not rounding), with torch's own fraction in the message."""
    from exporter.validate import compare, self_baseline

    rng = np.random.default_rng(3)
    ref = _outputs(rng)
    got = _moved(ref, 0.01, rng)
    assert compare(ref, got, 1e-4, merged=True, precision="fp32")[0]["matched_fraction"] == 0.0
    stats, problems = compare(ref, got, 1e-4, merged=True, precision="fp32", baseline=_moved(ref, 0.01, rng))
    assert problems == [] and stats["self_matched_fraction"] == 0.0
    half_flipped = _moved(ref, 0.01, rng, images=[0, 1, 2, 3])
    _, half = compare(ref, got, 1e-4, merged=True, precision="fp32", baseline=half_flipped)
    assert any("torch itself" in p and "matches 50%" in p for p in half), half
    _, systematic = compare(ref, got, 1e-4, merged=True, precision="fp32", baseline=_moved(ref, 0.001, rng))
    assert any("only 0% of the images match" in p for p in systematic), systematic
    _, unmerged = compare(ref, got, 1e-4, merged=False, precision="fp32", baseline=_moved(ref, 0.01, rng))
    assert any("max abs error" in p for p in unmerged)  # an unmerged graph must match everywhere
    x = rng.standard_normal((2, 3)).astype(np.float32)  # the baseline's input: moved by 1e-6, seeded
    moved = self_baseline(lambda v: [v], x)[0]
    assert 0 < np.abs(moved - x).max() < 1e-5 and np.array_equal(moved, self_baseline(lambda v: [v], x)[0])


def _turned(x: np.ndarray, cos: float, rng) -> np.ndarray:
    """Unit rows at exactly cosine ``cos`` to the unit rows ``x``."""
    o = rng.standard_normal(x.shape).astype(np.float32)
    o -= (o * x).sum(-1, keepdims=True) * x
    o /= np.linalg.norm(o, axis=-1, keepdims=True)
    return (cos * x + np.sqrt(1 - cos**2) * o).astype(np.float32)


def test_validation_lets_a_merged_patch_mean_move_as_a_flipped_merge_does() -> None:
    """The patch mean pools every summary-layer token, so one merge decision taken the other way moves it by
    more than the [CLS] embedding (cosine 0.9986 with ToMe r=16 on NEU-DET): a merged graph passes at 0.998 and
    fails at 0.99; an unmerged graph, which takes no decisions, fails at 0.998."""
    from exporter.validate import compare

    rng = np.random.default_rng(2)
    ref = _outputs(rng)
    for cos, merged, ok in ((0.998, True, True), (0.99, True, False), (0.998, False, False)):
        got = [ref[0], ref[1], ref[2], _turned(ref[3], cos, rng)]
        stats, problems = compare(ref, got, 1e-4, merged=merged, precision="fp32")
        assert abs(stats["patch_mean_cos_min"] - cos) < 1e-5
        assert (problems == []) == ok, (cos, merged, problems)
        assert ok or any("patch mean cosine" in p for p in problems)


def test_validation_judges_the_cosine_floors_against_torch_itself() -> None:
    """Heavy merging on many real images: a flipped near-tie moves a few images' embeddings far (ToMe r = 18 on
    200 NEU-DET images: torch against itself down to 0.977). A merged graph with as many images under the floor as
    torch has against itself (up to 2x) passes; with many more, or one under the hard floor, it fails and says
    torch's own count; without a baseline the absolute floor holds."""
    from exporter.validate import compare

    rng = np.random.default_rng(5)
    ref = _outputs(rng, n=20)

    def low(images, cos) -> list:
        out = [ref[0].copy(), ref[1], ref[2], ref[3]]
        out[0][images] = _turned(ref[0][images], cos, rng)
        return out

    torch_itself = low([0, 1], 0.97)
    for images, cos, ok in (([3, 4, 5], 0.96, True), ([3, 4, 5, 6, 7, 8], 0.96, False), ([3], 0.85, False)):
        stats, problems = compare(ref, low(images, cos), 1e-4, merged=True, precision="fp32", baseline=torch_itself)
        assert (problems == []) == ok, (images, cos, problems)
        assert ok or any(f"under 0.999 on {len(images)} image(s)" in p and "torch itself" in p and ": 2, down to"
                         in p for p in problems), problems
    _, alone = compare(ref, low([3], 0.97), 1e-4, merged=True, precision="fp32")
    assert any("global embedding cosine 0.97" in p for p in alone)


def test_export_errors_are_clear(tmp_path: Path, ) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        _export(tiny_vit(), tmp_path, MergeConfig(k=4), calib_dir=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="holds no images"):
        _export(tiny_vit(), tmp_path, MergeConfig(k=4), calib_dir=tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ExportError, match="no readable calibration images"):
        _export(tiny_vit(), tmp_path, MergeConfig(k=4), calib_dir=tmp_path / "bad")
    with pytest.raises(ExportError, match="precision"):
        _export(tiny_vit(), tmp_path, MergeConfig(k=4), precision="int3")


def test_calibration_on_real_images(tmp_path: Path, neu_det_dir: Path) -> None:
    res = _export(tiny_vit(), tmp_path, MergeConfig(r=6, alpha=5.0, k=4), calib_dir=neu_det_dir, batch_sizes=[4])
    assert res.manifest.validation is not None
    assert res.manifest.validation.max_abs_err_vs_torch < 1e-4
    own = res.manifest.validation.images_torch_matches_itself  # merged: torch measured against itself
    assert own is not None and 0.0 <= own <= 1.0 and res.table["images_torch_matches_itself"] == own
    assert res.table["ort_images_per_s"] > 0 and res.table["ort_images_per_s_unmerged"] > 0
