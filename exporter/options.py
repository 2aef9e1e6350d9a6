"""What an export is asked to do: the validated option models ``ExportOptions`` and ``MergeConfig``.

Every option and its default is declared here, once, with its description (``tokenline-export export --help``
shows them). Unknown keys are rejected; a bad value raises ``OptionsError`` naming the key. Checks that need the
model (K against its patch count, the merge schedule) are made by ``ViT.configure_merging``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Dict, List, Literal, Optional

from pydantic import Field, ValidationError, field_validator, model_validator

from exporter.errors import OptionsError
from tokenline.documents import StrictModel

# largest abs difference of the global embedding between ONNX Runtime and torch, per precision
DEFAULT_TOLERANCE: Dict[str, float] = {"fp32": 1e-4, "fp16": 2e-2}


class _Options(StrictModel):
    """Strict, frozen options whose validation errors are ``OptionsError``."""

    what: ClassVar[str] = "options"

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise OptionsError(type(self).__name__, self.what, exc) from None


class MergeConfig(_Options):
    """Token merging and summary head settings (the static schedule is derived from these).

    At most one of ``r``, ``r_list`` and ``target`` is given; none of them: no merging.
    """

    what: ClassVar[str] = "merge settings"

    r: Optional[int] = Field(None, description="tokens merged in every block")
    r_list: Optional[List[int]] = Field(None, description="tokens merged per block (one entry per block)")
    target: Optional[int] = Field(None, description="patch tokens left after the last block")
    pre_r: int = Field(0, ge=0, description="tokens merged before the first block, on the patch embeddings")
    alpha: float = Field(0.0, description="Turbo's weight of semantic value on the reference scale, "
                                          "E = R - alpha * 30 * S (0 = ToMe)")
    floor: int = Field(0, description="fewest patch tokens a block may leave (0: K)")
    k: int = Field(16, description="summary tokens per image")
    summary_layer: Optional[int] = Field(None, ge=1, description="block whose output feeds the summary head "
                                         "(None: 2/3 of the depth, block 8 of 12)")
    summary_dim: int = Field(96, ge=0, description="summary token dimension after the PCA fitted on the calibration "
                             "images (0 or >= the width: centred only)")
    summary_iters: int = Field(3, ge=1, description="clustering iterations of the summary head")
    summary_lam: float = Field(0.5, ge=0, description="spatial weight of the summary head's clustering")
    budget: Optional[float] = Field(None, ge=0, description="choose the schedule: the fastest whose label-free loss "
                                    "on the calibration images stays within this many points (exporter.search)")
    summary_budget: Optional[float] = Field(None, ge=0, description="with budget: the summary tokens' label-free "
                                            "loss must stay within this many points too (exporter.search; for "
                                            "anomaly flagging, which scores the summary)")

    @model_validator(mode="after")
    def _one_way(self) -> "MergeConfig":
        if self.budget is not None and (self.r or self.r_list or self.target or self.pre_r):
            raise ValueError("budget chooses the schedule: give it without r, r_list, target or pre_r")
        if self.summary_budget is not None and self.budget is None:
            raise ValueError("summary_budget bounds the schedule search: give it with budget")
        return self

    @property
    def method(self) -> str:
        if not (self.r or self.r_list or self.target or self.pre_r):
            return "none"
        return "turbo" if self.alpha else "tome"

    def unmerged(self) -> "MergeConfig":
        """The same summary head without merging in the blocks: the reference encoder."""
        return MergeConfig(**{**self.model_dump(), "r": None, "r_list": None, "target": None, "pre_r": 0, "floor": 0,
                              "budget": None, "summary_budget": None})


class ExportOptions(_Options):
    """Where and how ``export_encoder`` writes and validates the ONNX files."""

    what: ClassVar[str] = "export options"

    out_dir: Path = Field(description="output directory")
    name: str = Field(description="model name in the manifest")
    precision: Literal["fp32", "fp16"] = Field("fp32", description="weights and activations of the graph")
    batch_sizes: List[int] = Field([1], description="fixed batch sizes, one file each; [] -> one dynamic-batch file")
    opset: int = Field(17, description="ONNX opset (>= 17)")
    simplify: bool = Field(True, description="onnxslim: folds shape arithmetic so fixed-batch graphs are fully static")
    calib_dir: Optional[Path] = Field(None, description="folder of calibration images (None: synthetic images)")
    calib_count: int = Field(16, ge=1, description="calibration images (spread over the folder)")
    export_unmerged: bool = Field(True, description="also write the unmerged encoder (reference for comparisons)")
    bench_runs: int = Field(5, ge=1, description="timed ONNX Runtime runs (median)")
    bench_batch: int = Field(8, ge=1, description="batch of the throughput runs for a dynamic-batch file")
    tolerance: Optional[float] = Field(None, ge=0, description="max abs error vs torch (None: "
                                     + ", ".join(f"{v:g} in {k}" for k, v in DEFAULT_TOLERANCE.items()) + ")")
    check_trt: bool = Field(True, description="run the TensorRT parser compatibility check")
    cpu_int8: bool = Field(False, description="also write encoder_int8 files: ONNX Runtime dynamic INT8 for CPU edges "
                           "(exporter.int8_cpu; not for TensorRT); with merge.budget the search measures merging and "
                           "INT8 together")
    cpu_int8_weight_bits: Literal[7, 8] = Field(8, description="the encoder_int8 files' weights: 8 bits (-127..127, "
                                                "the more accurate on ARM and on x86 CPUs with VNNI) or 7 (-64..64, "
                                                "exact on every CPU: x86 CPUs without VNNI saturate 8-bit products; "
                                                "runtime.cpu)")

    @field_validator("opset")
    @classmethod
    def _opset(cls, v: int) -> int:
        if v < 17:
            raise ValueError(f"opset {v} is too old: LayerNorm-era graphs need >= 17")
        return v

    @model_validator(mode="after")
    def _int8_from_fp32(self) -> "ExportOptions":
        if self.cpu_int8 and self.precision != "fp32":
            raise ValueError("cpu_int8 quantizes the fp32 graph: give it with precision fp32")
        if "cpu_int8_weight_bits" in self.model_fields_set and not self.cpu_int8:
            raise ValueError("cpu_int8_weight_bits sets the encoder_int8 files' weights: give it with cpu_int8")
        return self

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: List[int]) -> List[int]:
        if any(b < 1 for b in v):
            raise ValueError("batch sizes must be >= 1")
        return v

    @property
    def max_abs_error(self) -> float:
        """``tolerance``, or the precision's default."""
        return self.tolerance if self.tolerance is not None else DEFAULT_TOLERANCE[self.precision]
