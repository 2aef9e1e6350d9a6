"""Export pipeline: ViT + merge schedule -> validated ONNX files + manifest (the exporter's main job).

Steps (each reported to ``progress``): trace to ONNX (opset >= 17, fp32 or fp16, fixed batches or dynamic
batch), onnx.checker, optional simplification, ONNX Runtime vs torch on the same inputs (the export fails
over tolerance), merged vs unmerged cosine on calibration images, ONNX Runtime throughput of both, GFLOPs,
TensorRT parser compatibility, the text tower when there is one, and finally manifest.json.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import shutil
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from exporter import __version__
from exporter.vit import MergeConfig, ViT, gflops
from tokenline import manifest as mf
from tokenline.preprocess import ImageError, preprocess, read_image

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


class ExportError(RuntimeError):
    """The export could not be produced or failed its validation."""


@dataclass
class ExportOptions:
    out_dir: Path
    name: str
    precision: str = "fp32"  # fp32 | fp16
    batch_sizes: List[int] = field(default_factory=lambda: [1])  # [] -> one dynamic-batch file
    opset: int = 17
    simplify: bool = True  # onnxslim: folds shape arithmetic so fixed-batch graphs are fully static
    calib_dir: Optional[Path] = None
    calib_count: int = 16
    export_unmerged: bool = True  # also write the unmerged encoder (reference for central / comparisons)
    bench_runs: int = 5
    bench_batch: int = 8
    tolerance: Optional[float] = None  # max abs error vs torch; default by precision
    check_trt: bool = True


@dataclass
class ExportResult:
    manifest: mf.Manifest
    manifest_path: Path
    table: Dict[str, object]
    trt_verdict: Dict[str, object] = field(default_factory=dict)


# -- inputs -----------------------------------------------------------------------------------------
def input_spec(vit: ViT) -> mf.InputSpec:
    c = vit.cfg
    return mf.InputSpec(
        height=c.image_size[0], width=c.image_size[1], mean=tuple(c.mean), std=tuple(c.std),
        interpolation=c.interpolation, resize=c.resize, color_order="RGB",
    )


def list_images(folder: Path, limit: Optional[int] = None) -> List[Path]:
    if not folder.is_dir():
        raise ExportError(f"calibration folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f"calibration folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if limit and len(files) > limit:  # spread over the folder (file names often group by class)
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def calibration_batch(vit: ViT, calib_dir: Optional[Path], count: int) -> np.ndarray:
    """Preprocessed calibration images [N,3,H,W]; smooth random images when no folder is given."""
    spec = input_spec(vit)
    if calib_dir is None:
        log.warning("no calibration images given: validating on synthetic images (pass --calib for real ones)")
        rng = np.random.default_rng(0)
        low = rng.integers(0, 256, size=(count, 8, 8, 3), dtype=np.uint8)
        import cv2  # noqa: PLC0415

        frames = [cv2.resize(f, (spec.width, spec.height), interpolation=cv2.INTER_CUBIC) for f in low]
        return np.stack([preprocess(f, spec) for f in frames])
    return load_images(calib_dir, spec, count)


def load_images(folder: Path, spec: mf.InputSpec, count: int) -> np.ndarray:
    """Preprocess up to ``count`` images of ``folder`` (spread over it) exactly as the edge does: [N,3,H,W]."""
    arrays = []
    for p in list_images(Path(folder), count):
        try:
            arrays.append(preprocess(read_image(p), spec))
        except ImageError as exc:
            log.warning("skipping calibration image: %s", exc)
    if not arrays:
        raise ExportError(f"no readable calibration images in {folder}")
    return np.stack(arrays).astype(np.float32)


# -- ONNX -------------------------------------------------------------------------------------------
class _Wrapped(torch.nn.Module):
    """float32 in and out around the encoder, which runs in ``dtype`` (fp16 keeps LayerNorm stats in fp32)."""

    def __init__(self, vit: ViT, dtype: torch.dtype) -> None:
        super().__init__()
        self.vit, self.dtype = vit, dtype

    def forward(self, pixels: torch.Tensor):  # noqa: D401
        outs = self.vit(pixels.to(self.dtype))
        return tuple(o.float() for o in outs)


def export_onnx(vit: ViT, path: Path, batch: Optional[int], opset: int, precision: str, simplify: bool) -> None:
    """Trace ``vit`` (its current merge schedule) into ``path``; ``batch=None`` gives a dynamic batch axis."""
    import onnx  # noqa: PLC0415

    h, w = vit.cfg.image_size
    dummy = torch.randn(batch or 2, 3, h, w)
    dynamic = None
    if batch is None:
        dynamic = {n: {0: "batch"} for n in (mf.INPUT_NAME, *mf.OUTPUT_NAMES)}
    dtype = torch.float16 if precision == "fp16" else torch.float32
    module = _Wrapped(copy.deepcopy(vit).to(dtype) if precision == "fp16" else vit, dtype).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (dummy,), str(path), dynamo=False, opset_version=opset,
            input_names=[mf.INPUT_NAME], output_names=list(mf.OUTPUT_NAMES), dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    model = onnx.load(str(path))
    if simplify:
        import onnxslim  # noqa: PLC0415

        model = onnxslim.slim(model)
    model.producer_name, model.producer_version = "tokenline-exporter", __version__
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def ort_session(path: Path, threads: int = 0):
    import onnxruntime as ort  # noqa: PLC0415

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_batched(session, x: np.ndarray, batch: Optional[int]) -> List[np.ndarray]:
    """Run a session over x in chunks of its fixed batch (padding the last chunk); outputs concatenated."""
    n = x.shape[0]
    step = batch or n
    outs: List[List[np.ndarray]] = []
    for i in range(0, n, step):
        chunk = x[i : i + step]
        pad = step - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        res = session.run(None, {mf.INPUT_NAME: chunk.astype(np.float32)})
        outs.append([r[: step - pad] for r in res])
    return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]


def throughput(session, x: np.ndarray, runs: int) -> float:
    """Median images/s of ``runs`` timed passes (one warm-up) over the batch x."""
    session.run(None, {mf.INPUT_NAME: x})
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, {mf.INPUT_NAME: x})
        rates.append(x.shape[0] / (time.perf_counter() - t0))
    return statistics.median(rates)


def token_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image: worst (1 - cosine) between a token of ``a`` and its best match in ``b`` (order-free)."""
    sim = np.einsum("bkd,bjd->bkj", a, b)
    return 1.0 - sim.max(axis=-1).min(axis=-1)


