"""Export pipeline: ViT + merge settings -> validated ONNX files + manifest (the exporter's main job).

``export_encoder`` runs the steps in order, each reported to ``progress``: calibration images
(``exporter.calibration``); with a fidelity budget, the schedule search on them (``exporter.budget``); the
summary head's centring and projection fitted on them (``fit_summary``); per batch, a trace to ONNX (opset >= 17, fp32 or fp16, fixed batches or a dynamic batch; onnx.checker, optional
simplification) validated by ONNX Runtime against torch on those images (``exporter.validate``; the export
fails over tolerance); the unmerged reference and the merged vs unmerged cosine; ONNX Runtime throughput;
TensorRT parser compatibility; the text tower when there is one; and finally manifest.json
(``exporter.manifest``).
"""

from __future__ import annotations

import copy
import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from exporter import __version__
from exporter.budget import choose_schedule, search_spec
from exporter.calibration import calibration_images
from exporter.errors import ExportError
from exporter.int8_cpu import cosine_rows, projections, quantize_dynamic_file
from exporter.manifest import build_manifest, input_spec
from exporter.options import ExportOptions, MergeConfig
from exporter.summary_head import ROTATION_SEED, fit_head
from exporter.search import SearchError, SearchResult, fidelity
from exporter.validate import (compare, ort_session, run_batched, self_baseline, throughput, throughput_side_by_side,
                               worst)
from exporter.vit import ViT, gflops
from runtime.cpu import int8_saturates
from tokenline import manifest as mf
from tokenline.summary import output_names

METHOD = "slic"  # the summary head the exporter builds (tokenline.summary.OUTPUTS)

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class ExportResult:
    manifest: mf.Manifest
    manifest_path: Path
    table: Dict[str, object]
    trt_verdict: Dict[str, object] = field(default_factory=dict)
    search: Optional[SearchResult] = None  # the schedule search, when a budget chose the schedule


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
    """Export ``vit`` with merge settings ``merge`` into ``opts.out_dir``; returns the manifest and a table.
    With ``merge.budget`` the schedule is chosen first by the schedule search on the calibration images."""
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vit = vit.eval()
    vit.configure_merging(merge)

    progress("preparing calibration images")
    calib = calibration_images(input_spec(vit), opts.calib_dir, opts.calib_count)
    searched = None
    if merge.budget is not None:
        merge, searched = search_schedule(vit, merge, opts, calib, progress)
    projection = fit_summary(vit, calib, "synthetic" if opts.calib_dir is None else "calibration", progress)
    files, stats = export_validated(vit, merge, opts, calib, progress)
    main = files[0]
    table = merge_table(vit, stats)
    int8_main = None
    file_loss = None
    if opts.cpu_int8:
        int8_files, int8_stats, int8_global = export_int8(vit, files, opts, calib, progress)
        table.update(int8_stats)
        int8_main = out / int8_files[0].path
        files.extend(int8_files)
        if searched is not None and searched.ref is not None:
            file_loss = int8_loss(searched, int8_global, progress)
    unmerged = None
    if merge.method != "none" and opts.export_unmerged:
        unmerged = export_unmerged(vit, merge, opts, main.batch, table, progress)
        files.append(unmerged)
    table.update(measure(out / main.path, None if unmerged is None else out / unmerged.path, main.batch, calib,
                         opts, progress, int8=int8_main))
    trt_verdict = check_trt(out / main.path, progress) if opts.check_trt else {}
    text_spec = None
    if text is not None:
        text_spec, text_files = export_text(text, out, opts.opset, progress)
        files.extend(text_files)

    manifest = build_manifest(vit, merge, opts, files, stats, table, text_spec, projection, family=family,
                              source_path=source_path, source_sha256=source_sha256,
                              search=search_spec(searched, file_loss) if searched else None)
    mpath = out / "manifest.json"
    manifest.write(mpath)
    progress(f"wrote {mpath}")
    return ExportResult(manifest=manifest, manifest_path=mpath, table=table, trt_verdict=trt_verdict, search=searched)


