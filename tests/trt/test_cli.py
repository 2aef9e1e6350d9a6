"""TensorRT subcommands through the real CLI entry points: check-trt, quantize-int8, build-engine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from exporter.cli import main as export_main
from tokenline import manifest as mf


def _out(capsys) -> str:
    """Captured stdout with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().out.split())


def _error(capsys) -> str:
    """The one line an expected error prints on stderr (``runtime.cli``)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _tiny_export(out: Path) -> mf.Manifest:
    import torch  # noqa: PLC0415

    from exporter.export import export_encoder  # noqa: PLC0415
    from exporter.options import ExportOptions, MergeConfig  # noqa: PLC0415
    from exporter.vit import ViT, ViTConfig  # noqa: PLC0415

    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=(48, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_hidden=64))
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.1)
    opts = ExportOptions(out_dir=out, name="tiny", calib_count=4, batch_sizes=[2], bench_runs=1,
                         export_unmerged=False)
    res = export_encoder(vit.eval(), MergeConfig(r=4, alpha=5.0, k=4), opts, family="timm_vit",
                         source_path="tiny.safetensors", source_sha256="a" * 64)
    return res.manifest


def test_check_trt_exit_codes_and_table(tmp_path: Path, capsys) -> None:
    good = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(good, str(tmp_path / "good.onnx"))
    assert export_main(["check-trt", str(tmp_path / "good.onnx")]) == 0
    out = _out(capsys)
    assert "jetpack5" in out and "jetpack6" in out and "trt10" in out and "FAILS" not in out

    bad = onnx.ModelProto()
    bad.CopyFrom(good)
    bad.opset_import[0].version = 19
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    assert export_main(["check-trt", str(tmp_path / "bad.onnx"), "--target", "jetpack5,jetpack6"]) == 1
    out = _out(capsys)
    assert "FAILS" in out and "opset" in out and "trt10" not in out.split("problems")[0]
    assert export_main(["check-trt", str(tmp_path / "missing.onnx")]) == 2
    assert "no such ONNX file" in _error(capsys)
    with pytest.raises(SystemExit):
        export_main(["check-trt", str(tmp_path / "good.onnx"), "--target", "jetpack4"])


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export")
    _tiny_export(out)
    return out


def test_quantize_int8_writes_qdq_and_updates_the_manifest(export_dir: Path, tmp_path: Path, capsys) -> None:
    import cv2  # noqa: PLC0415

    calib = tmp_path / "frames"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        cv2.imwrite(str(calib / f"f{i}.png"), cv2.resize(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8), (64, 64)))
    before = mf.Manifest.from_file(export_dir)
    assert export_main(["quantize-int8", str(export_dir), "--calib", str(calib), "--count", "6"]) == 0
    after = mf.Manifest.from_file(export_dir)
    qdq = after.file("encoder_qdq")
    assert qdq.precision == "int8" and qdq.batch == 2 and after.hash() != before.hash()
    mf.verify_files(after, export_dir)  # the new file is listed with its real sha256
    model = onnx.load(str(export_dir / qdq.path))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    out = _out(capsys)
    assert "manifest updated" in out and "FAILS" not in out
    assert export_main(["quantize-int8", str(export_dir), "--calib", str(tmp_path / "none")]) == 2
    assert "does not exist" in _error(capsys)


def test_build_engine_without_tensorrt_is_a_clear_error(export_dir: Path, capsys) -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here; the real build is covered by test_engine.py")
    assert export_main(["build-engine", str(export_dir), "--precision", "fp16"]) == 2
    err = _error(capsys)
    assert "TensorRT" in err and "docs/jetson.md" in err
