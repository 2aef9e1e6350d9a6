"""TensorRT engines: build from ONNX, name, write the sidecar; the engine cache that builds or reuses them.

Building needs no torch and no other ``exporter`` module (Python 3.8+, so it runs on the device that builds):
``build_engine`` uses TensorRT's documented Python API (8.5 on JetPack 5, 8.6, 10.x on JetPack 6). What an engine
is checked against before it runs - the sidecar, ``verify_engine``, ``probe_runtime``, ``load_engine`` - lives in
``runtime.engine``, which the edge agent uses too. Naming and the cache decision are pure functions tested
without TensorRT.

The engine file is exactly what TensorRT serialised (trtexec and DeepStream load it); metadata lives next to it
in ``<engine>.json``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from runtime.engine import (
    EngineError,
    EngineMismatch,
    LoadedEngine,
    RuntimeInfo,
    Sidecar,
    engine_io,
    import_tensorrt,
    load_engine,
    probe_runtime,
    rebuild_hint,
    sidecar_path,
    trt_logger,
    verify_engine,
    write_sidecar,
)
from tokenline.manifest import sha256_file

log = logging.getLogger(__name__)

Precision = str  # "fp16" | "int8" | "fp32"
PRECISIONS = ("fp32", "fp16", "int8")


# ---------------------------------------------------------------------------------------------------------------
# pure: names, build options, cache policy


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
# TensorRT: build


def _trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


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


def build_engine(onnx_path: Path, out_dir: Path, model: str, options: BuildOptions,
                 manifest_hash: Optional[str] = None, progress: Optional[Callable[[str], None]] = None,
                 runtime: Optional[RuntimeInfo] = None) -> Path:
    """Parse ``onnx_path``, build an engine with ``options``, write it and its sidecar into ``out_dir``."""
    trt = import_tensorrt()
    report = progress or (lambda msg: log.info("%s", msg))
    runtime = runtime or probe_runtime()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise EngineError(f"{onnx_path}: no such ONNX file")
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = trt_logger(trt)
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
        io = engine_io(engine) if engine is not None else []
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