def planned_steps(merge: MergeConfig, opts: ExportOptions, text: bool = False) -> int:
    """How many times ``export_encoder`` will call ``progress`` with these settings (for a display's ETA). A budget's
    schedule search reports each candidate besides, so with ``merge.budget`` this is a lower bound."""
    merged = merge.method != "none"
    return (1  # calibration images
            + (1 if merge.budget is not None else 0)  # the search's choice
            + 1  # the summary projection
            + 2 * max(1, len(opts.batch_sizes))  # per encoder file: export, validate
            + (1 if merged and opts.export_unmerged else 0)
            + (2 if merged and opts.export_unmerged else 1)  # (merged vs unmerged,) throughput
            + 2 * max(1, len(opts.batch_sizes)) * opts.cpu_int8  # per INT8 file: quantize, validate
            + (1 if opts.cpu_int8 and merge.budget is not None else 0)  # the INT8 file's loss
            + (1 if opts.check_trt else 0)
            + (1 if text else 0)
            + 1)  # manifest.json


# -- the steps --------------------------------------------------------------------------------------
def search_schedule(vit: ViT, merge: MergeConfig, opts: ExportOptions, calib: np.ndarray,
                    progress: Progress) -> Tuple[MergeConfig, SearchResult]:
    """The schedule ``merge.budget`` allows on the user's calibration images (``exporter.budget``)."""
    if opts.calib_dir is None:
        raise ExportError("a budget is measured on your own images: give a folder of calibration images (--calib)")
    try:
        chosen, result = choose_schedule(vit, merge, calib, progress, int8=opts.cpu_int8,
                                         weight_bits=opts.cpu_int8_weight_bits)
    except SearchError as exc:
        raise ExportError(f"schedule search: {exc}") from None
    progress(f"schedule search: chose {result.chosen.candidate.name}" if result.chosen else
             f"schedule search: no candidate within {merge.budget:g} points; exporting unmerged")
    return chosen, result


def encoder_file(kind: str, precision: str, batch: Optional[int]) -> str:
    """File name of an encoder (``kind`` = its manifest role): ``encoder_fp32_b4.onnx``,
    ``encoder_unmerged_fp16_bdyn.onnx``..."""
    return f"{kind}_{precision}_{'bdyn' if batch is None else f'b{batch}'}.onnx"


def fit_summary(vit: ViT, calib: np.ndarray, fitted_on: str, progress: Progress, batch: int = 8) -> mf.ProjectionSpec:
    """Fit the summary head's centring and PCA projection on the calibration images' summary-layer tokens (as
    ``vit`` is configured, merges included) and bake them into the head; returns what the manifest records."""
    head = vit.head
    assert head is not None
    progress(f"fitting the summary projection (block {vit.summary_layer}, {head.mean.shape[0]} -> {head.dim} dims) "
             f"on {len(calib)} {fitted_on} images")
    explained = fit_head(vit, calib, batch)
    return mf.ProjectionSpec(method="pca" if head.dim < head.mean.shape[0] else "centre", input_dim=head.mean.shape[0],
                             dims=head.dim, fitted_on=fitted_on, images=len(calib), explained_variance=explained,
                             rotation_seed=ROTATION_SEED)


