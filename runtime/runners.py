"""Encoder runners behind one interface: ONNX Runtime (TensorRT/CUDA/CPU providers) and native TensorRT.

A runner takes float32 pixels [B, 3, H, W] and returns a batched ``Summary`` checked against the manifest
(shapes, dtype, finite values). A model whose inputs/outputs disagree with its manifest is refused at load
with a ``RunnerError`` that says which tensor differs. The edge agent runs camera frames through it, central
its query images, so both encode alike. Error messages name the edge configuration's ``model.*`` keys.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Protocol, Sequence

import numpy as np

from runtime.cpu import int8_saturates
from runtime.cuda import CudaError, CudaStream, CudaUnavailable
from runtime.engine import EngineError, load_engine
from tokenline import manifest as mf
from tokenline.summary import Summary, SummaryError, output_names, output_shapes, outputs

log = logging.getLogger(__name__)


class RunnerError(RuntimeError):
    """The model cannot be loaded or produced unusable output."""


class RunnerUnavailable(RunnerError):
    """The runner's library (e.g. TensorRT) is not installed on this machine."""


class Runner(Protocol):
    """What the agent needs from an inference backend."""

    name: str
    batch_sizes: Sequence[int]  # fixed batch sizes the model accepts; [] = any

    def run(self, pixels: np.ndarray) -> Summary: ...

    def close(self) -> None: ...


def check_outputs(outs: Sequence[np.ndarray], b: int, manifest: mf.Manifest) -> Summary:
    """Validate raw outputs (in manifest order) for a batch of ``b``; RunnerError names the bad tensor."""
    try:
        return Summary.from_outputs(outs, manifest.summary.method, manifest.layout, b)
    except SummaryError as exc:
        raise RunnerError(str(exc)) from None


def pad_batch(pixels: np.ndarray, sizes: Sequence[int]) -> List[np.ndarray]:
    """Split/pad a batch to the model's fixed batch sizes (smallest size that fits, else the largest in chunks).

    Padding repeats the chunk's last frame: ``encoder_int8`` files exported before their activation ranges were
    taken per image quantize with one range per call, which a repeated frame leaves as it is (zeros would widen it
    and change the real frames' tokens)."""
    if not sizes:
        return [pixels]
    sizes = sorted(sizes)
    out = []
    i, n = 0, pixels.shape[0]
    while i < n:
        rest = n - i
        size = next((s for s in sizes if s >= rest), sizes[-1])
        chunk = pixels[i : i + size]
        if chunk.shape[0] < size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - chunk.shape[0], axis=0)], axis=0)
        out.append(chunk)
        i += size
    return out


def resolve_providers(requested: Sequence[str], available: Sequence[str]) -> List[str]:
    """``["auto"]`` -> TensorRT, CUDA, CPU (those available); explicit lists must all be available."""
    if list(requested) == ["auto"]:
        order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        return [p for p in order if p in available] or ["CPUExecutionProvider"]
    missing = [p for p in requested if p not in available]
    if missing:
        raise RunnerError(f"model.providers: {missing} not available in this onnxruntime build (has {list(available)})")
    return list(requested)


def encoder_role(int8: str, manifest: mf.Manifest, providers: Sequence[str],
                 saturates: Optional[bool] = None) -> str:
    """The manifest role of the files to run: ``encoder_int8`` (ONNX Runtime dynamic INT8, for CPUs) when
    ``model.int8`` is "on", or "auto" and the manifest has them and ONNX Runtime runs on the CPU alone, unless their
    8-bit weights saturate on this CPU (``saturates``: ``runtime.cpu.int8_saturates()`` unless given), where "auto"
    runs the fp32 files and "on" warns."""
    int8_files = [f for f in manifest.files if f.role == "encoder_int8"]
    if int8 == "off" or not int8_files:
        if int8 == "on":
            raise RunnerError(f"model.int8: 'on', but manifest {manifest.name!r} lists no encoder_int8 file "
                              "(export with --cpu-int8)")
        return "encoder"
    if int8 == "auto" and list(providers) != ["CPUExecutionProvider"]:
        return "encoder"
    full_range = any((f.weight_bits or 8) == 8 for f in int8_files)
    if full_range and (int8_saturates() if saturates is None else saturates):
        why = (f"manifest {manifest.name!r}'s encoder_int8 files have 8-bit weights, whose products ONNX Runtime "
               "saturates on this x86 CPU without VNNI (runtime.cpu), so they compute less accurately than the export "
               "measured")
        if int8 == "on":
            log.warning("%s; running them (model.int8: on); re-export with --cpu-int8-weight-bits 7 for this CPU", why)
            return "encoder_int8"
        log.warning("%s; running the fp32 encoder instead; re-export with --cpu-int8-weight-bits 7 for this CPU, or "
                    "set model.int8: on to run them anyway", why)
        return "encoder"
    return "encoder_int8"


