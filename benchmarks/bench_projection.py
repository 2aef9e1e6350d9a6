"""Benchmark: what the exported summary's projection costs ELPV anomaly AUROC, and which images to fit it on.

    python benchmarks/bench_projection.py            # ELPV mono cells, 5 bank draws; writes BENCHMARKS.md
    python benchmarks/bench_projection.py --poly     # also the held-out poly cells (after the mono reading)

The default export's K=16 summary stays about 0.03 AUROC under all 256 patch tokens on ELPV cells (`elpv_gap`,
`elpv_metric`). Its tokens pass a PCA fitted at export (384 -> 96 dims, on 16 calibration images) and int8 on the
wire. This study exports the reference ViT-S/14 unmerged at K=16 several times (tokenline-export, into a temporary
folder), changing only the projection: its dimension (96; 112, int8's largest within issue 14's 2,560 B message;
192; none) and the images it is fitted on (16 or 64 NEU-DET images, as `make demo` does, or 16 or 64 good cells of
the line itself: ELPV cells of the same kind, normal, none of them in the study's banks or scored cells). Each
export's own summaries (ONNX Runtime) are scored over the same bank draws as `elpv_gap` in both of central's
metrics, the gap to the bound paired within each draw and metric; the projection's share of the gap is the
default's gap less the unprojected export's, the rest is the clustering of 256 patches into 16 tokens. The ELPV
cells never leave the machine's temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import write_section  # noqa: E402
from benchmarks.bench_elpv_gap import LAYER, bank_draws, elpv_aurocs, exported_reps  # noqa: E402
from benchmarks.bench_summary import (FeatureSets, Variant, elpv_selection, layer_feats, md_table,  # noqa: E402
                                      message_bytes, neu_data, patch_rep)
from benchmarks.neu_det import NEU_DET  # noqa: E402
from tokenline.anomaly import METRICS  # noqa: E402

SECTION = "elpv_projection"
# (row label, --summary-dim (0: none), calibration images ("neu" or "line"), --calib-count, token dtypes)
EXPORTS: List[Tuple[str, int, str, int, Tuple[str, ...]]] = [
    ("PCA 96 fitted on 16 NEU-DET images (default)", 96, "neu", 16, ("int8", "int4")),
    ("PCA 96 fitted on 64 NEU-DET images", 96, "neu", 64, ("int8",)),
    ("PCA 96 fitted on 16 good cells of the line", 96, "line", 16, ("int8",)),
    ("PCA 96 fitted on 64 good cells of the line", 96, "line", 64, ("int8",)),
    ("PCA 112 fitted on 16 NEU-DET images", 112, "neu", 16, ("int8",)),  # int8's largest d within 2,560 B
    ("PCA 192 fitted on 16 NEU-DET images", 192, "neu", 16, ("int8", "int4")),
    ("no projection (384 dims, centred)", 0, "neu", 16, ("int8",)),
]
BUDGET_BYTES = 2560  # issue 14's message budget (2.5 KB at K=16)
LINE_CELLS = 64  # good cells of the line written for the "line" calibrations (seeded, outside the study's cells)


def line_cells(kind: str, folder: Path) -> Path:
    """Write LINE_CELLS normal ELPV cells of ``kind`` that the study never scores or banks into ``folder``."""
    import cv2
    from elpv_dataset.utils import load_dataset

    images, probs, keep = elpv_selection(kind == "poly")
    types = load_dataset()[2]
    spare = np.setdiff1d(np.flatnonzero((types == kind) & (probs == 0)), keep)
    folder.mkdir(parents=True, exist_ok=True)
    for i in np.random.default_rng(11).permutation(spare)[:LINE_CELLS]:
        cv2.imwrite(str(folder / f"cell{i:04d}.png"), images[i])
    return folder


def export(out: Path, dim: int, calib: Path, count: int, console) -> Path:
    """tokenline-export export of the reference checkpoint, unmerged, K=16, the given projection."""
    from exporter.checkpoints.reference import reference_checkpoint
    from exporter.cli import main as export_main

    args = ["export", str(reference_checkpoint()), "--out", str(out), "--r", "0", "--k", "16",
            "--summary-dim", str(dim), "--calib", str(calib), "--calib-count", str(count), "--name", out.name]
    with contextlib.redirect_stdout(io.StringIO()) as log:
        rc = export_main(args)
    if rc:
        raise SystemExit(f"export failed: {' '.join(args)}\n{log.getvalue()[-2000:]}")
    console.log(f"exported {out.name}")
    return out


def study(fs: FeatureSets, kind: str, tmp: Path, draws: int, console) -> List[dict]:
    """One row per export and dtype (and the bound first) on the ELPV cells of ``kind``."""
    probs, _, feats = fs.elpv(224, poly=kind == "poly")
    masks = bank_draws(probs, draws)
    line = line_cells(kind, tmp / f"line-{kind}")
    dirs, rows = [], []
    for i, (_, dim, src, count, _) in enumerate(EXPORTS):
        out = tmp / f"k16-{'line-' + kind if src == 'line' else 'neu'}-{i}"
        dirs.append(out if out.is_dir() else export(out, dim, line if src == "line" else NEU_DET, count, console))
    reps = {"bound": patch_rep(layer_feats(feats, LAYER).astype(np.float32))}
    for (label, *_), (_, _, rep) in zip(EXPORTS, exported_reps(fs, dirs, probs, poly=kind == "poly")):
        reps[label] = rep
    plan = [("all patch tokens (centred), fp32 [bound]", Variant("b", "bound", "fp32", 384), 0)]
    for label, dim, _, _, dtypes in EXPORTS:
        d = dim or 384
        plan += [(f"{label}, {dt}", Variant("p", label, dt), message_bytes(16, d, dt, 256)) for dt in dtypes]
    got: Dict[str, Dict[str, np.ndarray]] = {}
    for metric in METRICS:
        for name, v, _ in plan:
            a = elpv_aurocs(probs, masks, lambda mask, r=reps[v.rep]: r, v, metric)
            got.setdefault(name, {})[metric] = a
            console.log(f"{kind} {metric} {name}: {np.mean(a):.3f}")
    bound = got[plan[0][0]]
    for name, _, size in plan:
        g = got[name]
        rows.append({"cells": kind, "rep": name, "bytes": size or "", "cos": g["cosine"].mean(),
                     "cgap": (bound["cosine"] - g["cosine"]).mean(), "white": g["whitened"].mean(),
                     "wgap": (bound["whitened"] - g["whitened"]).mean(),
                     "ratio": g["whitened"].mean() / bound["whitened"].mean(),
                     "draws": " ".join(f"{x:.3f}" for x in g["whitened"])})
    return rows


def findings(rows: List[dict]) -> str:
    """The projection's share of the default's gap and the calibration images' effect, per kind of cell."""
    out = []
    for kind in dict.fromkeys(r["cells"] for r in rows):
        by = {r["rep"]: r for r in rows if r["cells"] == kind}
        default, full = by[f"{EXPORTS[0][0]}, int8"], by[f"{EXPORTS[-1][0]}, int8"]
        l16, l64 = by[f"{EXPORTS[2][0]}, int8"], by[f"{EXPORTS[3][0]}, int8"]
        out.append(f"- {kind}: the default export is {default['wgap']:.3f} under the bound whitened "
                   f"({default['cgap']:.3f} cosine); without a projection {full['wgap']:.3f} ({full['cgap']:.3f}): the "
                   f"projection costs {default['wgap'] - full['wgap']:+.3f} whitened "
                   f"({default['cgap'] - full['cgap']:+.3f} cosine), the 16-token clustering the rest. Fitted on "
                   f"good cells of the line instead of NEU-DET images: {default['white'] - l16['white']:+.3f} / "
                   f"{default['white'] - l64['white']:+.3f} whitened (16 / 64 cells; positive: NEU-DET better), "
                   f"{default['cos'] - l16['cos']:+.3f} / {default['cos'] - l64['cos']:+.3f} cosine.")
        fits = [r for r in by.values() if r["bytes"] and r["bytes"] <= BUDGET_BYTES]
        best = max(fits, key=lambda r: r["ratio"])
        dims = ", ".join(f"{r['rep']} {r['ratio']:.3f} ({r['bytes']:,} B)" for r in by.values()
                         if r["rep"].endswith("int8") and "line" not in r["rep"] and "64 NEU" not in r["rep"])
        out.append(f"- {kind}, share of the bound (whitened) by the projection's dimension: {dims}. Within "
                   f"{BUDGET_BYTES:,} B the best is {best['rep']} at {best['ratio']:.3f}.")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draws", type=int, default=5, help="ELPV bank draws")
    ap.add_argument("--poly", action="store_true", help="also the held-out ELPV poly cells")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    if elpv_selection() is None:
        console.print("[red]ELPV data missing (pip install elpv-dataset): nothing to study[/red]")
        return 1
    rows: List[dict] = []
    with tempfile.TemporaryDirectory() as tmp, Progress(console=console, transient=True) as progress:
        fs = FeatureSets(neu_data(), progress)
        for kind in ("mono", "poly") if args.poly else ("mono",):
            rows += study(fs, kind, Path(tmp), args.draws, console)
    table = md_table(rows, [("cells", "ELPV cells", ""), ("rep", "exported K=16 summary: projection, tokens", ""),
                            ("bytes", "message bytes", ",d"), ("cos", "cosine AUROC", ".3f"),
                            ("cgap", "gap to bound", "+.3f"), ("white", "whitened AUROC", ".3f"),
                            ("wgap", "gap to bound (whitened)", "+.3f"), ("ratio", "of the bound (whitened)", ".3f"),
                            ("draws", "whitened, per draw", "")])
    console.print(table)
    body = ("Every row an export of the reference ViT-S/14 (unmerged, K=16) that differs from `make demo`'s unmerged "
            "K=16 only in its projection; its own summaries of the ELPV cells through ONNX Runtime, quantized as the "
            f"wire sends them, scored over {args.draws} bank draws of 100 normal cells (the draws of `elpv_gap`) by "
            "each frame's largest distance from a token to its nearest bank token; gaps paired with all 256 patch "
            "tokens in the same draw and metric (whitened: central's default). The line's cells for the "
            f"projection: {LINE_CELLS} normal cells of the same kind outside the study's cells (16 of them spread "
            "over the folder for `--calib-count 16`). Message bytes: a whole wire message of a 224 px frame. "
            "Poly cells are held out: read after the mono rows.\n\n" + table + "\n\n" + findings(rows) + "\n")
    if args.write:
        write_section(SECTION, "ELPV anomaly: the exported summary's projection and its calibration images", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
