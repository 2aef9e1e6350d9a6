"""TensorRT engines at run time: the sidecar that describes an engine, checking it against this machine, loading.

An engine only runs in the TensorRT version and on the GPU that built it; the exporter (``exporter.trt.engine``)
builds it and writes its sidecar ``<engine>.json`` with ``write_sidecar``. ``verify_engine`` reads the sidecar and
lists every reason the engine must not run here (other TensorRT, other GPU, engine file or source ONNX changed,
other manifest) with the command that rebuilds it; ``load_engine`` deserialises only a verified engine. The
sidecar logic is pure and tested without TensorRT; ``probe_runtime`` asks the machine (TensorRT version, GPU through
the CUDA driver). TensorRT's documented Python API, 8.5 (JetPack 5) to 10.x (JetPack 6); Python 3.8+, no torch.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from runtime.cuda import CudaError, CudaUnavailable, device_info
from tokenline.manifest import sha256_file

log = logging.getLogger(__name__)

SIDECAR_SCHEMA = "tokenline.engine/1"


class EngineError(RuntimeError):
    """An engine cannot be built or loaded."""


class EngineMismatch(EngineError):
    """An engine exists but was built for another TensorRT/GPU/model, or its file changed since it was built."""

    def __init__(self, engine: Path, reasons: Sequence[str], rebuild_hint: str) -> None:
        self.engine = Path(engine)
        self.reasons = list(reasons)
        msg = f"refusing TensorRT engine {engine}:\n" + "\n".join(f"  - {r}" for r in reasons)
        super().__init__(f"{msg}\n{rebuild_hint}")


@dataclass(frozen=True)
class RuntimeInfo:
    """What an engine depends on: TensorRT version and the GPU (name, compute capability)."""

    trt_version: str
    gpu_name: str
    compute_capability: Tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"


# ---------------------------------------------------------------------------------------------------------------
# the sidecar (pure)


@dataclass(frozen=True)
class Sidecar:
    """Metadata written next to an engine (``<engine>.json``)."""

    model: str
    precision: str  # "fp32" | "fp16" | "int8"
    batch_sizes: List[int]
    trt_version: str
    gpu_name: str
    compute_capability: List[int]
    build_flags: Dict[str, Any]
    engine_sha256: str
    onnx_sha256: str
    onnx_file: str
    manifest_hash: Optional[str]
    created_at: str
    schema: str = SIDECAR_SCHEMA
    io: List[Dict[str, Any]] = field(default_factory=list)  # name, mode, dtype, shape as TensorRT reports them

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Dict[str, Any], where: str) -> "Sidecar":
        if not isinstance(data, dict):
            raise EngineError(f"{where}: sidecar must be a JSON object")
        if data.get("schema") != SIDECAR_SCHEMA:
            raise EngineError(f"{where}: sidecar schema {data.get('schema')!r}, expected {SIDECAR_SCHEMA!r}")
        names = {f for f in cls.__dataclass_fields__}
        missing = sorted(n for n in names if n not in data and n not in ("schema", "io"))
        extra = sorted(k for k in data if k not in names)
        if missing or extra:
            raise EngineError(f"{where}: sidecar keys missing {missing} / unknown {extra}")
        try:
            sc = cls(**data)
            cc = [int(v) for v in sc.compute_capability]
        except (TypeError, ValueError) as exc:
            raise EngineError(f"{where}: malformed sidecar ({exc})") from None
        if len(cc) != 2:
            raise EngineError(f"{where}: compute_capability must be [major, minor]")
        for key in ("engine_sha256", "onnx_sha256"):
            if not re.fullmatch(r"[0-9a-f]{64}", str(getattr(sc, key))):
                raise EngineError(f"{where}: {key} is not a sha256 hex digest")
        return sc


def sidecar_path(engine: Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def write_sidecar(engine: Path, sidecar: Sidecar) -> Path:
    path = sidecar_path(engine)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(sidecar.to_json(), encoding="utf-8")
    tmp.replace(path)
    return path


def read_sidecar(engine: Path) -> Sidecar:
    path = sidecar_path(engine)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EngineError(f"{engine}: no sidecar {path.name} next to it (engines built elsewhere cannot be "
                          "verified; rebuild it with `tokenline-export build-engine`)") from None
    except OSError as exc:
        raise EngineError(f"{path}: cannot read sidecar ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EngineError(f"{path}: sidecar is not JSON ({exc})") from None
    return Sidecar.from_dict(data, str(path))


def rebuild_hint(sidecar: Optional[Sidecar], engine: Path) -> str:
    model_dir = engine.parent
    onnx_file = sidecar.onnx_file if sidecar else "<model.onnx>"
    prec = sidecar.precision if sidecar else "fp16"
    batches = ",".join(str(b) for b in sidecar.batch_sizes) if sidecar else "1"
    return (f"Rebuild it on this device: tokenline-export build-engine {model_dir / onnx_file} --precision {prec} "
            f"--batch {batches} --out {model_dir}  (or let the engine cache rebuild it: --rebuild-on-mismatch)")


def mismatches(sidecar: Sidecar, runtime: RuntimeInfo, engine_sha256: Optional[str] = None,
               onnx_sha256: Optional[str] = None, manifest_hash: Optional[str] = None) -> List[str]:
    """Every reason the engine described by ``sidecar`` must not run here (empty list: it may)."""
    out: List[str] = []
    if sidecar.trt_version != runtime.trt_version:
        out.append(f"built with TensorRT {sidecar.trt_version}, this runtime is TensorRT {runtime.trt_version} "
                   "(engines only load in the exact TensorRT version that built them)")
    if sidecar.gpu_name != runtime.gpu_name or tuple(sidecar.compute_capability) != runtime.compute_capability:
        cc = ".".join(str(v) for v in sidecar.compute_capability)
        out.append(f"built for GPU {sidecar.gpu_name!r} (compute {cc}), this device is {runtime.gpu_name!r} "
                   f"(compute {runtime.compute_capability[0]}.{runtime.compute_capability[1]})")
    if engine_sha256 is not None and engine_sha256 != sidecar.engine_sha256:
        out.append(f"engine file sha256 {engine_sha256[:12]}... differs from the sidecar's "
                   f"{sidecar.engine_sha256[:12]}... (file changed or truncated after the build)")
    if onnx_sha256 is not None and onnx_sha256 != sidecar.onnx_sha256:
        out.append(f"source ONNX sha256 {onnx_sha256[:12]}... differs from the one the engine was built from "
                   f"({sidecar.onnx_sha256[:12]}...)")
    if manifest_hash is not None and sidecar.manifest_hash is not None and manifest_hash != sidecar.manifest_hash:
        out.append(f"manifest hash {manifest_hash[:12]}... differs from the engine's {sidecar.manifest_hash[:12]}...")
    return out


def verify_engine(engine: Path, runtime: RuntimeInfo, onnx_path: Optional[Path] = None,
                  manifest_hash: Optional[str] = None) -> Sidecar:
    """Read the sidecar and hash the engine (and ONNX when given); raise EngineMismatch unless all agree."""
    engine = Path(engine)
    if not engine.is_file():
        raise EngineError(f"{engine}: no such engine file")
    sc = read_sidecar(engine)
    onnx_sha = sha256_file(onnx_path) if onnx_path is not None and Path(onnx_path).is_file() else None
    reasons = mismatches(sc, runtime, sha256_file(engine), onnx_sha, manifest_hash)
    if reasons:
        raise EngineMismatch(engine, reasons, rebuild_hint(sc, engine))
    return sc


# ---------------------------------------------------------------------------------------------------------------
# the machine


def probe_gpu(index: int = 0) -> Tuple[str, Tuple[int, int]]:
    """GPU name and compute capability of device ``index``."""
    try:
        return device_info(index)
    except CudaUnavailable:
        raise EngineError("no NVIDIA driver (libcuda) on this machine: TensorRT engines need an NVIDIA GPU") from None
    except CudaError as exc:
        raise EngineError(str(exc)) from None


def import_tensorrt():
    """The ``tensorrt`` module; EngineError saying how to install it when it is missing."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError:
        raise EngineError("TensorRT's Python bindings are not installed (on a Jetson they come with JetPack: "
                          "`sudo apt install python3-libnvinfer`; see docs/jetson.md)") from None
    return trt


