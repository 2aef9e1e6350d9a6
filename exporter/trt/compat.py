"""TensorRT compatibility check of an ONNX model, per target, without TensorRT (pure ``onnx``).

``check_onnx(model)`` walks every node (subgraphs of If/Loop/Scan and model-local functions included) and
reports, per target in ``exporter.trt.operators.TARGETS``, what would stop the TensorRT ONNX parser or change
results: opset range, operators outside the target's support matrix, custom domains, inputs that must be
build-time constants (TopK's K, axes, Q/DQ scales), dynamic shapes where the engine needs static ones, TopK
limits, scatter reductions, Q/DQ zero points and types, Resize modes, INT64 narrowing (TensorRT 8.x), DOUBLE
narrowing and float constants that overflow FP16. Errors make ``Report.ok`` false; warnings do not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from exporter.trt.operators import DEFAULT_TARGETS, TARGETS, TargetSpec

log = logging.getLogger(__name__)

ERROR = "error"
WARNING = "warning"
INT32_MAX = 2**31 - 1
FP16_MAX = 65504.0
_DEFAULT_DOMAINS = ("", "ai.onnx")
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE)


@dataclass(frozen=True)
class Problem:
    """One finding: what kind, where (node name / op type, empty for graph-level), and why."""

    kind: str
    node: str
    op_type: str
    message: str
    severity: str = ERROR

    def __str__(self) -> str:
        where = f"{self.op_type} {self.node!r}: " if self.op_type or self.node else ""
        return f"[{self.severity}] {self.kind}: {where}{self.message}"


@dataclass
class Report:
    """The verdict for one target: ``ok`` when no problem is an error."""

    target: str
    description: str
    problems: List[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> List[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> List[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    def kinds(self) -> Set[str]:
        return {p.kind for p in self.problems}


class CompatError(ValueError):
    """The model cannot be read or a target name is unknown."""


# ---------------------------------------------------------------------------------------------------------------
# graph walking


@dataclass(frozen=True)
class _Scope:
    """A graph (main, subgraph or function body) and what is known about its tensors."""

    path: str  # "" for the main graph, "If 'n'/then_branch", "function pkg.F"
    nodes: Sequence[onnx.NodeProto]


def _subgraphs(node: onnx.NodeProto) -> Iterator[Tuple[str, onnx.GraphProto]]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", g


def _walk_graph(graph: onnx.GraphProto, path: str = "") -> Iterator[Tuple[_Scope, onnx.GraphProto]]:
    yield _Scope(path, graph.node), graph
    for node in graph.node:
        for attr_name, sub in _subgraphs(node):
            yield from _walk_graph(sub, f"{path}{node.op_type} {node.name!r}/{attr_name}/")


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _qualified(scope: _Scope, node: onnx.NodeProto) -> str:
    return f"{scope.path}{node.name}" if scope.path else node.name


# ---------------------------------------------------------------------------------------------------------------
# facts about tensors, shared by all targets


@dataclass
class _Facts:
    model: onnx.ModelProto
    opset: int
    initializers: Dict[str, onnx.TensorProto]
    strict_const: Set[str]  # initializers and Constant outputs (what "must be an initializer" accepts)
    derived_const: Set[str]  # computable from constants and static shapes only
    dtypes: Dict[str, int]
    shapes: Dict[str, Optional[Tuple[Optional[int], ...]]]
    functions: Dict[Tuple[str, str], onnx.FunctionProto]


def _load(model: Union[str, Path, onnx.ModelProto]) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    p = Path(model)
    if not p.is_file():
        raise CompatError(f"{p}: no such ONNX file")
    try:
        return onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise CompatError(f"{p}: not a readable ONNX model ({exc})") from None


def _value_info(vi: onnx.ValueInfoProto) -> Tuple[int, Optional[Tuple[Optional[int], ...]]]:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return tt.elem_type, None
    return tt.elem_type, tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)


def _facts(model: onnx.ModelProto) -> _Facts:
    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference is best effort
        log.warning("ONNX shape inference failed (%s); shape and type checks are limited", exc)
        inferred = model
    dtypes: Dict[str, int] = {}
    shapes: Dict[str, Optional[Tuple[Optional[int], ...]]] = {}
    initializers: Dict[str, onnx.TensorProto] = {}
    for scope_graph in (g for _, g in _walk_graph(inferred.graph)):
        for vi in list(scope_graph.input) + list(scope_graph.output) + list(scope_graph.value_info):
            dtypes[vi.name], shapes[vi.name] = _value_info(vi)
        for init in scope_graph.initializer:
            initializers[init.name] = init
            dtypes[init.name], shapes[init.name] = init.data_type, tuple(init.dims)
    strict: Set[str] = set(initializers)
    derived: Set[str] = set(initializers)
    for _, graph in _walk_graph(model.graph):
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                strict.update(node.output)
                derived.update(node.output)
    # propagate: a node whose inputs are all constants (or whose shape-only input is static) is constant
    changed = True
    while changed:
        changed = False
        for _, graph in _walk_graph(model.graph):
            for node in graph.node:
                if all(o in derived for o in node.output) or _subgraphs_present(node):
                    continue
                ins = [i for i in node.input if i]
                if node.op_type in ("Shape", "Size"):
                    shp = shapes.get(ins[0]) if ins else None
                    const = shp is not None and all(d is not None for d in shp)
                elif node.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"):
                    const = False
                else:
                    const = all(i in derived for i in ins)
                if const:
                    derived.update(o for o in node.output if o)
                    if node.op_type == "Identity" and ins and ins[0] in strict:
                        strict.update(node.output)
                    changed = True
    functions = {(f.domain, f.name): f for f in model.functions}
    return _Facts(model, opset, initializers, strict, derived, dtypes, shapes, functions)


def _subgraphs_present(node: onnx.NodeProto) -> bool:
    return any(True for _ in _subgraphs(node))


def _const_value(facts: _Facts, name: str, scope_nodes: Sequence[onnx.NodeProto]) -> Optional[np.ndarray]:
    if name in facts.initializers:
        return numpy_helper.to_array(facts.initializers[name])
    for node in scope_nodes:
        if node.op_type == "Constant" and name in node.output:
            value = _attr(node, "value")
            if isinstance(value, onnx.TensorProto):
                return numpy_helper.to_array(value)
            for key in ("value_int", "value_float"):
                v = _attr(node, key)
                if v is not None:
                    return np.asarray(v)
            for key in ("value_ints", "value_floats"):
                v = _attr(node, key)
                if v is not None:
                    return np.asarray(v)
    return None


def _const_value_any(facts: _Facts, name: str) -> Optional[np.ndarray]:
    if name in facts.initializers:
        return numpy_helper.to_array(facts.initializers[name])
    for _, graph in _walk_graph(facts.model.graph):
        v = _const_value(facts, name, graph.node)
        if v is not None:
            return v
    return None


# ---------------------------------------------------------------------------------------------------------------
# the checks


def _check_model_level(facts: _Facts, t: TargetSpec) -> Iterator[Problem]:
    m = facts.model
    if not t.opset_min <= facts.opset <= t.opset_max:
        yield Problem("opset", "", "", f"default-domain opset {facts.opset} is outside TensorRT {t.trt_version}'s "
                      f"range {t.opset_min}..{t.opset_max}; re-export with --opset {min(17, t.opset_max)}")
    if m.ir_version > t.max_ir_version:
        yield Problem("ir_version", "", "", f"IR version {m.ir_version} is newer than the ONNX release TensorRT "
                      f"{t.trt_version} was built with (IR {t.max_ir_version}); if the parser refuses it, set "
                      f"model.ir_version = {t.max_ir_version}", WARNING)
    if m.functions and not t.local_functions:
        names = ", ".join(f.name for f in m.functions)
        yield Problem("local_function", "", "", f"model-local functions ({names}) are not expanded by TensorRT "
                      f"{t.trt_version}'s parser (9.0+); inline them (onnx.inliner.inline_local_functions)")
    for vi in m.graph.input:
        if vi.name in facts.initializers:
            continue
        dtype, shape = _value_info(vi)
        if shape is None:
            yield Problem("dynamic_shape", vi.name, "", f"graph input {vi.name!r} has no shape (unknown rank); "
                          "TensorRT needs the rank and all non-batch dimensions fixed")
            continue
        dyn = [i for i, d in enumerate(shape) if d is None]
        if any(i != 0 for i in dyn):
            yield Problem("dynamic_shape", vi.name, "", f"graph input {vi.name!r} {_fmt_shape(shape)} has dynamic "
                          f"non-batch axes {[i for i in dyn if i]}; engines are built with optimization profiles "
                          "over the batch axis only: export with a fixed image size")
    for vi in list(m.graph.input) + list(m.graph.output):
        dtype, _ = _value_info(vi)
        if dtype == TensorProto.INT64 and t.int64_narrowed:
            yield Problem("int64_io", vi.name, "", f"graph I/O {vi.name!r} is INT64: TensorRT {t.trt_version} "
                          "binds it as INT32 (the caller must pass int32 buffers)", WARNING)
        if dtype == TensorProto.DOUBLE:
            yield Problem("double", vi.name, "", f"graph I/O {vi.name!r} is DOUBLE: TensorRT casts it to FLOAT",
                          WARNING)


def _fmt_shape(shape: Sequence[Optional[int]]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _check_initializers(facts: _Facts, t: TargetSpec) -> Iterator[Problem]:
    narrowed: List[str] = []
    for name, init in facts.initializers.items():
        if init.data_type == TensorProto.INT64 and t.int64_narrowed:
            arr = numpy_helper.to_array(init)
            narrowed.append(name)
            if arr.size and (arr.max() > INT32_MAX or arr.min() < -INT32_MAX - 1):
                big = arr[(arr > INT32_MAX) | (arr < -INT32_MAX - 1)]
                # INT64_MAX / INT64_MIN as "to the end" in Slice ends are clamped harmlessly
                if not np.all(np.abs(big) >= 2**62):
                    yield Problem("int64_overflow", name, "", f"INT64 initializer {name!r} holds values outside "
                                  f"the INT32 range (e.g. {int(big.flat[0])}); TensorRT {t.trt_version} clamps "
                                  "them, which changes results")
        elif init.data_type == TensorProto.DOUBLE:
            yield Problem("double", name, "", f"DOUBLE initializer {name!r}: TensorRT casts it to FLOAT", WARNING)
        elif init.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(init)
            finite = arr[np.isfinite(arr)] if arr.size else arr
            if finite.size and float(np.abs(finite).max()) > FP16_MAX:
                yield Problem("fp16_range", name, "", f"FLOAT initializer {name!r} holds |x| up to "
                              f"{float(np.abs(finite).max()):.3g} > 65504: an FP16 engine saturates it (use -inf or "
                              "a smaller sentinel for masks)", WARNING)
    computed = [n for n, d in facts.dtypes.items() if d == TensorProto.INT64 and n not in facts.initializers]
    if t.int64_narrowed and (narrowed or computed):
        shown = ", ".join(repr(n) for n in (narrowed + computed)[:5]) + (" ..." if len(narrowed) + len(computed) > 5
                                                                      else "")
        yield Problem("int64", "", "", f"{len(narrowed)} INT64 initializer(s) and {len(computed)} computed INT64 "
                      f"tensor(s) ({shown}) are narrowed to INT32 by TensorRT {t.trt_version}; constants are in "
                      "range, so results are unchanged as long as indices stay below 2**31", WARNING)


def _check_node(facts: _Facts, t: TargetSpec, scope: _Scope, node: onnx.NodeProto) -> Iterator[Problem]:
    name, op = _qualified(scope, node), node.op_type
    if node.domain not in _DEFAULT_DOMAINS:
        fn = facts.functions.get((node.domain, op))
        if fn is not None:
            return  # the function body is checked on its own; model-level check covers expansion support
        yield Problem("custom_domain", name, op, f"operator {node.domain}::{op} is not an ONNX operator; TensorRT "
                      "needs a plugin registered under that name (ONNX Runtime contrib ops are not available)")
        return
    if op not in t.ops:
        fn = facts.functions.get(("", op))
        if fn is None:
            yield Problem("unsupported_op", name, op, f"{op} is not in TensorRT {t.trt_version}'s ONNX operator "
                          "support matrix")
            return
    for idx in t.const_inputs.get(op, ()):
        if idx < len(node.input) and node.input[idx]:
            tensor = node.input[idx]
            if tensor in facts.strict_const:
                continue
            if tensor in facts.derived_const:
                yield Problem("non_constant_input", name, op, f"input {idx} ({tensor!r}) is computed from constants "
                              "but is not an initializer; fold constants (onnxslim / polygraphy surgeon sanitize "
                              "--fold-constants) so TensorRT sees it as one", WARNING)
            else:
                yield Problem("non_constant_input", name, op, f"input {idx} ({tensor!r}) must be a build-time "
                              f"constant for TensorRT {t.trt_version} but depends on the network input")
    yield from _check_op_specific(facts, t, scope, node, name, op)


def _check_op_specific(facts: _Facts, t: TargetSpec, scope: _Scope, node: onnx.NodeProto, name: str,
                       op: str) -> Iterator[Problem]:
    if op == "TopK":
        k_name = node.input[1] if len(node.input) > 1 else ""
        k = _const_value(facts, k_name, scope.nodes) if k_name else None
        if k is None and k_name:
            k = _const_value_any(facts, k_name)
        if k is None and "TopK" not in t.const_inputs:
            yield Problem("topk_dynamic_k", name, op, f"K ({k_name!r}) is not a constant: the output shape is "
                          "data-dependent" + (f" and K < {t.topk_max_k} cannot be verified" if t.topk_max_k else ""),
                          WARNING if k_name in facts.derived_const else ERROR)
        if k is not None and t.topk_max_k is not None and int(np.asarray(k).reshape(-1)[0]) >= t.topk_max_k:
            yield Problem("topk_k_limit", name, op, f"K = {int(np.asarray(k).reshape(-1)[0])} but TensorRT "
                          f"{t.trt_version} requires K < {t.topk_max_k}")
        if t.topk_sorted_required and int(_attr(node, "sorted", 1)) != 1:
            yield Problem("topk_sorted", name, op, f"sorted=0 is not supported by TensorRT {t.trt_version}")
        in_type = facts.dtypes.get(node.input[0])
        if t.trt_version == "8.5" and in_type not in (None, 0, TensorProto.FLOAT, TensorProto.FLOAT16):
            yield Problem("unsupported_type", name, op, f"TopK on {TensorProto.DataType.Name(in_type)} input: "
                          "TensorRT 8.5 supports FP32/FP16 only (INT32 from 8.6)")
    elif op == "ScatterElements":
        reduction = _attr(node, "reduction", b"none")
        reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
        if reduction != "none" and not t.scatter_elements_reduction:
            yield Problem("scatter_reduction", name, op, f"reduction={reduction!r} is not supported before TensorRT "
                          "10.0 (and wrong results were reported on 8.6): express the merge as a one-hot MatMul")
    elif op == "ScatterND":
        reduction = _attr(node, "reduction", b"none")
        reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
        if reduction != "none":
            yield Problem("scatter_reduction", name, op, f"reduction={reduction!r}: TensorRT's ScatterND supports "
                          "no reduction on any version")
    elif op in ("QuantizeLinear", "DequantizeLinear"):
        zp_idx = 2
        if len(node.input) > zp_idx and node.input[zp_idx]:
            zp = _const_value(facts, node.input[zp_idx], scope.nodes)
            if zp is None:
                zp = _const_value_any(facts, node.input[zp_idx])
            if zp is not None and np.any(zp != 0):
                yield Problem("qdq_zero_point", name, op, "zero point is not 0: TensorRT supports symmetric "
                              "quantization only (quantize with ActivationSymmetric/WeightSymmetric)")
            zp_type = facts.dtypes.get(node.input[zp_idx])
            if zp_type and zp_type not in t.qdq_types:
                yield Problem("qdq_type", name, op, f"quantized type {TensorProto.DataType.Name(zp_type)} is not "
                              f"supported by TensorRT {t.trt_version} (INT8 symmetric is)")
    elif op == "Resize":
        mode = _attr(node, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in ("nearest", "linear"):
            yield Problem("resize_mode", name, op, f"mode={mode!r}: TensorRT supports nearest and linear only")
        ctm = _attr(node, "coordinate_transformation_mode", b"half_pixel")
        ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
        if ctm not in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"):
            yield Problem("resize_mode", name, op, f"coordinate_transformation_mode={ctm!r} is not supported")
        if int(_attr(node, "antialias", 0)):
            yield Problem("resize_mode", name, op, "antialias=1 is not supported")
    elif op == "MaxPool":
        if len(node.output) > 1 and node.output[1]:
            yield Problem("unsupported_output", name, op, "the Indices output of MaxPool is not supported")
    elif op in ("ReverseSequence",) and t.trt_version == "8.5":
        shp = facts.shapes.get(node.input[0])
        if shp is None or any(d is None for d in shp):
            yield Problem("dynamic_shape", name, op, "ReverseSequence with dynamic input shape is unsupported on 8.5")
    elif op == "EyeLike" and not t.int64_narrowed:
        shp = facts.shapes.get(node.input[0])
        if shp is None or any(d is None for d in shp):
            yield Problem("dynamic_shape", name, op, "EyeLike needs an input with static dimensions")
    elif op == "Cast":
        if int(_attr(node, "to", 0)) == TensorProto.DOUBLE:
            yield Problem("double", name, op, "Cast to DOUBLE: TensorRT computes it in FLOAT", WARNING)


def _check_functions(facts: _Facts, t: TargetSpec) -> Iterator[Problem]:
    for fn in facts.model.functions:
        scope = _Scope(f"function {fn.domain}.{fn.name}/", fn.node)
        for node in fn.node:
            yield from _check_node(facts, t, scope, node)
            for attr_name, sub in _subgraphs(node):
                for sub_scope, _ in _walk_graph(sub, f"{scope.path}{node.op_type} {node.name!r}/{attr_name}/"):
                    for n in sub_scope.nodes:
                        yield from _check_node(facts, t, sub_scope, n)


def check_target(facts: _Facts, t: TargetSpec) -> Report:
    """All findings for one target."""
    rep = Report(target=t.name, description=t.description)
    rep.problems.extend(_check_model_level(facts, t))
    rep.problems.extend(_check_initializers(facts, t))
    for scope, _ in _walk_graph(facts.model.graph):
        for node in scope.nodes:
            rep.problems.extend(_check_node(facts, t, scope, node))
    rep.problems.extend(_check_functions(facts, t))
    return rep


def check_onnx(model: Union[str, Path, onnx.ModelProto],
               targets: Iterable[str] = DEFAULT_TARGETS) -> Dict[str, Report]:
    """Check ``model`` (path or ModelProto) against each target; returns {target: Report} in the given order."""
    names = list(targets)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise CompatError(f"unknown TensorRT target(s) {unknown}; known: {sorted(TARGETS)}")
    facts = _facts(_load(model))
    return {n: check_target(facts, TARGETS[n]) for n in names}


def format_reports(reports: Dict[str, Report], max_problems: int = 20) -> str:
    """Plain-text verdict (for logs); the CLI renders the same data as a rich table."""
    lines = []
    for name, rep in reports.items():
        lines.append(f"{name} ({rep.description}): {'ok' if rep.ok else 'FAILS'} "
                     f"({len(rep.errors)} error(s), {len(rep.warnings)} warning(s))")
        lines.extend(f"  {p}" for p in rep.problems[:max_problems])
        if len(rep.problems) > max_problems:
            lines.append(f"  ... {len(rep.problems) - max_problems} more")
    return "\n".join(lines)
