"""Read a checkpoint's tensors from disk: safetensors, torch pickles, Hugging Face directories, ONNX initializers.

Nothing here knows about families; ``RawCheckpoint`` carries the tensors (float or not, as stored), the
config.json / preprocessor_config.json found beside them, the directory tokenizer files are looked up in, and
the sha256 that names the source in the manifest (of the file; for a directory, of its config and weight
files' names and hashes in order).

ONNX: initializers keep their names; anonymous ``onnx::MatMul_*`` weights (what torch.onnx gives Linear layers
whose weight it transposed) are renamed after the MatMul node that consumes them,
``/backbone/encoder/layer.0/mlp/fc1/MatMul`` -> ``backbone.encoder.layer.0.mlp.fc1.weight``, and transposed
back to the [out, in] layout of nn.Linear. Other anonymous initializers keep their ``onnx::`` names and are
listed in ``onnx_consumers`` (name -> consuming node names) for the family converter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from exporter.checkpoints.base import CheckpointError

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".onnx")


@dataclass
class RawCheckpoint:
    path: Path
    kind: str  # "safetensors" | "torch" | "onnx"
    tensors: Dict[str, Tensor]
    sha256: str
    directory: Path  # where config / tokenizer files are looked for
    config: Optional[dict] = None
    preprocessor: Optional[dict] = None
    open_clip_config: Optional[dict] = None  # open_clip_config.json (Hugging Face hub layout of open_clip models)
    onnx_consumers: Dict[str, List[str]] = field(default_factory=dict)
    onnx_graph: Any = None  # onnx.GraphProto for ONNX sources

    @property
    def where(self) -> str:
        return str(self.path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_safetensors(path: Path) -> Dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); is it truncated or corrupt?") from None


def _unwrap(obj: Any, path: Path) -> Dict[str, Tensor]:
    for _ in range(3):  # {"state_dict": {...}}, {"model": {...}}, {"module": {...}} (possibly nested)
        if isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
            inner = next((obj[k] for k in ("state_dict", "model", "module", "model_state_dict") if k in obj), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {list(obj)[:10]})")
    if all(k.startswith("module.") for k in tensors):  # DistributedDataParallel
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def read_torch(path: Path) -> Dict[str, Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "is it truncated or corrupt? (only plain tensors are loaded: weights_only=True)"
        ) from None
    return _unwrap(obj, path)


def read_onnx(path: Path) -> RawCheckpoint:
    import onnx
    from google.protobuf.message import DecodeError
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable ONNX model ({exc}); is it truncated or corrupt?") from None
    graph = model.graph
    if not graph.initializer:
        raise CheckpointError(f"{path}: the ONNX graph has no initializers (weights stored externally?)")
    consumers: Dict[str, List[str]] = {}
    node_of: Dict[str, Any] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
            node_of.setdefault(name, node)
    tensors: Dict[str, Tensor] = {}
    for init in graph.initializer:
        arr = torch.from_numpy(numpy_helper.to_array(init).copy())
        name = init.name
        node = node_of.get(name)
        is_linear = node is not None and node.op_type == "MatMul" and node.name.endswith("/MatMul")
        if name.startswith("onnx::") and is_linear and arr.ndim == 2:
            name = node.name.strip("/")[: -len("/MatMul")].replace("/", ".") + ".weight"
            arr = arr.t().contiguous()
        if name in tensors:
            raise CheckpointError(f"{path}: two initializers map to '{name}'")
        tensors[name] = arr
    anonymous = {k: consumers.get(k, []) for k in tensors if k.startswith("onnx::")}
    return RawCheckpoint(
        path=path,
        kind="onnx",
        tensors=tensors,
        sha256=sha256_file(path),
        directory=path.parent,
        onnx_consumers=anonymous,
        onnx_graph=graph,
    )


def _read_weights_file(path: Path) -> Dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch(path)


def _read_directory(path: Path) -> RawCheckpoint:
    files: List[Path] = []
    for name in INDEX_FILES:
        index = _read_json(path / name)
        if index is not None:
            shards = sorted(set(index.get("weight_map", {}).values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if not shards or missing:
                raise CheckpointError(f"{path / name}: shards missing: {missing or 'none listed'}")
            files = [path / s for s in shards]
            break
    if not files:
        files = [path / n for n in WEIGHT_FILES if (path / n).is_file()][:1]
    if not files:
        found = sorted(p.name for p in path.iterdir())[:20]
        raise CheckpointError(
            f"{path}: no weights found in the directory (expected one of {list(WEIGHT_FILES)} or a sharded "
            f"index); it holds: {found}"
        )
    tensors: Dict[str, Tensor] = {}
    for f in files:
        tensors.update(_read_weights_file(f))
    config_path = path / "config.json"
    h = hashlib.sha256()
    for f in ([config_path] if config_path.is_file() else []) + files:
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return RawCheckpoint(
        path=path,
        kind=files[0].suffix.lstrip(".") if files[0].suffix == ".safetensors" else "torch",
        tensors=tensors,
        sha256=h.hexdigest(),
        directory=path,
        config=_read_json(config_path),
        preprocessor=_read_json(path / "preprocessor_config.json"),
        open_clip_config=_read_json(path / "open_clip_config.json"),
    )


def read_checkpoint(path: Path) -> RawCheckpoint:
    """Read any supported checkpoint file or Hugging Face directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        return _read_directory(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise CheckpointError(f"{path}: unsupported file type '{suffix}' (supported: {', '.join(SUFFIXES)})")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if suffix == ".onnx":
        return read_onnx(path)
    log.info("reading %s", path)
    tensors = _read_weights_file(path)
    if not tensors:
        raise CheckpointError(f"{path}: the file holds no tensors")
    # a weights file inside a Hugging Face directory: use the config beside it
    return RawCheckpoint(
        path=path,
        kind="safetensors" if suffix == ".safetensors" else "torch",
        tensors=tensors,
        sha256=sha256_file(path),
        directory=path.parent,
        config=_read_json(path.parent / "config.json"),
        preprocessor=_read_json(path.parent / "preprocessor_config.json"),
        open_clip_config=_read_json(path.parent / "open_clip_config.json"),
    )
