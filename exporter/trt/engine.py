"""TensorRT engines: build from ONNX, name, describe in a sidecar JSON, and load only when they match.

Self-contained on purpose (no torch, no other ``exporter`` module, Python 3.10): the edge agent may vendor this
file. TensorRT-independent logic - naming, the sidecar, checking a sidecar against the running runtime, the
cache decision - is made of pure functions tested without TensorRT. ``probe_runtime`` asks the machine (TensorRT
version, GPU name and compute capability through the CUDA driver); ``build_engine`` and ``load_engine`` use
TensorRT's documented Python API and support TensorRT 8.5 (JetPack 5), 8.6 and 10.x (JetPack 6).

The engine file is exactly what TensorRT serialised (trtexec and DeepStream load it); metadata lives next to it
in ``<engine>.json``.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

SIDECAR_SCHEMA = "tokenline.engine/1"
Precision = str  # "fp16" | "int8" | "fp32"
PRECISIONS = ("fp32", "fp16", "int8")


class EngineError(RuntimeError):
    """An engine cannot be built or loaded."""


class EngineMismatch(EngineError):
    """An engine exists but was built for another TensorRT/GPU/model, or its file changed since it was built."""

    def __init__(self, engine: Path, reasons: Sequence[str], rebuild_hint: str) -> None:
        self.engine = Path(engine)
        self.reasons = list(reasons)
        msg = f"refusing TensorRT engine {engine}:\n" + "\n".join(f"  - {r}" for r in reasons)
        super().__init__(f"{msg}\n{rebuild_hint}")


# ---------------------------------------------------------------------------------------------------------------
# pure: runtime description, names, sidecar, validation, cache policy


@dataclass(frozen=True)
class RuntimeInfo:
    """What an engine depends on: TensorRT version and the GPU (name, compute capability)."""

    trt_version: str
    gpu_name: str
    compute_capability: Tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"


def slug(text: str) -> str:
    """Lower-case file-name-safe form: runs of anything but [a-z0-9.] become one '-'."""
    s = re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")
    return s or "unknown"


def batch_tag(batch_sizes: Sequence[int]) -> str:
    """``b1`` for one batch size, ``b1-8`` for a profile spanning 1..8."""
    if not batch_sizes:
        raise ValueError("at least one batch size is needed to name an engine")
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    lo, hi = min(batch_sizes), max(batch_sizes)
    return f"b{lo}" if lo == hi else f"b{lo}-{hi}"


def engine_name(model: str, precision: Precision, batch_sizes: Sequence[int], runtime: RuntimeInfo,
                dla_core: Optional[int] = None) -> str:
    """``<model>_<precision>_<batch>_<gpu>-<sm>[_dla<n>]_trt<version>.engine``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dla = f"_dla{dla_core}" if dla_core is not None else ""
    return (f"{slug(model)}_{precision}_{batch_tag(batch_sizes)}_{slug(runtime.gpu_name)}-{runtime.sm}{dla}"
            f"_trt{slug(runtime.trt_version)}.engine")


