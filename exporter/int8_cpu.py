"""Dynamic INT8 for ONNX Runtime on CPU: the quantized encoder file, and its simulation in torch for the search.

``quantize_dynamic_file`` rewrites the fp32 encoder's projection MatMuls as ONNX Runtime's dynamic INT8
(``onnxruntime.quantization.quantize_dynamic``: ``MatMulInteger``): every weight-bearing projection
(``exporter.trt.quantize.nodes_to_quantize`` scope ``projections``: q/k/v, attention output, both MLP layers),
not the patch embedding (``ConvInteger`` is slow on CPU) nor the activation x activation products. Unlike the
TensorRT QDQ recipe, the MLP down-projection is quantized too: its GELU input's outliers cost a static range
accuracy, but a range measured at run time follows them (ViT-S/14 on NEU-DET: cosine to fp32 0.9994 with it, 0.9996
without, at 2.6x instead of 1.7x the fp32 speed on a 2-core Xeon). For a projection y = x W + b, W of shape [K, N]:

    W_q[:, n] = round(W[:, n] / s_n),  s_n = max_k |W[k, n]| / q           (per output channel, symmetric)
    x_q = sat_[0,255](round(x / s_x) + z),  s_x = (max(x, 0) - min(x, 0)) / 255,  z = round(-min(x, 0) / s_x)
    y ~= s_x * s_n * (x_q - z) W_q[:, n] + b                                 (integer product, float bias)

with q = 127 (8-bit weights) or 64 (7-bit, ``reduce_range``) and (s_x, z) measured at run time over each image's
activation (``DynamicQuantizeLinear``; ONNX Runtime's quantizer takes one range per call over the whole batch,
which ``per_image_ranges`` splits, so a frame's tokens never depend on the frames batched with it). No
calibration: the file is exact to make and works for any input.

It is a CPU route: fast where the CPU has int8 dot products (VNNI; BENCHMARKS.md ``merge_budget_int8_224px``),
much less so on AVX2-only CPUs (``merge_int8``), and TensorRT does not parse ``MatMulInteger`` (GPUs take
``encoder`` and build fp16 or QDQ INT8 engines instead). On x86 CPUs without VNNI ONNX Runtime adds pairs of u8 x s8
products in saturating 16-bit lanes, which 8-bit weights overflow (``runtime.cpu``): ``weight_bits=7`` makes a file
that is exact there too, for little accuracy (ViT-S/14 on 300 NEU-DET images, exact arithmetic: label-free loss
0.67 points against 0.63; BENCHMARKS.md ``int8_weights``).

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


WEIGHT_RANGE = {8: 127, 7: 64}  # weight bits -> q, the largest |W_q| (onnxruntime's symmetric and reduced ranges)


def quantize_dynamic_file(fp32: Path, out: Path, scope: str = SCOPE, per_image: bool = True,
                          weight_bits: int = 8) -> int:
    """Write the dynamic INT8 version of the fp32 encoder ``fp32`` to ``out``; returns the quantized projections.
    ``scope``: which (``nodes_to_quantize``; benchmarks compare ``no-down-proj``); ``weight_bits``: 8 or 7 (exact on
    x86 CPUs without VNNI, see the module docstring). A file of a static batch above 1
    gets each image's activation ranges of its own (``per_image_ranges``; ``per_image=False``: ONNX Runtime's one
    range per call, for the benchmark that compares them)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from exporter.trt.quantize import nodes_to_quantize

    if weight_bits not in WEIGHT_RANGE:
        raise ExportError(f"INT8 weights of {weight_bits} bits: 8 or 7")
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
                         per_channel=True, weight_type=QuantType.QInt8, reduce_range=weight_bits == 7)
    done = sum(n.op_type == "MatMulInteger" for n in onnx.load(str(tmp), load_external_data=False).graph.node)
    if done != len(nodes):
        tmp.unlink()
        raise ExportError(f"{fp32.name}: quantize_dynamic made {done} MatMulInteger nodes, expected {len(nodes)}")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else 0
    if per_image and batch > 1:
        onnx.save(per_image_ranges(onnx.load(str(tmp)), batch), str(tmp))
    tmp.replace(out)
    return done