def export_validated(vit: ViT, merge: MergeConfig, opts: ExportOptions, calib: np.ndarray,
                     progress: Progress) -> Tuple[List[mf.FileSpec], Dict[str, float]]:
    """One merged encoder per batch size (one dynamic-batch file when there are none), each accepted only when
    ONNX Runtime agrees with torch on ``calib``. Returns their FileSpecs and the worst ``compare`` numbers."""
    merged = merge.method != "none"

    def run(x: np.ndarray) -> List[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in vit(torch.from_numpy(x))]

    ref = run(calib)
    baseline = self_baseline(run, calib) if merged else None  # torch against itself (near-ties, compare)
    out = Path(opts.out_dir)
    tokens = vit.tokens_per_block
    files: List[mf.FileSpec] = []
    stats: Dict[str, float] = {}
    for b in list(opts.batch_sizes) or [None]:
        fname = encoder_file("encoder", opts.precision, b)
        progress(f"exporting {fname} (merge: {merge.method}, tokens {tokens[0]}->"
                 f"{vit.schedule.final_patches + vit.cfg.num_prefix})")
        path = out / fname
        export_onnx(vit, path, b, opts.opset, opts.precision, opts.simplify)
        progress(f"validating {fname} with ONNX Runtime against torch")
        got = run_batched(ort_session(path), calib, b)
        cmp, problems = compare(ref, got, opts.max_abs_error, merged=merged, precision=opts.precision,
                                baseline=baseline)
        log.info("%s: %s", fname, cmp)
        if problems:
            raise ExportError(f"{fname}: ONNX Runtime disagrees with torch: " + "; ".join(problems))
        stats = worst(stats, cmp)
        files.append(mf.FileSpec(path=fname, sha256=mf.sha256_file(path), role="encoder",
                                 precision=opts.precision, batch=b))
    return files, stats


# an encoder_int8 file whose global embedding strays further from fp32 on average is refused: a model that does not
# quantize well. Mean, not minimum: merged graphs flip near-tie merges under INT8's rounding, which moves a few
# images far (ToMe r = 18 on 200 NEU-DET images: min 0.82, mean 0.9966; unmerged: mean 0.9994); the budget's
# label-free loss is what bounds those (merge.search.file_loss)
INT8_COSINE_MEAN = 0.99


def export_int8(vit: ViT, files: List[mf.FileSpec], opts: ExportOptions, calib: np.ndarray,
                progress: Progress) -> Tuple[List[mf.FileSpec], Dict[str, float], np.ndarray]:
    """The ONNX Runtime dynamic INT8 version of each encoder file (``exporter.int8_cpu``), each accepted only when
    its global embeddings on ``calib`` stay near the fp32 encoder's in torch (mean cosine) and it quantizes exactly the
    projections the search's simulation does.
    Returns their FileSpecs, the cosine numbers and the first file's global embeddings of ``calib``."""
    out = Path(opts.out_dir)
    made: List[mf.FileSpec] = []
    cos_all: List[np.ndarray] = []
    first = None
    n_simulated = len(projections(vit))  # what the search's INT8 simulation quantizes
    bits = opts.cpu_int8_weight_bits
    if bits == 8 and int8_saturates():
        log.warning("this x86 CPU has no VNNI: ONNX Runtime saturates 8-bit INT8 weight products here, so the "
                    "encoder_int8 files measure less accurate on it than on ARM or VNNI CPUs (the manifest's INT8 "
                    "cosines and file loss are this CPU's); an edge like it needs --cpu-int8-weight-bits 7")
    step = 8  # the fp32 encoder in torch, what every INT8 file is held against (any batch gives the same)
    with torch.no_grad():
        fp32 = torch.cat([vit(torch.from_numpy(calib[i : i + step]))[0] for i in range(0, len(calib), step)]).numpy()
    for f in files:
        b = f.batch
        fname = encoder_file("encoder", "int8", b)
        progress(f"quantizing {fname} (ONNX Runtime dynamic INT8, {bits}-bit weights, for CPUs)")
        made_n = quantize_dynamic_file(out / f.path, out / fname, weight_bits=bits)
        progress(f"validating {fname} with ONNX Runtime against torch")
        sess = ort_session(out / fname)
        got = run_batched(sess, calib, b or opts.bench_batch)[0]  # at the file's own batch
        if b and b > 1:  # activation ranges per image: an image's embedding does not depend on its batch mates
            alone = run_batched(sess, np.repeat(calib[:1], b, axis=0), b)[0][0]
            if not np.allclose(alone, got[0], rtol=1e-4, atol=1e-6):
                raise ExportError(f"{fname}: an image's embedding changes with the images batched with it "
                                  f"(cosine {float(cosine_rows(alone[None], got[:1])[0]):.5f}); please report this "
                                  "onnxruntime version")
        cos = cosine_rows(fp32, got)
        log.info("%s: %d projections quantized; cosine vs fp32 mean %.5f min %.5f", fname, made_n, cos.mean(),
                 cos.min())
        if made_n != n_simulated:
            raise ExportError(f"{fname}: the file quantizes {made_n} projections, the search's simulation of it "
                              f"{n_simulated}; please report this model")
        if cos.mean() < INT8_COSINE_MEAN:
            raise ExportError(f"{fname}: INT8 global embedding cosine to fp32 {cos.mean():.4f} on average "
                              f"(< {INT8_COSINE_MEAN}): this model does not quantize well; export without cpu_int8")
        cos_all.append(cos)
        first = got if first is None else first
        made.append(mf.FileSpec(path=fname, sha256=mf.sha256_file(out / fname), role="encoder_int8", precision="int8",
                                batch=b, weight_bits=bits))
    cos = np.concatenate(cos_all)
    return made, {"int8_cosine_vs_fp32_mean": float(cos.mean()), "int8_cosine_vs_fp32_min": float(cos.min())}, first


