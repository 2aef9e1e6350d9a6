"""Dynamic INT8 for ONNX Runtime on CPU: the quantized encoder file, and its simulation in torch for the search.

``quantize_dynamic_file`` rewrites the fp32 encoder's projection MatMuls as ONNX Runtime's dynamic INT8
(``onnxruntime.quantization.quantize_dynamic``: ``MatMulInteger``): every weight-bearing projection
(``exporter.trt.quantize.nodes_to_quantize`` scope ``projections``: q/k/v, attention output, both MLP layers),
not the patch embedding (``ConvInteger`` is slow on CPU) nor the activation x activation products. Unlike the
TensorRT QDQ recipe, the MLP down-projection is quantized too: its GELU input's outliers cost a static range
accuracy, but a range measured per call follows them (ViT-S/14 on NEU-DET: cosine to fp32 0.9994 with it, 0.9996
without, at 2.6x instead of 1.7x the fp32 speed on a 2-core Xeon). For a projection y = x W + b, W of shape [K, N]:

    W_q[:, n] = round(W[:, n] / s_n),  s_n = max_k |W[k, n]| / 127          (per output channel, symmetric)
    x_q = sat_[0,255](round(x / s_x) + z),  s_x = (max(x, 0) - min(x, 0)) / 255,  z = round(-min(x, 0) / s_x)
    y ~= s_x * s_n * (x_q - z) W_q[:, n] + b                                 (integer product, float bias)

with (s_x, z) taken per call over the whole activation tensor (``DynamicQuantizeLinear``). No calibration: the
activation ranges are measured at run time, so the file is exact to make and works for any input.

It is a CPU route: fast where the CPU has int8 dot products (VNNI; BENCHMARKS.md ``merge_budget_int8_224px``),
much less so on AVX2-only CPUs (``merge_int8``), and TensorRT does not parse ``MatMulInteger`` (GPUs take
``encoder`` and build fp16 or QDQ INT8 engines instead).

``simulate`` makes a torch ``ViT`` compute the same arithmetic in float (the fake-quantized operands multiplied
in fp32), so that the schedule search (``exporter.budget``) measures the fidelity of merging *and* INT8 together
without writing a file per candidate: INT8 rounding changes which tokens merge, so the two losses do not add.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, List

import numpy as np

from exporter.errors import ExportError


SCOPE = "projections"  # exporter.trt.quantize.nodes_to_quantize's scope of the quantized MatMuls
# ... less the summary head's projection (ViT.head, traced as "/vit/head/..."): little compute, and the summary
# tokens it makes are quantized for the wire anyway; the simulation leaves it in float alike (it is no nn.Linear)
FLOAT_SCOPES = ("/vit/head/",)


def quantizable(in_features: int, out_features: int) -> bool:
    """Whether a projection of this shape is quantized (``nodes_to_quantize`` scope ``projections``)."""
    return min(in_features, out_features) >= 8


def quantize_dynamic_file(fp32: Path, out: Path, scope: str = SCOPE) -> int:
    """Write the dynamic INT8 version of the fp32 encoder ``fp32`` to ``out``; returns the quantized MatMuls.
    ``scope``: which projections (``nodes_to_quantize``; benchmarks compare ``no-down-proj``)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from exporter.trt.quantize import nodes_to_quantize

    model = onnx.load(str(fp32))
    chosen = {n for n in nodes_to_quantize(model, scope) if not n.startswith(FLOAT_SCOPES)}
    # the quantizer splits each Gemm (onnxslim's fused MatMul + Add) into "<name>_MatMul" + Add first
    nodes = [n.name + "_MatMul" if n.op_type == "Gemm" else n.name for n in model.graph.node
             if n.name in chosen and n.op_type in ("MatMul", "Gemm")]
    if not nodes:
        raise ExportError(f"{fp32.name}: no projection MatMul to quantize")
    tmp = out.with_name(out.name + ".partial")
    with _quiet_preprocessing_advice():
        quantize_dynamic(str(fp32), str(tmp), op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes,
                         per_channel=True, weight_type=QuantType.QInt8)
    done = sum(n.op_type == "MatMulInteger" for n in onnx.load(str(tmp), load_external_data=False).graph.node)
    if done != len(nodes):
        tmp.unlink()
        raise ExportError(f"{fp32.name}: quantize_dynamic made {done} MatMulInteger nodes, expected {len(nodes)}")
    tmp.replace(out)
    return done


@contextlib.contextmanager
def _quiet_preprocessing_advice() -> Iterator[None]:
    """Drop the quantizer's root-logger advice to run its shape pre-processing (the graphs are already static)."""
    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    root, drop = logging.getLogger(), Drop()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _fake_quant_input(x):
    """``DynamicQuantizeLinear`` then dequantize: uint8, one scale and zero point for the whole tensor."""
    import torch

    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    if float(scale) == 0.0:
        return x
    zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
    return (q - zero) * scale


def _fake_quant_weight(w):
    """Per-output-channel symmetric int8 (range +-127) then dequantize; ``w`` is torch's [out, in]."""
    import torch

    scale = w.abs().amax(dim=1, keepdim=True) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def projections(vit) -> list:
    """(name, module) of the projections ``simulate`` quantizes: as many as the file's ``MatMulInteger`` nodes."""
    from torch import nn

    return [(name, mod) for name, mod in vit.named_modules()
            if isinstance(mod, nn.Linear) and quantizable(mod.in_features, mod.out_features)]


@contextlib.contextmanager
def simulate(vit) -> Iterator[List[str]]:
    """Within the block, ``vit``'s quantized projections compute dynamic INT8 arithmetic (yields their names)."""
    import torch

    patched = projections(vit)
    for _, mod in patched:
        wq = _fake_quant_weight(mod.weight.detach())

        def forward(x, mod=mod, wq=wq):
            return torch.nn.functional.linear(_fake_quant_input(x), wq, mod.bias)

        mod.forward = forward
    try:
        yield [n for n, _ in patched]
    finally:
        for _, mod in patched:
            del mod.forward  # back to the class's forward


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two embedding matrices."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(axis=1)