def sidecar_path(engine: Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class BuildOptions:
    """How an engine is built. Defaults documented here only."""

    precision: Precision = "fp16"  # int8 needs a QDQ ONNX (explicit quantization); FP16 is enabled alongside
    batch_sizes: Tuple[int, ...] = (1,)  # a dynamic-batch ONNX gets one profile min..max (opt = max)
    workspace_mib: int = 1024  # builder scratch memory limit (MemoryPoolType.WORKSPACE)
    dla_core: Optional[int] = None  # Jetson Xavier/Orin DLA core; layers DLA cannot run fall back to the GPU
    timing_cache: Optional[Path] = None  # read before and written after every build
    optimization_level: Optional[int] = None  # 0..5 (TensorRT 8.6+), None = TensorRT's default (3)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {PRECISIONS}, got {self.precision!r}")
        batch_tag(self.batch_sizes)
        if self.workspace_mib < 16:
            raise ValueError(f"workspace_mib: at least 16 MiB, got {self.workspace_mib}")
        if self.dla_core is not None and self.dla_core < 0:
            raise ValueError(f"dla_core: must be >= 0, got {self.dla_core}")
        if self.dla_core is not None and self.precision == "fp32":
            raise ValueError("dla_core: DLA runs FP16 or INT8 only; choose --precision fp16 or int8")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level: 0..5, got {self.optimization_level}")

    def flags(self) -> Dict[str, Any]:
        d = asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        d["timing_cache"] = str(self.timing_cache) if self.timing_cache else None
        return d


@dataclass(frozen=True)
class Sidecar:
    """Metadata written next to an engine (``<engine>.json``)."""

    model: str
    precision: Precision
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


@dataclass(frozen=True)
class CacheDecision:
    """What the engine cache does for a request: ``use`` the file, ``build`` it, or ``rebuild`` a stale one."""

    action: str  # "use" | "build" | "rebuild"
    engine: Path
    reasons: Tuple[str, ...] = ()


def cache_decision(cache_dir: Path, model: str, onnx_path: Path, options: BuildOptions, runtime: RuntimeInfo,
                   manifest_hash: Optional[str] = None, rebuild_on_mismatch: bool = False) -> CacheDecision:
    """Decide without TensorRT; raises EngineMismatch for a stale engine unless ``rebuild_on_mismatch``."""
    engine = Path(cache_dir) / engine_name(model, options.precision, options.batch_sizes, runtime, options.dla_core)
    if not engine.is_file():
        return CacheDecision("build", engine, ("no engine for this model/precision/batch/GPU/TensorRT yet",))
    try:
        verify_engine(engine, runtime, onnx_path, manifest_hash)
    except EngineMismatch as exc:
        if not rebuild_on_mismatch:
            raise
        return CacheDecision("rebuild", engine, tuple(exc.reasons))
    except EngineError as exc:  # unreadable / missing sidecar
        if not rebuild_on_mismatch:
            raise EngineMismatch(engine, [str(exc)], rebuild_hint(None, engine)) from None
        return CacheDecision("rebuild", engine, (str(exc),))
    return CacheDecision("use", engine)


# ---------------------------------------------------------------------------------------------------------------
# machine probe (CUDA driver API through ctypes: works on Jetson and x86 without extra Python packages)


def _cuda_device(index: int = 0) -> Tuple[str, Tuple[int, int]]:
    lib = None
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        raise EngineError("no NVIDIA driver (libcuda) on this machine: TensorRT engines need an NVIDIA GPU")

    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise EngineError(f"CUDA driver call {what} failed with error {rc}")

    check(lib.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    check(lib.cuDeviceGet(ctypes.byref(dev), index), f"cuDeviceGet({index})")
    buf = ctypes.create_string_buffer(256)
    check(lib.cuDeviceGetName(buf, 256, dev), "cuDeviceGetName")
    major, minor = ctypes.c_int(), ctypes.c_int()
    check(lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev), "cuDeviceGetAttribute(major)")
    check(lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev), "cuDeviceGetAttribute(minor)")
    return buf.value.decode(errors="replace").strip(), (major.value, minor.value)


def probe_gpu(index: int = 0) -> Tuple[str, Tuple[int, int]]:
    """GPU name and compute capability of device ``index``."""
    return _cuda_device(index)


