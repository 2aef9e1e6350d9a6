"""Test fixture: a tiny real ONNX encoder with the manifest's outputs, and its valid Manifest next to it.

Not a ViT: the image is cut into a grid of patches (space-to-depth), each patch goes through a fixed random
projection to D dims, the L2-normalized patch features are the tokens (K = grid rows x cols) and the global
embedding is the L2-normalized mean token. ``head="informativity"`` (a model exported before the slic head):
tokens of dim D, sizes 1 per token, centroids the patch centres. ``head="slic"``: tokens further projected to
``token_dim`` by a fixed random matrix, the footprint names token j for patch j (each token stands for one
patch, so a region's position is known exactly) and ``patch_mean`` is the unit mean of the tokens. Built with
onnx.helper so that edge and central tests run a real ONNX Runtime session without the exporter.

    model_dir = build_tiny_model(tmp_path / "model", size=32, patch=8, dim=384)   # K = 16
    manifest = Manifest.from_file(model_dir)
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from tokenline import manifest as mf
from tokenline.summary import Layout


def build_tiny_model(out_dir: Path, size: int = 32, patch: int = 8, dim: int = 384, seed: int = 0,
                     batch: Optional[int] = None, name: str = "tiny-test-encoder",
                     output_dims: Optional[Sequence[int]] = None, head: str = "informativity", token_dim: int = 96,
                     resize: str = "resize") -> Path:
    """Write ``encoder.onnx`` and ``manifest.json`` into ``out_dir`` and return it.

    ``batch`` None exports a dynamic batch axis. ``output_dims`` overrides the dims written in the *manifest*
    only (to test that a runner refuses a model whose real outputs disagree with its manifest).
    """
    import onnx  # test/dev dependency only
    from onnx import TensorProto, helper, numpy_helper

    if size % patch:
        raise ValueError("size must be a multiple of patch")
    g = size // patch
    k = g * g
    pdim = 3 * patch * patch
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((pdim, dim)) / np.sqrt(pdim)).astype(np.float32)
    ys, xs = np.meshgrid((np.arange(g) + 0.5) / g, (np.arange(g) + 0.5) / g, indexing="ij")
    cent = np.stack([xs.ravel(), ys.ravel()], axis=-1).astype(np.float32)  # (x, y), row-major over the grid

    b = "B" if batch is None else batch
    inits = [
        numpy_helper.from_array(w, "proj"),
        numpy_helper.from_array(np.array([0, 3, g, patch, g, patch], np.int64), "shape6"),
        numpy_helper.from_array(np.array([0, k, pdim], np.int64), "shape3"),
        numpy_helper.from_array(cent[None], "centroids_const"),
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
        numpy_helper.from_array(np.array([2], np.int64), "ax2"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
        numpy_helper.from_array(np.array(0.0, np.float32), "fzero"),
        numpy_helper.from_array(np.array(1.0, np.float32), "fone"),
    ]
    nodes = [
        # [B,3,H,W] -> [B,3,g,p,g,p] -> [B,g,g,3,p,p] -> [B,K,3pp]
        helper.make_node("Reshape", ["pixels", "shape6"], ["r6"]),
        helper.make_node("Transpose", ["r6"], ["t6"], perm=[0, 2, 4, 1, 3, 5]),
        helper.make_node("Reshape", ["t6", "shape3"], ["patches"]),
        helper.make_node("MatMul", ["patches", "proj"], ["feat"]),  # [B,K,D]
        helper.make_node("ReduceL2", ["feat", "ax2"], ["fnorm"], keepdims=1),
        helper.make_node("Max", ["fnorm", "eps"], ["fnorm_safe"]),
        helper.make_node("Div", ["feat", "fnorm_safe"], ["summary_tokens"]),
        helper.make_node("ReduceMean", ["summary_tokens", "ax1"], ["gmean"], keepdims=0),  # [B,D]
        helper.make_node("ReduceL2", ["gmean", "ax1"], ["gnorm"], keepdims=1),
        helper.make_node("Max", ["gnorm", "eps"], ["gnorm_safe"]),
        helper.make_node("Div", ["gmean", "gnorm_safe"], ["global_embedding"]),
        # sizes: ones [B,K] derived from the batch; centroids: constant broadcast to [B,K,2]
        helper.make_node("ReduceSum", ["feat", "ax2"], ["fsum"], keepdims=0),
        helper.make_node("Mul", ["fsum", "fzero"], ["zeros_bk"]),
        helper.make_node("Add", ["zeros_bk", "fone"], ["summary_sizes"]),
        helper.make_node("Unsqueeze", ["zeros_bk", "ax2"], ["zeros_bk1"]),
        helper.make_node("Add", ["zeros_bk1", "centroids_const"], ["summary_centroids"]),
    ]
    outputs = [helper.make_tensor_value_info("global_embedding", TensorProto.FLOAT, [b, dim]),
               helper.make_tensor_value_info("summary_tokens", TensorProto.FLOAT, [b, k, dim]),
               helper.make_tensor_value_info("summary_sizes", TensorProto.FLOAT, [b, k]),
               helper.make_tensor_value_info("summary_centroids", TensorProto.FLOAT, [b, k, 2])]
    if head == "slic":
        proj2 = (rng.standard_normal((dim, token_dim)) / np.sqrt(dim)).astype(np.float32)
        inits += [numpy_helper.from_array(proj2, "proj2"),
                  numpy_helper.from_array(np.arange(k, dtype=np.int32).reshape(1, g, g), "footprint_const"),
                  numpy_helper.from_array(np.array([-1, g, g], np.int64), "shape_bgg")]
        for node in nodes:  # the full-width tokens become an inner value
            node.output[:] = ["tokens_full" if o == "summary_tokens" else o for o in node.output]
            node.input[:] = ["tokens_full" if i == "summary_tokens" else i for i in node.input]
        nodes += [
            helper.make_node("MatMul", ["tokens_full", "proj2"], ["tp"]),
            helper.make_node("ReduceL2", ["tp", "ax2"], ["tpnorm"], keepdims=1),
            helper.make_node("Max", ["tpnorm", "eps"], ["tpnorm_safe"]),
            helper.make_node("Div", ["tp", "tpnorm_safe"], ["summary_tokens"]),
            helper.make_node("ReduceMean", ["summary_tokens", "ax1"], ["pmean"], keepdims=0),
            helper.make_node("ReduceL2", ["pmean", "ax1"], ["pmnorm"], keepdims=1),
            helper.make_node("Max", ["pmnorm", "eps"], ["pmnorm_safe"]),
            helper.make_node("Div", ["pmean", "pmnorm_safe"], ["patch_mean"]),
            helper.make_node("Reshape", ["zeros_bk", "shape_bgg"], ["zeros_bgg"]),
            helper.make_node("Cast", ["zeros_bgg"], ["zeros_bgg_i"], to=TensorProto.INT32),
            helper.make_node("Add", ["zeros_bgg_i", "footprint_const"], ["summary_footprint"]),
        ]
        nodes = [n for n in nodes if not set(n.output) & {"summary_sizes", "summary_centroids", "zeros_bk1"}]
        outputs = [outputs[0], helper.make_tensor_value_info("summary_tokens", TensorProto.FLOAT, [b, k, token_dim]),
                   helper.make_tensor_value_info("summary_footprint", TensorProto.INT32, [b, g, g]),
                   helper.make_tensor_value_info("patch_mean", TensorProto.FLOAT, [b, token_dim])]
        inits = [i for i in inits if i.name not in ("centroids_const", "fone")]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [b, 3, size, size])],
        outputs,
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="tokenline-tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "encoder.onnx"
    onnx.save(model, str(onnx_path))

    md = dim if output_dims is None else output_dims[0]
    mk = k if output_dims is None else output_dims[1]
    if head == "slic":
        summary = mf.SummarySpec(k=mk, dim=token_dim, method="slic", layer=1, footprint_grid=(g, g), iterations=1,
                                 spatial_weight=0.0, projection=mf.ProjectionSpec(
                                     method="pca", input_dim=dim, dims=token_dim, fitted_on="synthetic", images=1,
                                     explained_variance=1.0))
    else:
        summary = mf.SummarySpec(k=mk, dim=md)
    manifest = mf.Manifest(
        schema=mf.SCHEMA if head == "slic" else "tokenline.manifest/1",  # informativity: a model exported before
        name=name, family="timm_vit", source_checkpoint="tiny-random-projection", source_sha256="0" * 64,
        exporter_version="tests", created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        opset=18, precision="fp32", batch_sizes=[] if batch is None else [batch],
        input=mf.InputSpec(height=size, width=size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                           resize=resize, interpolation="area"),
        encoder=mf.EncoderSpec(embed_dim=dim, depth=1, num_heads=1, patch_size=patch, grid=(g, g),
                               num_prefix_tokens=0, has_cls=False),
        merge=mf.MergeSpec(method="none", r_per_block=[0], tokens_per_block=[k], final_tokens=k),
        summary=summary,
        outputs=mf.output_specs(summary.method, Layout(mk, md, summary.dim, summary.footprint_grid), batch),
        embedding_dim=md,
        files=[mf.FileSpec(path="encoder.onnx", sha256=mf.sha256_file(onnx_path), role="encoder",
                           precision="fp32", batch=batch)],
    )
    manifest.write(out_dir / "manifest.json")
    return out_dir


def reference_outputs(model_dir: Path, pixels: np.ndarray):
    """Run the tiny encoder with ONNX Runtime on CPU (for tests that compare against the bare encoder)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(Path(model_dir) / "encoder.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixels": pixels.astype(np.float32)})