def compare(torch_out: Sequence[np.ndarray], ort_out: Sequence[np.ndarray], tol: float, merged: bool,
            precision: str) -> tuple[Dict[str, float], List[str]]:
    """ONNX Runtime vs torch on the same images: statistics and the list of failed checks (empty = pass).

    Unmerged graphs must match everywhere within ``tol``. Merged graphs take discrete decisions (TopK,
    ArgMax) on float scores: a near-tie that rounds differently in ONNX Runtime merges another token, which
    moves that image's embedding by ~1e-3. So for them, most images (>= half) must match within ``tol``, and
    every image must keep cosine >= 0.999 (0.99 in fp16) to torch.
    """
    g_t, g_o = torch_out[0], ort_out[0]
    err = np.abs(g_t - g_o).max(axis=-1)  # per image
    cos = (g_t * g_o).sum(-1)
    tok = token_error(ort_out[1], torch_out[1])
    exact = err <= tol
    stats = {
        "max_abs_err": float(err.max()),
        "max_rel_err": float(err.max() / max(float(np.abs(g_t).max()), 1e-12)),
        "matched_fraction": float(exact.mean()),
        "global_cos_min": float(cos.min()),
        "token_err": float(tok[exact].max()) if exact.any() else float(tok.max()),
        "sizes_err": float(np.abs(torch_out[2].sum(-1) - ort_out[2].sum(-1)).max()),
    }
    problems = []
    if stats["sizes_err"] > 1e-3:
        problems.append(f"token sizes do not add up to the patch count (error {stats['sizes_err']:.3g})")
    if not merged and not exact.all():
        problems.append(f"max abs error {stats['max_abs_err']:.3g} of the global embedding > tolerance {tol:g}")
    if merged and stats["matched_fraction"] < 0.5:
        problems.append(f"only {stats['matched_fraction']:.0%} of the images match within {tol:g} (need >= 50%)")
    floor = 0.99 if precision == "fp16" else 0.999
    if stats["global_cos_min"] < floor:
        problems.append(f"global embedding cosine {stats['global_cos_min']:.5f} < {floor}")
    if stats["token_err"] > max(10 * tol, 1e-3):
        problems.append(f"summary token error {stats['token_err']:.3g} > {max(10 * tol, 1e-3):g}")
    return stats, problems


