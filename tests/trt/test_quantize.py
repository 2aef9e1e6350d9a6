"""INT8 QDQ production on a tiny ViT: TensorRT-ready structure, accuracy against FP32, calibration from images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporter.trt.compat import check_onnx
from exporter.trt.operators import TARGETS
from exporter.trt.quantize import (
    QuantizeError,
    QuantizeOptions,
    calibration_arrays,
    nodes_to_quantize,
    quantize_from_folder,
    quantize_qdq,
    quantized_nodes,
)
from tokenline.manifest import InputSpec

SPEC = InputSpec(height=48, width=48, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize="resize")


def _images(n: int, seed: int) -> np.ndarray:
    """Smooth structured images (upsampled low-res noise with edges), preprocessed like real frames."""
    import cv2  # noqa: PLC0415

    from tokenline.preprocess import preprocess  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        low = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        img = cv2.resize(low, (48, 48), interpolation=cv2.INTER_CUBIC)
        x0, y0 = rng.integers(0, 40, size=2)
        img[y0:y0 + 8, x0:x0 + 8] = 255 - img[y0:y0 + 8, x0:x0 + 8]  # a "defect"
        frames.append(preprocess(img, SPEC))
    return np.stack(frames).astype(np.float32)


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory) -> Path:
    import torch  # noqa: PLC0415

    from exporter.export import export_onnx  # noqa: PLC0415
    from exporter.options import MergeConfig  # noqa: PLC0415
    from exporter.vit import ViT, ViTConfig  # noqa: PLC0415

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=(48, 48), patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_hidden=128)
    vit = ViT(cfg)
    with torch.no_grad():  # a trained-like scale: small weights, layer outputs of moderate range
        for name, p in vit.named_parameters():
            p.normal_(0, 0.05 if p.dim() > 1 else 0.02)
    vit.configure_merging(MergeConfig(r=6, alpha=5.0, k=4))
    path = tmp_path_factory.mktemp("q") / "tiny_b4.onnx"
    export_onnx(vit.eval(), path, 4, 17, "fp32", simplify=True)
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort  # noqa: PLC0415

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(["global_embedding"], {"pixels": x[i:i + 4]})[0] for i in range(0, len(x), 4)])


def test_qdq_model_is_tensorrt_ready_and_keeps_sensitive_ops_in_float(fp32_model: Path, tmp_path: Path) -> None:
    out = quantize_qdq(fp32_model, tmp_path / "q.onnx", _images(16, 0), QuantizeOptions(count=16))
    q = onnx.load(str(out))
    fp = onnx.load(str(fp32_model))
    inits = {i.name: i for i in q.graph.initializer}
    qdq = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq, "no Q/DQ nodes were inserted"
    for n in qdq:  # symmetric INT8 everywhere (TensorRT: zero point 0), no INT32 bias DQ
        zp = inits.get(n.input[2]) if len(n.input) > 2 else None
        assert zp is not None and zp.data_type == onnx.TensorProto.INT8 and not numpy_helper.to_array(zp).any()
    # exactly the weight-bearing linear layers run in INT8; attention/softmax/LayerNorm/GELU/merge stay float
    by_name = {n.name: n for n in q.graph.node}
    int8 = {by_name[nm].op_type for nm in quantized_nodes(q)}
    assert int8 <= {"Conv", "MatMul", "Gemm"}
    assert set(quantized_nodes(q)) == set(nodes_to_quantize(fp, "no-down-proj"))
    weights = {i.name for i in fp.graph.initializer}
    fp_inits = {i.name: i for i in fp.graph.initializer}
    attention_matmuls = [n.name for n in fp.graph.node if n.op_type == "MatMul" and not set(n.input) & weights]
    assert attention_matmuls and not set(attention_matmuls) & set(quantized_nodes(q))
    # the MLP down-projection (weight [4D, D]) stays float by default; "projections" includes it
    def k_n(n):
        d = list(fp_inits[n.input[1]].dims)
        return d[::-1] if any(a.name == "transB" and a.i for a in n.attribute) else d
    down = [n.name for n in fp.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights
            and len(fp_inits[n.input[1]].dims) == 2 and k_n(n)[0] > k_n(n)[1]]
    assert len(down) == 4 and not set(down) & set(quantized_nodes(q))
    assert set(down) <= set(nodes_to_quantize(fp, "projections"))
    # per-channel weights: DequantizeLinear of a MatMul weight has one scale per output column
    per_channel = [n for n in qdq if n.op_type == "DequantizeLinear" and inits.get(n.input[1]) is not None
                   and len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1]
    assert per_channel
    for name, rep in check_onnx(out, list(TARGETS)).items():
        assert rep.ok, (name, [str(p) for p in rep.errors])


def test_qdq_accuracy_close_to_fp32(fp32_model: Path, tmp_path: Path) -> None:
    calib, held_out = _images(32, 1), _images(16, 2)
    ref = _run(fp32_model, held_out)
    cos = {}
    for scope in ("no-down-proj", "all"):
        out = quantize_qdq(fp32_model, tmp_path / f"{scope}.onnx", calib, QuantizeOptions(scope=scope, count=32))
        got = _run(out, held_out)
        cos[scope] = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
        assert not np.allclose(got, ref, atol=1e-7), "quantization changed nothing: Q/DQ not effective"
    assert cos["no-down-proj"].min() > 0.99, cos["no-down-proj"]
    assert cos["no-down-proj"].mean() >= cos["all"].mean() - 1e-3  # quantizing attention/merge MatMuls does not help
    # retrieval order on held-out images is preserved: the nearest neighbour of each image is unchanged
    def nn(e: np.ndarray) -> np.ndarray:
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)
    got = _run(tmp_path / "no-down-proj.onnx", held_out)
    assert (nn(ref) == nn(got)).mean() >= 0.9


def test_calibration_from_a_folder_of_real_images(fp32_model: Path, tmp_path: Path, neu_det_dir: Path) -> None:
    import shutil  # noqa: PLC0415

    folder = tmp_path / "frames"
    folder.mkdir()
    for p in sorted(neu_det_dir.glob("*.jpg"))[::150]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")  # skipped with a warning, not fatal
    data = calibration_arrays(folder, SPEC, 16)
    assert data.shape == (len(list(folder.glob("*.jpg"))) - 1, 3, 48, 48) and data.dtype == np.float32
    out = quantize_from_folder(fp32_model, tmp_path / "q.onnx", folder, SPEC, QuantizeOptions(count=16))
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)


def test_bad_calibration_input_is_a_clear_error(fp32_model: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="does not exist"):
        calibration_arrays(tmp_path / "nope", SPEC, 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(QuantizeError, match="no readable calibration images"):
        calibration_arrays(empty, SPEC, 4)
    with pytest.raises(QuantizeError, match="model takes"):
        quantize_qdq(fp32_model, tmp_path / "q.onnx", np.zeros((4, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="scope"):
        QuantizeOptions(scope="some")


def test_int8_calibration_imports_no_torch(tmp_path: Path) -> None:
    """quantize and the calibration images it reads import no torch (INT8 runs where torch is not installed)."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    import cv2  # noqa: PLC0415

    cv2.imwrite(str(tmp_path / "a.png"), np.full((64, 80, 3), 128, np.uint8))
    code = (
        "import sys\n"
        "from exporter.trt.quantize import calibration_arrays\n"
        "from tokenline.manifest import InputSpec\n"
        "spec = InputSpec(height=48, width=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize='resize')\n"
        f"print(calibration_arrays({str(tmp_path)!r}, spec, 4).shape)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch')\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 3, 48, 48)"