def per_image_ranges(model, batch: int):
    """``model`` with every ``DynamicQuantizeLinear`` range taken per image instead of over the whole batch.

    ``DynamicQuantizeLinear`` measures one (scale, zero point) over its whole input, so in a batch file one image's
    outliers would coarsen the others' activations and a frame's tokens would depend on the frames it happened to
    be batched with (merged ViT-S/14, batch 4: a frame's global embedding down to cosine 0.69 of the same frame's
    alone; BENCHMARKS.md ``int8_batch_ranges``). Each quantized projection, rows image-major ([B * N, K] or [B, N, K]), becomes
    ``Split`` into the images, per image the quantizer's own ``DynamicQuantizeLinear`` -> ``MatMulInteger`` ->
    ``Cast`` -> ``Mul`` by (activation scale x weight scales) [-> ``Add`` bias], which ONNX Runtime fuses into one
    kernel, then ``Concat``: the batch-1 file's arithmetic image by image. It costs the two copies and smaller
    products (same benchmark); ONNX Runtime's ``MatMulInteger`` takes one activation zero point only, so the images
    cannot share one product as they are."""
    import onnx
    from onnx import helper, numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    inits = {t.name for t in model.graph.initializer}
    consumers: dict = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def only(name: str, op: str, required: bool = True):
        c = consumers.get(name, [])
        if len(c) == 1 and c[0].op_type == op:
            return c[0]
        if required:
            raise ExportError(f"dynamic INT8 graph: {name} feeds {[x.op_type for x in c]}, expected one {op}; "
                              "please report this onnxruntime version")
        return None

    replace: dict = {}  # id(node) -> the nodes that stand for it (the DynamicQuantizeLinear) or [] (removed)
    for dq in [n for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]:
        x, (q, xs, _) = dq.input[0], dq.output
        mmi, smul = only(q, "MatMulInteger"), only(xs, "Mul")
        cast = only(mmi.output[0], "Cast")
        out = only(cast.output[0], "Mul")
        add = only(out.output[0], "Add", required=False)  # the bias, in the fused kernel when in the branch
        bias = next((i for i in add.input if i in inits), None) if add is not None else None
        last = add if bias is not None else out
        rows = shapes.get(x, [0])[0]
        if not rows or rows % batch:
            raise ExportError(f"dynamic INT8 graph: {x} has {rows or 'unknown'} rows, not a multiple of the batch "
                              f"{batch}")
        w_scale = smul.input[1] if smul.input[0] == xs else smul.input[0]
        b = dq.name
        sizes = numpy_helper.from_array(np.full(batch, rows // batch, np.int64), f"{b}_per_image_sizes")
        model.graph.initializer.append(sizes)
        parts = [f"{b}_image{i}" for i in range(batch)]
        nodes = [helper.make_node("Split", [x, sizes.name], parts, name=f"{b}_split", axis=0)]
        for p in parts:
            nodes += [
                helper.make_node("DynamicQuantizeLinear", [p], [f"{p}_q", f"{p}_s", f"{p}_z"], name=f"{p}_quantize"),
                helper.make_node("MatMulInteger", [f"{p}_q", mmi.input[1], f"{p}_z", *mmi.input[3:]], [f"{p}_int"],
                                 name=f"{p}_matmul"),
                helper.make_node("Cast", [f"{p}_int"], [f"{p}_float"], name=f"{p}_cast", to=onnx.TensorProto.FLOAT),
                helper.make_node("Mul", [f"{p}_s", w_scale], [f"{p}_scales"], name=f"{p}_scales"),
                helper.make_node("Mul", [f"{p}_float", f"{p}_scales"], [f"{p}_y"], name=f"{p}_y"),
            ]
            if bias is not None:
                nodes.append(helper.make_node("Add", [f"{p}_y", bias], [f"{p}_out"], name=f"{p}_bias"))
        nodes.append(helper.make_node("Concat", [f"{p}_out" if bias is not None else f"{p}_y" for p in parts],
                                      [last.output[0]], name=f"{b}_concat", axis=0))
        replace[id(dq)] = nodes
        for n in (mmi, smul, cast, out) + ((add,) if bias is not None else ()):
            replace[id(n)] = []
    kept = []
    for n in model.graph.node:
        kept.extend(replace.get(id(n), [n]))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    onnx.checker.check_model(model)
    return model


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
    """``DynamicQuantizeLinear`` then dequantize, per image as the file does (``per_image_ranges``): uint8, one
    scale and zero point for each image's activations (``x``: [B, ...], image-major)."""
    import torch

    flat = x.reshape(x.shape[0], -1)
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    lo = torch.clamp(flat.amin(1), max=0.0).reshape(shape)
    hi = torch.clamp(flat.amax(1), min=0.0).reshape(shape)
    scale = (hi - lo) / 255.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round(-lo / safe), 0, 255)
    q = torch.clamp(torch.round(x / safe) + zero, 0, 255)
    return torch.where(scale == 0, x, (q - zero) * safe)


def _fake_quant_weight(w, q: int = 127):
    """Per-output-channel symmetric int8 (range +-q: ``WEIGHT_RANGE``) then dequantize; ``w`` is torch's [out, in]."""
    import torch

    scale = w.abs().amax(dim=1, keepdim=True) / float(q)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(w / scale), -q, q) * scale


def projections(vit) -> list:
    """(name, module) of the projections ``simulate`` quantizes: as many as the file's ``MatMulInteger`` nodes."""
    from torch import nn

    return [(name, mod) for name, mod in vit.named_modules()
            if isinstance(mod, nn.Linear) and quantizable(mod.in_features, mod.out_features)]


@contextlib.contextmanager
def simulate(vit, weight_bits: int = 8) -> Iterator[List[str]]:
    """Within the block, ``vit``'s quantized projections compute dynamic INT8 arithmetic with weights of
    ``weight_bits`` (yields their names)."""
    import torch

    patched = projections(vit)
    for _, mod in patched:
        wq = _fake_quant_weight(mod.weight.detach(), WEIGHT_RANGE[weight_bits])

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