def int8_loss(searched: SearchResult, emb: np.ndarray, progress: Progress) -> float:
    """The search's label-free loss measured on the written INT8 file's embeddings ``emb`` of the calibration
    images; a warning when it exceeds the budget the simulation kept (the two differ by calibration noise)."""
    loss = fidelity(searched.ref, emb).loss
    chosen = searched.chosen.fidelity if searched.chosen else searched.base
    progress(f"the INT8 file's loss on the calibration images: {loss:.2f} points (the search's simulation: "
             f"{chosen.loss if chosen else 0.0:.2f})")
    if loss > searched.budget:
        log.warning("the encoder_int8 file loses %.2f points on the calibration images, over the budget of %g that "
                    "the search's simulation of it kept (%.2f): the estimate is that noisy here; give the budget "
                    "some margin or check the file on labelled frames", loss, searched.budget,
                    chosen.loss if chosen else 0.0)
    return loss


def merge_table(vit: ViT, stats: Dict[str, float]) -> Dict[str, object]:
    """The export's table for the merged encoder: tokens and merges per block, GFLOPs, agreement with torch."""
    return {
        "tokens_per_block": vit.tokens_per_block,
        "r_per_block": vit.schedule.r_per_block,
        "gflops": gflops(vit.cfg, vit.tokens_per_block, vit.schedule.r_per_block),
        "max_abs_err_vs_torch": stats["max_abs_err"],
        "max_rel_err_vs_torch": stats["max_rel_err"],
        "token_err_vs_torch": stats["token_err"],
        "images_matching_torch": stats["matched_fraction"],
        "images_torch_matches_itself": stats.get("self_matched_fraction"),
        "footprint_agreement_vs_torch": stats["footprint_agreement"],
    }


def export_unmerged(vit: ViT, merge: MergeConfig, opts: ExportOptions, batch: Optional[int],
                    table: Dict[str, object], progress: Progress) -> mf.FileSpec:
    """The same encoder without merging (``merge.unmerged()``), for comparisons; its tokens and GFLOPs go into
    ``table``. ``vit`` is configured with ``merge`` again afterwards."""
    progress("exporting the unmerged encoder for comparison")
    vit.configure_merging(merge.unmerged())
    fname = encoder_file("encoder_unmerged", opts.precision, batch)
    path = Path(opts.out_dir) / fname
    export_onnx(vit, path, batch, opts.opset, opts.precision, opts.simplify)
    table["tokens_per_block_unmerged"] = vit.tokens_per_block
    table["gflops_unmerged"] = gflops(vit.cfg, vit.tokens_per_block, vit.schedule.r_per_block)
    vit.configure_merging(merge)
    return mf.FileSpec(path=fname, sha256=mf.sha256_file(path), role="encoder_unmerged", precision=opts.precision,
                       batch=batch)


