"""What each TensorRT target's ONNX parser accepts, encoded as data (sources named per entry).

Sources (onnx/onnx-tensorrt, ``docs/operators.md`` and ``docs/Changelog.md``):

- TensorRT 8.5 (JetPack 5.1.x ships 8.5.2): branch ``release/8.5-GA``, ``docs/operators.md``: "TensorRT 8.5
  supports operators up to Opset 17"; INT64 is cast down to INT32 with clamping; restrictions column quoted below.
- TensorRT 8.6 (JetPack 6.0 ships 8.6.2): the 8.5 matrix plus the 8.6 EA changelog ("Added support for
  ``GroupNormalization``, ``LayerNormalization``, ``IsInf``", "``TopK`` operators with dynamic ``K`` values",
  INT32 for ArgMin/ArgMax/TopK); still "up to Opset 17".
- TensorRT 10.3 (JetPack 6.1/6.2): the 10.x matrix ("TensorRT 10.0 supports operators in the inclusive range of
  opset 9 to opset 20") minus operators the changelog adds later: BlackmanWindow/HammingWindow/HannWindow (10.4),
  STFT (10.5), Attention (10.14), RotaryEmbedding/RMSNormalization/TensorScatter (10.15). INT64 is native since
  9.0 ("The ONNX parser no longer automatically casts INT64 to INT32"); ScatterElements ``reduction`` since 10.0
  (plugin, updated in 10.3).
- TensorRT 10.x latest documented (10.15): "opset 9 to opset 24"; TopK "``sorted`` must be 1. ``K`` input must
  be less than 3840"; ScatterND "``reduction`` other than ``none`` is not supported".

Targets are looked up by name in ``TARGETS``; ``jetpack5``, ``jetpack6`` and ``trt10`` are the ones checked by
default, ``trt86`` covers JetPack 6.0 and x86 TensorRT 8.6.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Mapping, Optional, Tuple

# --- operator matrices ("Supported: Y" rows) ------------------------------------------------------------------

_TRT85 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GRU HardSwish HardSigmoid Identity If ImageScaler
InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

_TRT86 = _TRT85 | {"GroupNormalization", "LayerNormalization", "IsInf"}

_TRT10_LATEST = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression
NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

_ADDED_AFTER_10_3 = frozenset(
    {"BlackmanWindow", "HammingWindow", "HannWindow", "STFT", "Attention", "RotaryEmbedding", "RMSNormalization",
     "TensorScatter"}
)
_TRT103 = _TRT10_LATEST - _ADDED_AFTER_10_3

# --- inputs that must be build-time constants (op type -> input indices), from the Restrictions column ---------

_CONST_85: Dict[str, Tuple[int, ...]] = {
    "TopK": (1,),  # "`K` input must be an initializer"
    "CumSum": (1,),  # "`axis` must be an initializer"
    "Slice": (3,),  # "`axes` must be an initializer"
    "Squeeze": (1,),  # "`axes` must be an initializer"
    "Unsqueeze": (1,),  # "`axes` must be a constant tensor"
    "QuantizeLinear": (1, 2),  # scale / zero point: TensorRT builds Q/DQ scales into the engine
    "DequantizeLinear": (1, 2),
}
_CONST_86 = {k: v for k, v in _CONST_85.items() if k != "TopK"}  # 8.6 EA: "TopK operators with dynamic K values"
_REDUCE_AXES = {op: (1,) for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                     "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")}
_CONST_10: Dict[str, Tuple[int, ...]] = {
    "CumSum": (1,),  # "`axis` must be a build-time constant"
    "Squeeze": (1,),  # "`axes` must be resolvable to a constant"
    "Unsqueeze": (1,),
    "OneHot": (1,),  # "`depth` must be a build-time constant"
    "Dropout": (2,),  # "`is_training` must be an initializer and evaluate to False"
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
    **_REDUCE_AXES,  # "`axes` must be an initializer"
}


@dataclass(frozen=True)
class TargetSpec:
    """One TensorRT version as the checker sees it."""

    name: str
    description: str
    trt_version: str
    opset_min: int
    opset_max: int
    ops: FrozenSet[str]
    const_inputs: Mapping[str, Tuple[int, ...]]
    int64_narrowed: bool  # TensorRT < 9 casts INT64 to INT32, clamping to +-INT_MAX
    scatter_elements_reduction: bool  # ScatterElements `reduction` != none parses (10.0+)
    topk_max_k: Optional[int]  # K must be below this (10.x: 3840)
    topk_sorted_required: bool  # 10.x: "`sorted` must be 1"
    local_functions: bool  # model-local functions are expanded by the parser (9.0+)
    max_ir_version: int  # IR version of the ONNX release the parser was built against
    qdq_types: FrozenSet[int] = field(default_factory=lambda: frozenset({3}))  # onnx TensorProto INT8
    notes: Tuple[str, ...] = ()


TARGETS: Dict[str, TargetSpec] = {
    "jetpack5": TargetSpec(
        name="jetpack5", description="JetPack 5.1 (TensorRT 8.5)", trt_version="8.5",
        opset_min=1, opset_max=17, ops=_TRT85, const_inputs=_CONST_85, int64_narrowed=True,
        scatter_elements_reduction=False, topk_max_k=None, topk_sorted_required=False, local_functions=False,
        max_ir_version=8,  # onnx 1.12 submodule
    ),
    "trt86": TargetSpec(
        name="trt86", description="JetPack 6.0 / x86 (TensorRT 8.6)", trt_version="8.6",
        opset_min=1, opset_max=17, ops=_TRT86, const_inputs=_CONST_86, int64_narrowed=True,
        scatter_elements_reduction=False, topk_max_k=None, topk_sorted_required=False, local_functions=False,
        max_ir_version=8,  # onnx 1.13.1 submodule
    ),
    "jetpack6": TargetSpec(
        name="jetpack6", description="JetPack 6.1/6.2 (TensorRT 10.3)", trt_version="10.3",
        opset_min=9, opset_max=20, ops=_TRT103, const_inputs=_CONST_10, int64_narrowed=False,
        scatter_elements_reduction=True, topk_max_k=3840, topk_sorted_required=True, local_functions=True,
        max_ir_version=10,  # onnx 1.16 submodule
        qdq_types=frozenset({3, 17, 22}),  # INT8, FLOAT8E4M3FN, INT4
    ),
    "trt10": TargetSpec(
        name="trt10", description="TensorRT 10.x (latest documented: 10.15)", trt_version="10.15",
        opset_min=9, opset_max=24, ops=_TRT10_LATEST, const_inputs=_CONST_10, int64_narrowed=False,
        scatter_elements_reduction=True, topk_max_k=3840, topk_sorted_required=True, local_functions=True,
        max_ir_version=11,
        qdq_types=frozenset({3, 17, 22, 23}),  # INT8, FLOAT8E4M3FN, INT4, FLOAT4E2M1
    ),
}

DEFAULT_TARGETS: Tuple[str, ...] = ("jetpack5", "jetpack6", "trt10")