class OnnxRuntimeRunner:
    """ONNX Runtime session(s) for the manifest's encoder file(s), one per fixed batch size (or one dynamic)."""

    def __init__(self, model_dir: Path, manifest: mf.Manifest, providers: Sequence[str] = ("auto",),
                 threads: int = 0, cache_dir: Optional[Path] = None, int8: str = "off", spinning: bool = True) -> None:
        import onnxruntime as ort  # the agent imports it lazily so that check-config stays fast

        self.manifest = manifest
        self.providers = resolve_providers(list(providers), ort.get_available_providers())
        self.role = encoder_role(int8, manifest, self.providers)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # spinning: ONNX Runtime's default (idle worker threads spin-wait for the next parallel section: lower latency
        # for a lone encoder, e.g. central's queries); off, they sleep and leave the cores to other threads (the edge)
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.log_severity_level = 3
        prov_args: List[object] = []
        for p in self.providers:
            if p == "TensorrtExecutionProvider" and cache_dir is not None:
                prov_args.append((p, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                                      "trt_fp16_enable": manifest.precision != "fp32"}))
            else:
                prov_args.append(p)
        files = [f for f in manifest.files if f.role == self.role]
        if not files:
            raise RunnerError(f"manifest {manifest.name!r} lists no {self.role} file")
        self.sessions = {}
        for f in files:
            path = Path(model_dir) / f.path
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=prov_args)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise RunnerError(f"cannot load {path}: {exc}") from None
            self._check_io(sess, path)
            self.sessions[f.batch] = sess
        self.batch_sizes = sorted(b for b in self.sessions if b is not None)
        if None in self.sessions:
            self.batch_sizes = []
        # INT8 files this CPU would run if its int8 products were exact: skipped because theirs saturate
        skipped = self.role != encoder_role(int8, manifest, self.providers, saturates=False)
        self.name = (f"onnxruntime[{','.join(p.replace('ExecutionProvider', '') for p in self.providers)}]"
                     + (" int8" if self.role == "encoder_int8" else "")
                     + (" (int8 files not run: their 8-bit weights saturate on this CPU)" if skipped else ""))

    def _check_io(self, sess, path: Path) -> None:
        spec = self.manifest.input
        ins = sess.get_inputs()
        if len(ins) != 1 or ins[0].name != spec.name:
            raise RunnerError(f"{path}: inputs {[i.name for i in ins]}, manifest says [{spec.name!r}]")
        shape = ins[0].shape
        if len(shape) != 4 or shape[1] != 3 or shape[2] != spec.height or shape[3] != spec.width:
            raise RunnerError(f"{path}: input shape {shape}, manifest says [B, 3, {spec.height}, {spec.width}]")
        names = tuple(o.name for o in sess.get_outputs())
        want = output_names(self.manifest.summary.method)
        if names != want:
            raise RunnerError(f"{path}: outputs {names}, manifest says {want}")
        for o, (_, w) in zip(sess.get_outputs(), output_shapes(self.manifest.summary.method, self.manifest.layout)):
            tail = tuple(o.shape[1:])
            if all(isinstance(x, int) for x in tail) and tail != w:
                raise RunnerError(f"{path}: output {o.name} is [B, {', '.join(map(str, tail))}], "
                                  f"manifest says [B, {', '.join(map(str, w))}]")

    def run(self, pixels: np.ndarray) -> Summary:
        n = pixels.shape[0]
        parts = []
        for chunk in pad_batch(pixels, self.batch_sizes):
            sess = self.sessions[None] if not self.batch_sizes else self.sessions[chunk.shape[0]]
            raw = sess.run(None, {self.manifest.input.name: chunk})
            parts.append(check_outputs(raw, chunk.shape[0], self.manifest))
        return Summary.concat(parts, n)

    def close(self) -> None:
        self.sessions.clear()


