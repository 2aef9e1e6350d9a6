"""Contract: the manifest validates strictly and names bad keys; preprocessing follows the input spec."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tokenline.manifest import Manifest, ManifestError, verify_files
from tokenline.preprocess import ImageError, decode_image, preprocess, read_image
from tokenline import manifest as mf


def sample_manifest(tmp: Path) -> Manifest:
    (tmp / "enc.onnx").write_bytes(b"onnx bytes")
    return Manifest(
        name="m", family="timm_vit", source_checkpoint="c.pt", source_sha256="0" * 64, exporter_version="0.1.0",
        created_at="2026-11-24T00:00:00+00:00", opset=17, precision="fp32", batch_sizes=[1],
        input=mf.InputSpec(height=32, width=48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize="resize"),
        encoder=mf.EncoderSpec(embed_dim=8, depth=2, num_heads=2, patch_size=8, grid=(4, 6), num_prefix_tokens=1,
                               has_cls=True),
        merge=mf.MergeSpec(method="none", r_per_block=[0, 0], tokens_per_block=[25, 25], final_tokens=25),
        summary=mf.SummarySpec(k=4, dim=8),
        outputs=[mf.TensorSpec(name=n, shape=s, dtype="float32") for n, s in
                 zip(["global_embedding", "summary_tokens", "summary_sizes", "summary_centroids"],
                     [(1, 8), (1, 4, 8), (1, 4), (1, 4, 2)])],
        embedding_dim=8,
        files=[mf.FileSpec(path="enc.onnx", sha256=mf.sha256_file(tmp / "enc.onnx"), role="encoder", batch=1)],
    )


def test_manifest_round_trip_hash_and_file_verification(tmp_path: Path) -> None:
    m = sample_manifest(tmp_path)
    m.write(tmp_path / "manifest.json")
    back = Manifest.from_file(tmp_path)
    assert back == m and back.hash() == m.hash() and len(m.hash_bytes()) == 16
    verify_files(back, tmp_path)
    (tmp_path / "enc.onnx").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="does not match"):
        verify_files(back, tmp_path)
    (tmp_path / "enc.onnx").unlink()
    with pytest.raises(ManifestError, match="missing"):
        verify_files(back, tmp_path)


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.update(surprise=1), "surprise"),
    (lambda d: d["input"].update(std=[1, 0, 1]), "input.std"),
    (lambda d: d.update(opset=13), "opset"),
    (lambda d: d["outputs"].reverse(), "outputs must be named"),
    (lambda d: d.update(schema="tokenline.manifest/9"), "this build reads"),
    (lambda d: d["outputs"][2].update(shape=[1, 5]), "summary_sizes must be"),
    (lambda d: d["merge"].update(r_per_block=[1]), "one entry per block"),
])
def test_invalid_manifests_name_the_key(tmp_path: Path, mutate, msg: str) -> None:
    d = json.loads(sample_manifest(tmp_path).to_json())
    mutate(d)
    with pytest.raises(ManifestError, match=msg):
        Manifest.from_json(json.dumps(d))


def test_unreadable_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read"):
        Manifest.from_file(tmp_path / "nope.json")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not JSON"):
        Manifest.from_file(tmp_path)


def _spec(**kw) -> mf.InputSpec:
    base = dict(height=4, width=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize="resize", interpolation="nearest")
    base.update(kw)
    return mf.InputSpec(**base)


def test_preprocess_colour_order_normalization_and_layout() -> None:
    frame = np.zeros((4, 4, 3), np.uint8)
    frame[..., 0] = 255  # blue in BGR
    x = preprocess(frame, _spec(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    assert x.shape == (3, 4, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x[2], 1.0)  # RGB order: blue is the last channel
    np.testing.assert_allclose(x[0], -1.0)
    xb = preprocess(frame, _spec(color_order="BGR"))
    np.testing.assert_allclose(xb[0], 1.0)


def test_preprocess_resize_modes_and_roi() -> None:
    frame = np.zeros((20, 40, 3), np.uint8)
    frame[:, 20:] = 200  # right half bright
    crop = preprocess(frame, _spec(resize="resize_center_crop", height=10, width=10))
    assert crop.shape == (3, 10, 10)  # centre crop of the 10x20 resize: left and right halves meet in the middle
    assert crop[0, :, 0].max() < 0.1 and crop[0, :, -1].min() > 0.7
    box = preprocess(frame, _spec(resize="letterbox", height=10, width=10, mean=(0.2, 0.2, 0.2), std=(1, 1, 1)))
    np.testing.assert_allclose(box[:, 0, :], 0.0, atol=1 / 255)  # padded rows hold the mean colour -> 0
    roi = preprocess(frame, _spec(height=4, width=4), roi=(20, 0, 20, 20))
    np.testing.assert_allclose(roi, 200 / 255, atol=1e-6)
    gray = preprocess(np.full((8, 8), 255, np.uint8), _spec())
    np.testing.assert_allclose(gray, 1.0)


@pytest.mark.parametrize("frame,msg", [
    (np.zeros((0, 0, 3), np.uint8), "empty"),
    (np.zeros((4, 4, 3), np.float32), "uint8"),
    (np.zeros((4, 4, 2), np.uint8), "shape"),
])
def test_preprocess_rejects_bad_frames(frame, msg: str) -> None:
    with pytest.raises(ImageError, match=msg):
        preprocess(frame, _spec())


def test_roi_outside_frame_and_corrupt_images(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="outside"):
        preprocess(np.zeros((8, 8, 3), np.uint8), _spec(), roi=(20, 20, 4, 4))
    with pytest.raises(ImageError, match="JPEG header"):
        decode_image(b"\xff\xd8\xff garbage")
    ok, jpg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "trunc.jpg").write_bytes(jpg.tobytes()[:20])
    with pytest.raises(ImageError, match="trunc.jpg"):
        read_image(tmp_path / "trunc.jpg")
    with pytest.raises(ImageError, match="No such file"):
        read_image(tmp_path / "missing.jpg")