def probe_runtime(device: int = 0) -> RuntimeInfo:
    """The running TensorRT version and GPU. Raises EngineError when TensorRT or the GPU is missing."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError:
        raise EngineError("TensorRT's Python bindings are not installed (on a Jetson they come with JetPack: "
                          "`sudo apt install python3-libnvinfer`; see docs/jetson.md)") from None
    name, cc = probe_gpu(device)
    return RuntimeInfo(trt_version=str(trt.__version__), gpu_name=name, compute_capability=cc)


# ---------------------------------------------------------------------------------------------------------------
# TensorRT: build


def _trt():
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError:
        raise EngineError("TensorRT's Python bindings are not installed; see docs/jetson.md") from None
    return trt


def _trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


class _LogBridge:
    """A trt.ILogger that forwards to ``logging`` (built lazily because the base class lives in tensorrt)."""

    @staticmethod
    def make(trt):
        class Bridge(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity, msg) -> None:  # noqa: D401 - TensorRT callback
                S = trt.ILogger.Severity
                level = {S.INTERNAL_ERROR: logging.CRITICAL, S.ERROR: logging.ERROR, S.WARNING: logging.WARNING,
                         S.INFO: logging.INFO}.get(severity, logging.DEBUG)
                log.log(level, "TensorRT: %s", msg)

        return Bridge()


def _progress_monitor(trt, report: Callable[[str], None]):
    """A trt.IProgressMonitor (TensorRT 10+) that reports phases; None on older TensorRT."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._steps: Dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            with self._lock:
                self._steps[phase_name] = num_steps
            report(f"{phase_name} ({num_steps} steps)" + (f" in {parent_phase}" if parent_phase else ""))

        def step_complete(self, phase_name, step) -> bool:
            with self._lock:
                total = self._steps.get(phase_name, 0)
            if not _noisy_phase(phase_name):
                report(f"{phase_name}: {step + 1}/{total}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name) -> None:
            with self._lock:
                self._steps.pop(phase_name, None)

    return Monitor()


def _noisy_phase(phase_name: str) -> bool:
    """Tactic-level phases report thousands of steps; only their start is shown."""
    return "tactic" in phase_name.lower() or "kernel" in phase_name.lower()


class _Heartbeat:
    """Logs elapsed time while a TensorRT 8.x build (no progress monitor) runs."""

    def __init__(self, report: Callable[[str], None], every_s: float = 15.0) -> None:
        self._report, self._every, self._stop = report, every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(self._every):
            self._report(f"building engine... {time.monotonic() - t0:.0f} s")

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


def _network_io(network) -> List[Tuple[str, Tuple[int, ...], bool]]:
    items = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        items.append((t.name, tuple(t.shape), True))
    return items


def _engine_io(engine) -> List[Dict[str, Any]]:
    """I/O tensors through the tensor-name API (TensorRT 8.5+; the binding API is gone in 10)."""
    trt = _trt()
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        out.append({"name": name, "mode": "input" if mode == trt.TensorIOMode.INPUT else "output",
                    "dtype": str(engine.get_tensor_dtype(name)).split(".")[-1],
                    "shape": [int(d) for d in engine.get_tensor_shape(name)]})
    return out


def build_engine(onnx_path: Path, out_dir: Path, model: str, options: BuildOptions,
                 manifest_hash: Optional[str] = None, progress: Optional[Callable[[str], None]] = None,
                 runtime: Optional[RuntimeInfo] = None) -> Path:
    """Parse ``onnx_path``, build an engine with ``options``, write it and its sidecar into ``out_dir``."""
    trt = _trt()
    report = progress or (lambda msg: log.info("%s", msg))
    runtime = runtime or probe_runtime()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise EngineError(f"{onnx_path}: no such ONNX file")
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = _LogBridge.make(trt)
    builder = trt.Builder(logger)
    flags = 0
    if _trt_major(trt) < 10:  # explicit batch is the only mode in 10.x (the flag is deprecated there)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    report(f"parsing {onnx_path.name}")
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT {trt.__version__} could not parse {onnx_path}:\n  " + "\n  ".join(errors) +
                          f"\nRun `tokenline-export check-trt {onnx_path}` for a per-target report.")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if options.precision in ("fp16", "int8"):
        if not getattr(builder, "platform_has_fast_fp16", True):  # deprecated in 10.x
            log.warning("this GPU has no fast FP16; building anyway")
        config.set_flag(trt.BuilderFlag.FP16)
    if options.precision == "int8":
        has_qdq = any(network.get_layer(i).type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
                      for i in range(network.num_layers))
        if not has_qdq:
            raise EngineError(f"{onnx_path} has no QuantizeLinear/DequantizeLinear nodes: INT8 needs a QDQ ONNX "
                              "(tokenline-export quantize-int8); calibrator classes are deprecated and not used")
        config.set_flag(trt.BuilderFlag.INT8)
    if options.optimization_level is not None and hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = options.optimization_level
    if options.dla_core is not None:
        if builder.num_DLA_cores <= options.dla_core:
            raise EngineError(f"DLA core {options.dla_core} requested but this device has "
                              f"{builder.num_DLA_cores} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)

    # optimization profile over the batch axis for dynamic-batch inputs
    dynamic = [(n, s) for n, s, _ in _network_io(network) if any(d < 0 for d in s)]
    if dynamic:
        lo, hi = min(options.batch_sizes), max(options.batch_sizes)
        profile = builder.create_optimization_profile()
        for name, shape in dynamic:
            if any(d < 0 for d in shape[1:]):
                raise EngineError(f"input {name!r} {list(shape)} is dynamic beyond the batch axis; export with a "
                                  "fixed image size")
            rest = tuple(shape[1:])
            profile.set_shape(name, (lo, *rest), (hi, *rest), (hi, *rest))
        config.add_optimization_profile(profile)
        report(f"optimization profile: batch {lo}..{hi}")
    else:
        fixed = {s[0] for _, s, _ in _network_io(network)}
        if fixed and set(options.batch_sizes) != fixed:
            raise EngineError(f"{onnx_path.name} has a fixed batch {sorted(fixed)} but batch sizes "
                              f"{list(options.batch_sizes)} were requested; use the manifest's file for that batch")

    # timing cache: reuse across builds, write back what this build learnt
    cache_bytes = b""
    if options.timing_cache and Path(options.timing_cache).is_file():
        cache_bytes = Path(options.timing_cache).read_bytes()
        report(f"timing cache: {options.timing_cache} ({len(cache_bytes)} bytes)")
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, False)

    monitor = _progress_monitor(trt, report) if hasattr(config, "progress_monitor") else None
    if monitor is not None:
        config.progress_monitor = monitor  # must outlive the build: kept referenced until we return
    report(f"building {options.precision} engine with TensorRT {trt.__version__} on {runtime.gpu_name}")
    with _Heartbeat(report) if monitor is None else _nullcontext():
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} (see the log "
                          "above; try a larger --workspace-mib or run check-trt)")
    if options.timing_cache:
        tc = config.get_timing_cache()
        if tc is not None:
            _atomic_write(Path(options.timing_cache), bytes(memoryview(tc.serialize())))

    name = engine_name(model, options.precision, options.batch_sizes, runtime, options.dla_core)
    engine_path = out_dir / name
    _atomic_write(engine_path, bytes(memoryview(serialized)))
    try:
        engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
        io = _engine_io(engine) if engine is not None else []
    except Exception as exc:  # noqa: BLE001 - the I/O listing is informative only
        log.warning("could not list engine I/O (%s)", exc)
        io = []
    sidecar = Sidecar(
        model=model, precision=options.precision, batch_sizes=list(options.batch_sizes),
        trt_version=runtime.trt_version, gpu_name=runtime.gpu_name,
        compute_capability=list(runtime.compute_capability), build_flags=options.flags(),
        engine_sha256=sha256_file(engine_path), onnx_sha256=sha256_file(onnx_path), onnx_file=onnx_path.name,
        manifest_hash=manifest_hash, created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        io=io,
    )
    write_sidecar(engine_path, sidecar)
    report(f"wrote {engine_path} ({engine_path.stat().st_size / 2**20:.1f} MiB) and {sidecar_path(engine_path).name}")
    return engine_path


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------------
# TensorRT: load


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
    trt = _trt()
    runtime = runtime or probe_runtime()
    engine_path = Path(engine_path)
    sc = verify_engine(engine_path, runtime, onnx_path, manifest_hash)
    trt_runtime = trt.Runtime(_LogBridge.make(trt))
    engine = trt_runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise EngineError(f"TensorRT could not deserialise {engine_path}. {rebuild_hint(sc, engine_path)}")
    return LoadedEngine(engine_path, sc, engine, trt_runtime, _engine_io(engine))


