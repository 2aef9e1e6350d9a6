"""Human summary of an export: the final tables the CLI prints (schedule search, tokens per block, GFLOPs, speed,
errors)."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from exporter.export import ExportResult
from exporter.search import MEASURE, SUMMARY_MEASURE, SearchResult, fits


def _fmt(v: object, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def render_search(result: SearchResult, console: Console) -> None:
    """Every schedule the search evaluated, cheapest first: the Pareto front marked, the choice highlighted.

    Fits an 80-column terminal: numbers never wrap, the schedule cell (shape, level, alpha, merges per block)
    does; units and measures are in the caption."""
    front = {id(p) for p in result.pareto}
    int8 = result.precision == "int8"
    sb = result.summary_budget
    table = Table(title=f"schedule search within {result.budget:g} points ({MEASURE}"
                        + ("" if sb is None else f") and {sb:g} summary points ({SUMMARY_MEASURE}")
                        + f"{', merged and INT8 together' if int8 else ''}; "
                        f"{result.points[0].fidelity.images if result.points else 0} calibration images)",
                  caption="pick: chosen, or * on the Pareto front (speed-up against loss); speed-up: FLOP model; "
                          "loss" + ("" if sb is None else " and summary") + ": points; NN agr.: top-10 "
                          "neighbour agreement; cos min: lowest cosine to the unmerged embedding",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    cols = ["pick", "schedule (merges per block)", "speed-up", "loss"] + ([] if sb is None else ["summary"]) + [
        "NN agr.", "cos min"]
    for col in cols:
        wraps = col.startswith("schedule")
        table.add_column(col, justify="left" if col in ("pick",) or wraps else "right", no_wrap=not wraps,
                         min_width=None if wraps else max(len(col), 6), ratio=1 if wraps else None)

    def cells(f) -> list:
        return [f"{f.loss:.2f}"] + ([] if sb is None else [_fmt(f.summary_loss, ".2f")]) + [
            f"{f.nn_agreement:.3f}", f"{f.cosine_min:.4f}"]

    for p in sorted(result.points, key=lambda p: p.candidate.gflops):
        c, f = p.candidate, p.fidelity
        style = "bold green" if p is result.chosen else None if fits(f, result.budget, sb) else "dim"
        pre = f"pre {c.pre_r} + " if c.pre_r else ""
        table.add_row("chosen" if p is result.chosen else "*" if id(p) in front else "",
                      f"{c.family} {c.level:g}x, alpha {c.alpha:g}: {pre}r {', '.join(map(str, c.r_per_block))}",
                      f"{c.speedup:.2f}x", *cells(f), style=style)
    if result.base is not None:
        table.add_row("chosen" if result.chosen is None else "", f"unmerged ({result.precision})", "1.00x",
                      *cells(result.base), style="bold green" if result.chosen is None else None)
    console.print(table)


def render_result(result: ExportResult, console: Console) -> None:
    t, m = result.table, result.manifest
    if result.search is not None:
        render_search(result.search, console)
    merged = t["tokens_per_block"]
    unmerged = t.get("tokens_per_block_unmerged")
    blocks = Table(title="tokens per block", show_lines=False)
    blocks.add_column("block", justify="right")
    if unmerged:
        blocks.add_column("unmerged", justify="right")
    blocks.add_column("merged", justify="right")
    blocks.add_column("r", justify="right")
    for i, (n, r) in enumerate(zip(merged, t["r_per_block"])):
        row = [str(i)] + ([str(unmerged[i])] if unmerged else []) + [str(n), str(r)]
        blocks.add_row(*row)
    console.print(blocks)

    summary = Table(title=f"{m.name}: {m.family}, {m.precision}, merge={m.merge.method} alpha={m.merge.alpha:g}, K={m.summary.k}")
    summary.add_column("metric")
    summary.add_column("unmerged", justify="right")
    summary.add_column("merged", justify="right")
    summary.add_column("ratio", justify="right")
    g0, g1 = t.get("gflops_unmerged"), t["gflops"]
    s0, s1 = t.get("ort_images_per_s_unmerged"), t["ort_images_per_s"]
    summary.add_row("GFLOPs / image", _fmt(g0, ".2f"), _fmt(g1, ".2f"), _fmt(g0 / g1 if g0 else None, ".2f") + "x" if g0 else "-")
    summary.add_row("ONNX Runtime CPU images/s", _fmt(s0, ".1f"), _fmt(s1, ".1f"), _fmt(s1 / s0, ".2f") + "x" if s0 else "-")
    s8 = t.get("ort_images_per_s_int8")
    if s8:
        summary.add_row("ONNX Runtime CPU images/s, merged in INT8 (encoder_int8)", _fmt(s0, ".1f"), _fmt(s8, ".1f"),
                        _fmt(s8 / s0, ".2f") + "x" if s0 else "-")
        summary.add_row("encoder_int8 cosine vs fp32 (mean / min)", "", f"{_fmt(t.get('int8_cosine_vs_fp32_mean'), '.4f')}"
                        f" / {_fmt(t.get('int8_cosine_vs_fp32_min'), '.4f')}", "")
    summary.add_row("cosine vs unmerged (mean / min)", "1", f"{_fmt(t.get('cosine_vs_unmerged_mean'), '.4f')} / "
                    f"{_fmt(t.get('cosine_vs_unmerged_min'), '.4f')}", "")
    summary.add_row("max abs error vs torch", "", _fmt(t["max_abs_err_vs_torch"], ".2e"), "")
    own = t.get("images_torch_matches_itself")
    summary.add_row("images matching torch within tolerance", "", f"{t['images_matching_torch']:.0%}"
                    + (f" (torch itself: {own:.0%})" if own is not None else ""), "")
    summary.add_row("summary token error vs torch (1-cos)", "", _fmt(t["token_err_vs_torch"], ".2e"), "")
    summary.add_row("footprint cells matching torch", "", f"{t['footprint_agreement_vs_torch']:.1%}", "")
    console.print(summary)
    s = m.summary
    if s.projection is not None:
        p = s.projection
        console.print(f"summary head: {s.method}, K={s.k}, block {s.layer} of {m.encoder.depth}, {p.method} "
                      f"{p.input_dim} -> {p.dims} dims ({p.explained_variance:.1%} of the variance, {p.images} "
                      f"{p.fitted_on} images), footprint {s.footprint_grid[0]}x{s.footprint_grid[1]}"
                      if s.footprint_grid else "")

    if result.trt_verdict:
        trt = Table(title="TensorRT parser compatibility")
        trt.add_column("target")
        trt.add_column("verdict")
        trt.add_column("problems")
        for target, report in result.trt_verdict.items():
            ok = getattr(report, "ok", None)
            problems = getattr(report, "problems", [])
            trt.add_row(target, "[green]ok[/]" if ok else "[red]fails[/]",
                        "; ".join(getattr(p, "message", str(p)) for p in problems[:3]) or "-")
        console.print(trt)
    files = ", ".join(f.path for f in m.files)
    console.print(f"manifest: {result.manifest_path}  (hash {m.hash()[:16]})\nfiles: {files}")