def measure(merged: Path, unmerged: Optional[Path], batch: Optional[int], calib: np.ndarray, opts: ExportOptions,
            progress: Progress, int8: Optional[Path] = None) -> Dict[str, float]:
    """ONNX Runtime numbers of the main encoder: cosine to the unmerged one on ``calib`` (when there is one) and
    throughput (images/s, median of ``opts.bench_runs``; the encoders, ``int8`` too when given, side by side)."""
    table: Dict[str, float] = {}
    bench_b = batch or opts.bench_batch
    bench_x = np.ascontiguousarray(np.resize(calib, (bench_b, *calib.shape[1:])), dtype=np.float32)
    sess = ort_session(merged)
    sessions = {"ort_images_per_s": sess}
    if unmerged is not None:
        progress("comparing merged against unmerged on the calibration images")
        un_sess = ort_session(unmerged)
        cos = (run_batched(un_sess, calib, batch)[0] * run_batched(sess, calib, batch)[0]).sum(-1)
        table["cosine_vs_unmerged_mean"] = float(cos.mean())
        table["cosine_vs_unmerged_min"] = float(cos.min())
        sessions["ort_images_per_s_unmerged"] = un_sess
    if int8 is not None:
        sessions["ort_images_per_s_int8"] = ort_session(int8)
    progress(f"measuring ONNX Runtime throughput (batch {bench_b}, median of {opts.bench_runs})")
    if len(sessions) == 1:
        table["ort_images_per_s"] = throughput(sess, bench_x, opts.bench_runs)
    else:
        rates = throughput_side_by_side(list(sessions.values()), bench_x, max(1, opts.bench_runs // 2))
        table.update(zip(sessions, rates))
    return table


# -- ONNX -------------------------------------------------------------------------------------------
class _Wrapped(torch.nn.Module):
    """float32 in and out around the encoder, which runs in ``dtype`` (fp16 keeps LayerNorm stats in fp32)."""

    def __init__(self, vit: ViT, dtype: torch.dtype) -> None:
        super().__init__()
        self.vit, self.dtype = vit, dtype

    def forward(self, pixels: torch.Tensor):  # noqa: D401
        outs = self.vit(pixels.to(self.dtype))
        return tuple(o.float() if o.is_floating_point() else o for o in outs)


def export_onnx(vit: ViT, path: Path, batch: Optional[int], opset: int, precision: str, simplify: bool) -> None:
    """Trace ``vit`` (its current merge schedule) into ``path``; ``batch=None`` gives a dynamic batch axis."""
    import onnx  # noqa: PLC0415

    h, w = vit.cfg.image_size
    dummy = torch.randn(batch or 2, 3, h, w)
    dynamic = None
    names = output_names(METHOD)
    if batch is None:
        dynamic = {n: {0: "batch"} for n in (mf.INPUT_NAME, *names)}
    dtype = torch.float16 if precision == "fp16" else torch.float32
    module = _Wrapped(copy.deepcopy(vit).to(dtype) if precision == "fp16" else vit, dtype).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (dummy,), str(path), dynamo=False, opset_version=opset,
            input_names=[mf.INPUT_NAME], output_names=list(names), dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    model = onnx.load(str(path))
    if simplify:
        import onnxslim  # noqa: PLC0415

        model = onnxslim.slim(model)
    model.producer_name, model.producer_version = "tokenline-exporter", __version__
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def check_trt(path: Path, progress: Progress) -> Dict[str, object]:
    """Run the TensorRT parser compatibility check when the checker is available."""
    try:
        from exporter.trt.compat import check_onnx  # noqa: PLC0415
    except ImportError:
        log.warning("TensorRT compatibility checker not available in this build; skipped")
        return {}
    progress("checking TensorRT parser compatibility (JetPack 5, JetPack 6, TensorRT 10)")
    return dict(check_onnx(path))


def export_text(text, out: Path, opset: int, progress: Progress):
    """Export a text tower next to the encoder; returns (TextSpec, [FileSpec])."""
    from exporter.text import export_text_onnx  # noqa: PLC0415

    progress("exporting the text tower")
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