# -- the pipeline -----------------------------------------------------------------------------------
def export_encoder(
    vit: ViT,
    merge: MergeConfig,
    opts: ExportOptions,
    *,
    family: str,
    source_path: str,
    source_sha256: str,
    text=None,
    progress: Progress = lambda _msg: None,
) -> ExportResult:
    """Export ``vit`` with merge settings ``merge`` into ``opts.out_dir``; returns the manifest and a table."""
    if opts.precision not in ("fp32", "fp16"):
        raise ExportError(f"precision must be fp32 or fp16, got {opts.precision!r}")
    if opts.opset < 17:
        raise ExportError(f"opset {opts.opset} is too old: LayerNorm-era graphs need >= 17")
    if any(b < 1 for b in opts.batch_sizes):
        raise ExportError("batch sizes must be >= 1")
    tol = opts.tolerance if opts.tolerance is not None else (1e-4 if opts.precision == "fp32" else 2e-2)
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vit = vit.eval()
    vit.configure_merging(merge)
    schedule = vit.schedule
    tokens_merged = vit.tokens_per_block

    progress("preparing calibration images")
    calib = calibration_batch(vit, opts.calib_dir, opts.calib_count)
    with torch.no_grad():
        ref = [t.numpy() for t in vit(torch.from_numpy(calib))]

    batches: List[Optional[int]] = list(opts.batch_sizes) or [None]
    files: List[mf.FileSpec] = []
    stats: Dict[str, float] = {}
    main_path = None
    for b in batches:
        fname = f"encoder_{opts.precision}_{'bdyn' if b is None else f'b{b}'}.onnx"
        progress(f"exporting {fname} (merge: {merge.method}, tokens {tokens_merged[0]}->{schedule.final_patches + vit.cfg.num_prefix})")
        path = out / fname
        export_onnx(vit, path, b, opts.opset, opts.precision, opts.simplify)
        progress(f"validating {fname} with ONNX Runtime against torch")
        sess = ort_session(path)
        got = run_batched(sess, calib, b)
        cmp, problems = compare(ref, got, tol, merged=merge.method != "none", precision=opts.precision)
        log.info("%s: %s", fname, cmp)
        if problems:
            raise ExportError(f"{fname}: ONNX Runtime disagrees with torch: " + "; ".join(problems))
        for k, v in cmp.items():
            worst = min if k in ("global_cos_min", "matched_fraction") else max
            stats[k] = worst(stats.get(k, v), v)
        files.append(mf.FileSpec(path=fname, sha256=mf.sha256_file(path), role="encoder",
                                 precision=opts.precision, batch=b))
        main_path = main_path or (path, b)

    table: Dict[str, object] = {
        "tokens_per_block": tokens_merged,
        "r_per_block": schedule.r_per_block,
        "gflops": gflops(vit.cfg, tokens_merged, schedule.r_per_block),
        "max_abs_err_vs_torch": stats["max_abs_err"],
        "max_rel_err_vs_torch": stats["max_rel_err"],
        "token_err_vs_torch": stats["token_err"],
        "images_matching_torch": stats["matched_fraction"],
    }
    assert main_path is not None
    bench_b = main_path[1] or opts.bench_batch
    bench_x = np.ascontiguousarray(np.resize(calib, (bench_b, *calib.shape[1:])), dtype=np.float32)

    if merge.method != "none" and opts.export_unmerged:
        progress("exporting the unmerged encoder for comparison")
        vit.configure_merging(MergeConfig(k=merge.k, alpha=merge.alpha, summary_alpha=merge.summary_alpha))
        un_name = f"encoder_unmerged_{opts.precision}_{'bdyn' if main_path[1] is None else f'b{main_path[1]}'}.onnx"
        un_path = out / un_name
        export_onnx(vit, un_path, main_path[1], opts.opset, opts.precision, opts.simplify)
        table["tokens_per_block_unmerged"] = vit.tokens_per_block
        table["gflops_unmerged"] = gflops(vit.cfg, vit.tokens_per_block, vit.schedule.r_per_block)
        vit.configure_merging(merge)
        files.append(mf.FileSpec(path=un_name, sha256=mf.sha256_file(un_path), role="encoder_unmerged",
                                 precision=opts.precision, batch=main_path[1]))
        progress("comparing merged against unmerged on the calibration images")
        un_sess = ort_session(un_path)
        un_out = run_batched(un_sess, calib, main_path[1])
        cos = (un_out[0] * run_batched(ort_session(main_path[0]), calib, main_path[1])[0]).sum(-1)
        table["cosine_vs_unmerged_mean"] = float(cos.mean())
        table["cosine_vs_unmerged_min"] = float(cos.min())
        progress(f"measuring ONNX Runtime throughput (batch {bench_b}, median of {opts.bench_runs})")
        sess = ort_session(main_path[0])
        # interleave the two measurements so both see the same machine state
        r_un, r_me = [], []
        for _ in range(max(1, opts.bench_runs // 2)):
            r_un.append(throughput(un_sess, bench_x, 2))
            r_me.append(throughput(sess, bench_x, 2))
        table["ort_images_per_s_unmerged"] = statistics.median(r_un)
        table["ort_images_per_s"] = statistics.median(r_me)
    else:
        progress(f"measuring ONNX Runtime throughput (batch {bench_b}, median of {opts.bench_runs})")
        table["ort_images_per_s"] = throughput(ort_session(main_path[0]), bench_x, opts.bench_runs)

    trt_verdict: Dict[str, object] = {}
    if opts.check_trt:
        trt_verdict = check_trt(main_path[0], progress)

    text_spec = None
    if text is not None:
        progress("exporting the text tower")
        text_spec, text_files = export_text(text, out, opts.opset)
        files.extend(text_files)

    k = merge.k
    d = vit.cfg.out_dim
    manifest = mf.Manifest(
        name=opts.name,
        family=family,
        source_checkpoint=Path(source_path).name,
        source_sha256=source_sha256,
        exporter_version=__version__,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        opset=opts.opset,
        precision=opts.precision,
        batch_sizes=[b for b in batches if b is not None],
        input=input_spec(vit),
        encoder=mf.EncoderSpec(
            embed_dim=vit.cfg.embed_dim, depth=vit.cfg.depth, num_heads=vit.cfg.num_heads,
            patch_size=vit.cfg.patch_size, grid=vit.cfg.grid, num_prefix_tokens=vit.cfg.num_prefix,
            has_cls=vit.cfg.class_token,
        ),
        merge=mf.MergeSpec(
            method=merge.method, alpha=merge.alpha, r_per_block=schedule.r_per_block,
            tokens_per_block=tokens_merged, final_tokens=schedule.final_patches + vit.cfg.num_prefix,
            floor=merge.floor or k,
        ),
        summary=mf.SummarySpec(k=k, dim=d),
        outputs=mf.output_specs(k, d, main_path[1]),
        embedding_dim=d,
        files=files,
        text=text_spec,
        validation=mf.ValidationSpec(
            max_abs_err_vs_torch=stats["max_abs_err"], max_rel_err_vs_torch=stats["max_rel_err"], tolerance=tol,
            images_matching_torch=stats["matched_fraction"], global_cosine_min_vs_torch=stats["global_cos_min"],
            cosine_vs_unmerged_mean=table.get("cosine_vs_unmerged_mean"),
            cosine_vs_unmerged_min=table.get("cosine_vs_unmerged_min"),
            ort_images_per_s=table.get("ort_images_per_s"),
            ort_images_per_s_unmerged=table.get("ort_images_per_s_unmerged"),
            gflops=table.get("gflops"), gflops_unmerged=table.get("gflops_unmerged"),
        ),
    )
    mpath = out / "manifest.json"
    manifest.write(mpath)
    progress(f"wrote {mpath}")
    return ExportResult(manifest=manifest, manifest_path=mpath, table=table, trt_verdict=trt_verdict)


def check_trt(path: Path, progress: Progress) -> Dict[str, object]:
    """Run the TensorRT parser compatibility check when the checker is available."""
    try:
        from exporter.trt.compat import check_onnx  # noqa: PLC0415
    except ImportError:
        log.warning("TensorRT compatibility checker not available in this build; skipped")
        return {}
    progress("checking TensorRT parser compatibility (JetPack 5, JetPack 6, TensorRT 10)")
    return dict(check_onnx(path))


def export_text(text, out: Path, opset: int):
    """Export a text tower next to the encoder; returns (TextSpec, [FileSpec])."""
    from exporter.text import export_text_onnx  # noqa: PLC0415

    info = export_text_onnx(text, out / "text_encoder.onnx", opset=opset)
    files = [mf.FileSpec(path="text_encoder.onnx", sha256=mf.sha256_file(out / "text_encoder.onnx"),
                         role="text_encoder")]
    tok_files = []
    for src in info.get("tokenizer_files", []):
        dst = out / Path(src).name
        shutil.copyfile(src, dst)
        tok_files.append(dst.name)
        files.append(mf.FileSpec(path=dst.name, sha256=mf.sha256_file(dst), role="tokenizer"))
    spec = mf.TextSpec(
        onnx="text_encoder.onnx", context_length=info["context_length"], vocab_size=info["vocab_size"],
        tokenizer=info["tokenizer"], tokenizer_files=tok_files, pad_id=info.get("pad_id", 0),
    )
    return spec, files
