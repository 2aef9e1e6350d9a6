"""TensorRT compatibility checker: crafted graphs that must fail each check, exported graphs that must pass."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.trt.compat import CompatError, check_onnx
from exporter.trt.operators import TARGETS

ALL = list(TARGETS)


def _model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
           outputs: Sequence[onnx.ValueInfoProto], inits: Sequence[onnx.TensorProto] = (), opset: int = 17,
           functions: Sequence[onnx.FunctionProto] = (), extra_opsets: Sequence[onnx.OperatorSetIdProto] = ()):
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets],
                             functions=list(functions), ir_version=8)


def _x(shape=(1, 8), name="x", dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _i64(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _verdict(model, targets=ALL):
    return {t: r for t, r in check_onnx(model, targets).items()}


def _errors(report, kind: str) -> List:
    return [p for p in report.errors if p.kind == kind]


def _relu_model(opset: int = 17):
    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_x()], [_x(name="y")], opset=opset)


def test_clean_model_passes_every_target() -> None:
    for name, rep in _verdict(_relu_model()).items():
        assert rep.ok, (name, rep.problems)


def test_opset_above_17_fails_tensorrt_8_only() -> None:
    v = _verdict(_relu_model(opset=19))
    assert _errors(v["jetpack5"], "opset") and _errors(v["trt86"], "opset")
    assert v["jetpack6"].ok and v["trt10"].ok
    v = _verdict(_relu_model(opset=21))
    assert _errors(v["jetpack6"], "opset") and v["trt10"].ok


def test_operator_outside_the_support_matrix() -> None:
    scale = numpy_helper.from_array(np.ones(8, np.float32), "s")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    ln = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], name="ln", axis=-1)
    v = _verdict(_model([ln], [_x()], [_x(name="y")], [scale, bias]))
    assert [p.node for p in _errors(v["jetpack5"], "unsupported_op")] == ["ln"]
    assert v["trt86"].ok and v["jetpack6"].ok and v["trt10"].ok  # LayerNormalization since 8.6
    # an op added after 10.3 (RMSNormalization, opset 23) passes only the latest 10.x list
    rms = helper.make_node("RMSNormalization", ["x", "s"], ["y"], name="rms", axis=-1)
    v = _verdict(_model([rms], [_x()], [_x(name="y")], [scale], opset=23), ["jetpack6", "trt10"])
    assert _errors(v["jetpack6"], "unsupported_op") and v["trt10"].ok


def test_custom_domain_operator_fails() -> None:
    node = helper.make_node("FastGelu", ["x"], ["y"], name="fg", domain="com.microsoft")
    m = _model([node], [_x()], [_x(name="y")], extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    for rep in _verdict(m).values():
        assert _errors(rep, "custom_domain")


def _topk(k_from_input: bool = False, k: int = 4, sorted_: int = 1, n: int = 16):
    nodes, inits, inputs = [], [], [_x((1, n))]
    if k_from_input:
        inputs.append(_x((1,), "k", TensorProto.INT64))
        k_name = "k"
    else:
        inits.append(_i64("k", [k]))
        k_name = "k"
    nodes.append(helper.make_node("TopK", ["x", k_name], ["v", "i"], name="topk", axis=-1, sorted=sorted_))
    outs = [_x((1, None), "v"), _x((1, None), "i", TensorProto.INT64)]
    return _model(nodes, inputs, outs, inits)


def test_topk_with_non_constant_k() -> None:
    v = _verdict(_topk(k_from_input=True))
    assert _errors(v["jetpack5"], "non_constant_input")  # 8.5: "K input must be an initializer"
    assert _errors(v["jetpack6"], "topk_dynamic_k")  # K < 3840 cannot be verified
    assert v["jetpack5"].errors[0].op_type == "TopK"


def test_topk_k_limit_and_sorted_on_tensorrt_10() -> None:
    v = _verdict(_topk(k=3840, n=5000))
    assert _errors(v["jetpack6"], "topk_k_limit") and _errors(v["trt10"], "topk_k_limit")
    assert not _errors(v["jetpack5"], "topk_k_limit")
    v = _verdict(_topk(k=4, sorted_=0))
    assert _errors(v["jetpack6"], "topk_sorted") and _errors(v["trt10"], "topk_sorted")
    assert v["jetpack5"].ok
    assert all(r.ok for r in _verdict(_topk(k=4)).values())


def _scatter(op: str, reduction: str):
    idx = _i64("idx", [[0, 1]]) if op == "ScatterElements" else _i64("idx", [[0]])
    upd_shape = (1, 2) if op == "ScatterElements" else (1, 8)
    upd = numpy_helper.from_array(np.ones(upd_shape, np.float32), "upd")
    node = helper.make_node(op, ["x", "idx", "upd"], ["y"], name="sc", reduction=reduction)
    return _model([node], [_x()], [_x(name="y")], [idx, upd])


def test_scatter_elements_reduction_before_tensorrt_10() -> None:
    v = _verdict(_scatter("ScatterElements", "add"))
    assert _errors(v["jetpack5"], "scatter_reduction") and _errors(v["trt86"], "scatter_reduction")
    assert v["jetpack6"].ok and v["trt10"].ok
    assert all(r.ok for r in _verdict(_scatter("ScatterElements", "none")).values())


def test_scatter_nd_reduction_fails_everywhere() -> None:
    for rep in _verdict(_scatter("ScatterND", "add")).values():
        assert _errors(rep, "scatter_reduction")


def test_dynamic_non_batch_axis_fails_but_dynamic_batch_passes() -> None:
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    dyn_hw = _model([node], [_x(("N", 3, "H", "W"))], [_x(("N", 3, "H", "W"), "y")])
    for rep in _verdict(dyn_hw).values():
        assert _errors(rep, "dynamic_shape")
    dyn_batch = _model([node], [_x(("N", 3, 8, 8))], [_x(("N", 3, 8, 8), "y")])
    assert all(r.ok for r in _verdict(dyn_batch).values())


def test_int64_narrowing_on_tensorrt_8() -> None:
    big = _i64("big", [2**40])
    node = helper.make_node("Add", ["x", "big"], ["y"], name="add")
    m = _model([node], [_x((1,), "x", TensorProto.INT64)], [_x((1,), "y", TensorProto.INT64)], [big])
    v = _verdict(m)
    assert _errors(v["jetpack5"], "int64_overflow") and _errors(v["trt86"], "int64_overflow")
    assert {"int64_io", "int64"} <= v["jetpack5"].kinds()
    assert all(p.severity == "warning" for p in v["jetpack5"].problems if p.kind in ("int64_io", "int64"))
    assert v["jetpack6"].ok and not v["jetpack6"].problems  # INT64 is native from TensorRT 9
    # INT64_MAX as "slice to the end" is clamped harmlessly: no error
    sl = helper.make_node("Slice", ["x", "st", "en", "ax"], ["y"], name="slice")
    m = _model([sl], [_x((1, 8))], [_x((1, 7), "y")], [_i64("st", [1]), _i64("en", [2**63 - 1]), _i64("ax", [1])])
    assert _verdict(m)["jetpack5"].ok


def _qdq(zero_point: int, zp_type=TensorProto.INT8):
    scale = numpy_helper.from_array(np.asarray(0.1, np.float32), "scale")
    zp = helper.make_tensor("zp", zp_type, [], [zero_point])
    q = helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="q")
    dq = helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], name="dq")
    return _model([q, dq], [_x()], [_x(name="y")], [scale, zp])


def test_qdq_zero_point_and_type() -> None:
    assert all(r.ok for r in _verdict(_qdq(0)).values())
    for rep in _verdict(_qdq(3)).values():
        assert _errors(rep, "qdq_zero_point")
    for rep in _verdict(_qdq(128, TensorProto.UINT8)).values():
        assert _errors(rep, "qdq_type")


def test_qdq_scale_must_be_constant() -> None:
    q = helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q")
    dq = helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq")
    m = _model([q, dq], [_x(), _x((), "s")], [_x(name="y")])
    for rep in _verdict(m).values():
        assert {p.node for p in _errors(rep, "non_constant_input")} == {"q", "dq"}


def test_resize_cubic_changes_results() -> None:
    scales = numpy_helper.from_array(np.asarray([1, 1, 2, 2], np.float32), "scales")
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="rs", mode="cubic")
    m = _model([node], [_x((1, 3, 4, 4))], [_x((1, 3, 8, 8), "y")], [scales])
    for rep in _verdict(m).values():
        assert _errors(rep, "resize_mode")


def test_unsqueeze_axes_from_the_input_fails() -> None:
    shape = helper.make_node("Shape", ["x"], ["s"], name="shape", start=0, end=1)
    sub = helper.make_node("Sub", ["s", "one"], ["axes"], name="sub")
    uns = helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="uns")
    m = _model([shape, sub, uns], [_x(("N", 8))], [_x(name="y", shape=("N", 1, 8))], [_i64("one", [0])])
    for rep in _verdict(m).values():
        assert [p.node for p in _errors(rep, "non_constant_input")] == ["uns"]
    # the same with a static input shape is computable at build time: only a warning (fold constants)
    m2 = _model([shape, sub, uns], [_x((2, 8))], [_x(name="y", shape=(2, 1, 8))], [_i64("one", [0])])
    for rep in _verdict(m2).values():
        assert rep.ok and "non_constant_input" in rep.kinds()


def test_nodes_inside_subgraphs_are_checked() -> None:
    then_g = helper.make_graph([helper.make_node("Hardmax", ["x"], ["t"], name="inner_hardmax")], "then", [],
                               [_x(name="t")])
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["e"], name="inner_relu")], "else", [],
                               [_x(name="e")])
    cond = helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)
    m = _model([cond], [_x(), _x((), "c", TensorProto.BOOL)], [_x(name="y")])
    v = _verdict(m)
    bad = _errors(v["jetpack5"], "unsupported_op")
    assert len(bad) == 1 and bad[0].op_type == "Hardmax" and "then_branch" in bad[0].node
    assert v["jetpack6"].ok


def test_model_local_functions() -> None:
    fn = helper.make_function("local", "MyAct", ["a"], ["b"],
                              [helper.make_node("Hardmax", ["a"], ["b"], name="fn_hardmax")],
                              [helper.make_opsetid("", 17)])
    call = helper.make_node("MyAct", ["x"], ["y"], name="call", domain="local")
    m = _model([call], [_x()], [_x(name="y")], functions=[fn], extra_opsets=[helper.make_opsetid("local", 1)])
    v = _verdict(m)
    assert _errors(v["jetpack5"], "local_function")  # 8.x parsers do not expand local functions
    inner = _errors(v["jetpack5"], "unsupported_op")
    assert inner and inner[0].node.startswith("function local.MyAct/")
    assert v["jetpack6"].ok  # expanded, and Hardmax is supported in 10.x


def test_fp16_overflowing_constant_warns() -> None:
    mask = numpy_helper.from_array(np.full((1, 8), -1e9, np.float32), "mask")
    m = _model([helper.make_node("Add", ["x", "mask"], ["y"], name="add")], [_x()], [_x(name="y")], [mask])
    for rep in _verdict(m).values():
        assert rep.ok and "fp16_range" in rep.kinds()


def test_bad_input_gives_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CompatError, match="no such ONNX file"):
        check_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model")
    with pytest.raises(CompatError, match="not a readable ONNX model"):
        check_onnx(junk)
    with pytest.raises(CompatError, match="unknown TensorRT target"):
        check_onnx(_relu_model(), ["jetpack4"])


# -- our exporter's graphs must pass every target --------------------------------------------------------------


EXPORTS = [  # (id, merge kwargs, batch, precision, vit kwargs)
    ("turbo-b2", dict(r=6, alpha=5.0, k=4), 2, "fp32", dict(num_registers=1)),
    ("tome-dynamic", dict(r=6, alpha=0.0, k=4), None, "fp32", {}),
    ("unmerged-b1", dict(k=4), 1, "fp32", {}),
    ("turbo-fp16-b1", dict(r=6, alpha=5.0, k=4), 1, "fp16", {}),
    ("turbo-map-pool", dict(r=6, alpha=5.0, k=4), 1, "fp32", dict(pool="map", map_heads=2, map_mlp_hidden=64,
                                                                    act="gelu_tanh")),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    from exporter.export import export_onnx  # noqa: PLC0415
    from exporter.options import MergeConfig  # noqa: PLC0415

    out = tmp_path_factory.mktemp("exported")
    paths = {}
    from tests.support.tiny_vit import tiny_vit  # noqa: PLC0415 (torch only for these tests)

    for ident, merge, batch, precision, vit_kw in EXPORTS:
        vit = tiny_vit(**vit_kw)
        vit.configure_merging(MergeConfig(**merge))
        path = out / f"{ident}.onnx"
        export_onnx(vit, path, batch, 17, precision, simplify=True)
        paths[ident] = path
    return paths


@pytest.mark.parametrize("ident", [e[0] for e in EXPORTS])
def test_exported_graphs_pass_every_target(exported: dict, ident: str) -> None:
    reports = check_onnx(exported[ident], ALL)
    for name, rep in reports.items():
        assert rep.ok, f"{ident} fails {name}: " + "; ".join(str(p) for p in rep.errors)
    model = onnx.load(str(exported[ident]))
    ops = {n.op_type for n in model.graph.node}
    assert {"ArgMin", "ArgMax"} <= ops  # the slic summary head's clustering and footprint
    assert ("TopK" in ops) == (not ident.startswith("unmerged"))  # merging