def probe_runtime(device: int = 0) -> RuntimeInfo:
    """The running TensorRT version and GPU. Raises EngineError when TensorRT or the GPU is missing."""
    trt = import_tensorrt()
    name, cc = probe_gpu(device)
    return RuntimeInfo(trt_version=str(trt.__version__), gpu_name=name, compute_capability=cc)


# ---------------------------------------------------------------------------------------------------------------
# TensorRT: logger, I/O listing, load


def trt_logger(trt):
    """A trt.ILogger that forwards TensorRT's messages to ``logging`` (the base class lives in tensorrt)."""

    class Bridge(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:  # noqa: D401 - TensorRT callback
            S = trt.ILogger.Severity
            level = {S.INTERNAL_ERROR: logging.CRITICAL, S.ERROR: logging.ERROR, S.WARNING: logging.WARNING,
                     S.INFO: logging.INFO}.get(severity, logging.DEBUG)
            log.log(level, "TensorRT: %s", msg)

    return Bridge()


def engine_io(engine) -> List[Dict[str, Any]]:
    """I/O tensors through the tensor-name API (TensorRT 8.5+; the binding API is gone in 10)."""
    trt = import_tensorrt()
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        out.append({"name": name, "mode": "input" if mode == trt.TensorIOMode.INPUT else "output",
                    "dtype": str(engine.get_tensor_dtype(name)).split(".")[-1],
                    "shape": [int(d) for d in engine.get_tensor_shape(name)]})
    return out


@dataclass
class LoadedEngine:
    """A deserialised engine with its verified sidecar; keep ``runtime`` alive as long as the engine."""

    path: Path
    sidecar: Sidecar
    engine: Any  # tensorrt.ICudaEngine
    runtime: Any  # tensorrt.Runtime
    io: List[Dict[str, Any]]

    def create_execution_context(self):
        return self.engine.create_execution_context()


def load_engine(engine_path: Path, onnx_path: Optional[Path] = None, manifest_hash: Optional[str] = None,
                runtime: Optional[RuntimeInfo] = None) -> LoadedEngine:
    """Verify the sidecar against this machine and the file hashes, then deserialise. Raises EngineMismatch."""
    trt = import_tensorrt()
    runtime = runtime or probe_runtime()
    engine_path = Path(engine_path)
    sc = verify_engine(engine_path, runtime, onnx_path, manifest_hash)
    trt_runtime = trt.Runtime(trt_logger(trt))
    engine = trt_runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise EngineError(f"TensorRT could not deserialise {engine_path}. {rebuild_hint(sc, engine_path)}")
    return LoadedEngine(engine_path, sc, engine, trt_runtime, engine_io(engine))