class TensorRTRunner:
    """Native TensorRT engine runner (JetPack 5: TensorRT 8.5; JetPack 6: 10.x). Imports ``tensorrt`` lazily.

    The engine is loaded through ``runtime.engine.load_engine``, which refuses an engine whose sidecar does not
    match this GPU and TensorRT version or whose hashes do not match the ONNX and manifest, with the command to
    rebuild it. Execution uses the name-based I/O API that TensorRT 8.5 and 10 share (``set_input_shape``,
    ``set_tensor_address``, ``execute_async_v3``) with device buffers from ``runtime.cuda``, allocated once for
    the largest batch. Not exercised on this project's CI (no TensorRT there): the tests
    cover the "not installed" path and skip the rest loudly.
    """

    def __init__(self, engine_path: Path, manifest: mf.Manifest, model_dir: Optional[Path] = None) -> None:
        try:
            import tensorrt  # noqa: F401, PLC0415
        except ImportError as exc:
            raise RunnerUnavailable(
                f"model.runner 'tensorrt' needs the tensorrt Python package (JetPack), which is not importable "
                f"here ({exc}); use model.runner: onnxruntime") from None

        path = Path(engine_path)
        if not path.is_file():
            raise RunnerError(f"model.engine: {path} does not exist")
        onnx_path = None
        if model_dir is not None:
            encoders = [f for f in manifest.files if f.role == "encoder"]
            onnx_path = Path(model_dir) / encoders[0].path if len(encoders) == 1 else None
        try:
            self.loaded = load_engine(path, onnx_path, manifest.hash())
        except EngineError as exc:
            raise RunnerError(f"model.engine: {exc}") from None
        engine = self.loaded.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        want = {manifest.input.name, *output_names(manifest.summary.method)}
        if set(names) != want:
            raise RunnerError(f"{path}: engine tensors {names}, manifest says {sorted(want)}")
        import tensorrt as trt  # noqa: PLC0415

        self.name = f"tensorrt[{trt.__version__}]"
        self.manifest = manifest
        self.input_name = manifest.input.name
        self.method, self.layout = manifest.summary.method, manifest.layout
        in_shape = tuple(engine.get_tensor_shape(self.input_name))
        self.dynamic = in_shape[0] == -1
        if self.dynamic:
            max_batch = int(engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
            self.batch_sizes: List[int] = list(range(1, max_batch + 1))
        else:
            max_batch = int(in_shape[0])
            self.batch_sizes = [max_batch]
        self.context = engine.create_execution_context()
        h, w = manifest.input.height, manifest.input.width
        shapes = dict(output_shapes(self.method, self.layout, max_batch), **{self.input_name: (max_batch, 3, h, w)})
        try:
            self.cuda = CudaStream()
            self.buffers = {n: self.cuda.malloc(int(np.prod(s)) * 4) for n, s in shapes.items()}
        except CudaUnavailable:
            raise RunnerUnavailable("model.runner 'tensorrt' needs the CUDA runtime (libcudart.so), not found") from None
        except CudaError as exc:
            raise RunnerError(str(exc)) from None
        for n, ptr in self.buffers.items():
            self.context.set_tensor_address(n, ptr)

    def run(self, pixels: np.ndarray) -> Summary:
        n = pixels.shape[0]
        parts = []
        for chunk in pad_batch(pixels, self.batch_sizes):
            chunk = np.ascontiguousarray(chunk, dtype=np.float32)
            b = chunk.shape[0]
            if self.dynamic:
                self.context.set_input_shape(self.input_name, tuple(chunk.shape))
            self.cuda.copy(self.buffers[self.input_name], chunk.ctypes.data, chunk.nbytes, CudaStream.H2D)
            if not self.context.execute_async_v3(self.cuda.handle):
                raise RunnerError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            outs = []
            for (name, shape), spec in zip(output_shapes(self.method, self.layout, b), outputs(self.method)):
                host = np.empty(shape, dtype=spec.dtype)  # float32 or int32: 4 bytes, as the buffers
                self.cuda.copy(host.ctypes.data, self.buffers[name], host.nbytes, CudaStream.D2H)
                outs.append(host)
            self.cuda.sync()
            parts.append(check_outputs(outs, b, self.manifest))
        return Summary.concat(parts, n)

    def close(self) -> None:
        for ptr in getattr(self, "buffers", {}).values():
            self.cuda.free(ptr)
        self.buffers = {}
        self.context = None


def make_runner(model_cfg, manifest: mf.Manifest, model_dir: Path) -> Runner:
    """Build the runner named by ``model.runner``."""
    if model_cfg.runner == "tensorrt":
        if model_cfg.engine is None:
            raise RunnerError("model.engine: required when model.runner is 'tensorrt'")
        return TensorRTRunner(model_cfg.engine, manifest, model_dir)
    return OnnxRuntimeRunner(model_dir, manifest, providers=model_cfg.providers, threads=model_cfg.threads,
                             cache_dir=Path(model_dir) / "trt_cache", int8=model_cfg.int8,
                             spinning=model_cfg.ort_spinning)