class EngineCache:
    """A directory of engines keyed by model/precision/batch/GPU/TensorRT; builds or rebuilds on request."""

    def __init__(self, directory: Path, rebuild_on_mismatch: bool = False) -> None:
        self.directory = Path(directory)
        self.rebuild_on_mismatch = rebuild_on_mismatch

    def decide(self, model: str, onnx_path: Path, options: BuildOptions, runtime: RuntimeInfo,
               manifest_hash: Optional[str] = None) -> CacheDecision:
        return cache_decision(self.directory, model, onnx_path, options, runtime, manifest_hash,
                              self.rebuild_on_mismatch)

    def ensure(self, model: str, onnx_path: Path, options: BuildOptions, manifest_hash: Optional[str] = None,
               progress: Optional[Callable[[str], None]] = None, build_missing: bool = True) -> LoadedEngine:
        """Load the matching engine, building it when missing (``build_missing``) or stale (rebuild policy)."""
        runtime = probe_runtime()
        decision = self.decide(model, onnx_path, options, runtime, manifest_hash)
        if decision.action == "build" and not build_missing:
            raise EngineError(f"no engine {decision.engine.name} in {self.directory}. "
                              f"{rebuild_hint(None, decision.engine)}")
        if decision.action in ("build", "rebuild"):
            for reason in decision.reasons:
                log.warning("engine %s: %s -> %s", decision.engine.name, reason, decision.action)
            self.directory.mkdir(parents=True, exist_ok=True)
            opts = options if options.timing_cache else _with_cache(options, self.directory / "timing.cache")
            build_engine(onnx_path, self.directory, model, opts, manifest_hash, progress, runtime)
        return load_engine(decision.engine, onnx_path, manifest_hash, runtime)


def _with_cache(options: BuildOptions, cache: Path) -> BuildOptions:
    d = asdict(options)
    d["timing_cache"] = cache
    d["batch_sizes"] = tuple(options.batch_sizes)
    return BuildOptions(**d)
