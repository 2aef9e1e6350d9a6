"""TensorRT subcommands of ``tokenline-export``: check-trt, quantize-int8, build-engine.

``register_cli(subparsers)`` adds them to the parser that ``exporter.cli.build_parser`` builds (run them with
``tokenline-export`` or ``python -m exporter.cli``; neither imports torch for them). Verdicts and summaries are
printed as rich tables; exit code 1 means a check failed, 2 bad input (one line on stderr, ``runtime.cli``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Tuple

from exporter.trt.operators import DEFAULT_TARGETS, TARGETS
from runtime.cli import CliError

log = logging.getLogger(__name__)


def _targets(text: str) -> List[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if "all" in names:
        return list(TARGETS)
    bad = [n for n in names if n not in TARGETS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown target(s) {bad}; choose from {', '.join(TARGETS)} or 'all'")
    return names


def _batch_list(text: str) -> Tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be positive integers, e.g. 1 or 1,4")
    return vals


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add check-trt, quantize-int8 and build-engine to ``sub``."""
    p = sub.add_parser("check-trt", help="check an ONNX model against TensorRT versions (no TensorRT needed)",
                       description="Report, per TensorRT target, what would stop the ONNX parser or change results.")
    p.add_argument("model", type=Path, help="ONNX file")
    p.add_argument("--target", type=_targets, action="append", default=None,
                   help=f"{' | '.join(TARGETS)} | all; repeat or comma-separate (default: {','.join(DEFAULT_TARGETS)})")
    p.add_argument("--max-problems", type=int, default=30, help="problems listed per target")
    p.set_defaults(func=cmd_check)

    q = sub.add_parser("quantize-int8", help="write a QDQ (explicit INT8) ONNX from calibration images",
                       description="Calibrate on a folder of your own frames (preprocessed per the manifest) and "
                                   "write a QDQ ONNX that TensorRT builds into an INT8 engine.")
    q.add_argument("model", type=Path, help="export directory (with manifest.json) or an ONNX file inside it")
    q.add_argument("--calib", type=Path, required=True, help="folder of calibration images")
    q.add_argument("--count", type=int, default=64, help="calibration images used (spread over the folder)")
    q.add_argument("--batch", type=int, default=None, help="manifest batch whose encoder file to quantize")
    q.add_argument("--scope", choices=["no-down-proj", "projections", "all"], default="no-down-proj",
                   help="no-down-proj: weight layers except MLP down-projections (default, measured best); "
                        "projections: all weight layers; all: every MatMul too")
    q.add_argument("--calibration", choices=["minmax", "percentile", "entropy"], default="minmax")
    q.add_argument("--percentile", type=float, default=99.99)
    q.add_argument("--out", type=Path, default=None, help="output ONNX (default: <encoder>_qdq.onnx next to it)")
    q.add_argument("--no-manifest-update", action="store_true",
                   help="do not add the QDQ file to manifest.json (role encoder_qdq)")
    q.set_defaults(func=cmd_quantize)

    b = sub.add_parser("build-engine", help="build a TensorRT engine (run on the Jetson / target GPU)",
                       description="Build an FP16 or INT8 (from a QDQ ONNX) engine with a sidecar JSON; reuses a "
                                   "timing cache; refuses or rebuilds stale engines in the output directory.")
    b.add_argument("model", type=Path, help="export directory (with manifest.json) or an ONNX file")
    b.add_argument("--precision", choices=["fp16", "int8", "fp32"], default="fp16")
    b.add_argument("--batch", type=_batch_list, default=None,
                   help="batch sizes (default: the manifest's; a dynamic ONNX gets one profile min..max)")
    b.add_argument("--workspace-mib", type=int, default=1024)
    b.add_argument("--dla-core", type=int, default=None, help="build for this DLA core (Jetson), GPU fallback on")
    b.add_argument("--timing-cache", type=Path, default=None, help="default: <out>/timing.cache")
    b.add_argument("--opt-level", type=int, default=None, help="builder optimization level 0..5 (TensorRT 8.6+)")
    b.add_argument("--out", type=Path, default=None, help="engine directory (default: the model's directory)")
    b.add_argument("--name", default=None, help="model name in the engine file name (default: manifest name)")
    b.add_argument("--rebuild-on-mismatch", action="store_true",
                   help="rebuild an existing engine built for another TensorRT/GPU/ONNX instead of refusing")
    b.set_defaults(func=cmd_build)


# ---------------------------------------------------------------------------------------------------------------


def _console():
    from rich.console import Console  # noqa: PLC0415

    return Console()


def render_reports(reports, console, max_problems: int = 30) -> None:
    """Verdict table (one row per target) followed by one problem table per failing/warning target."""
    from rich.table import Table  # noqa: PLC0415

    verdict = Table(title="TensorRT compatibility")
    for col in ("target", "TensorRT", "verdict", "errors", "warnings"):
        verdict.add_column(col)
    for name, rep in reports.items():
        verdict.add_row(name, TARGETS[name].description, "[green]ok[/]" if rep.ok else "[bold red]FAILS[/]",
                        str(len(rep.errors)), str(len(rep.warnings)))
    console.print(verdict)
    for name, rep in reports.items():
        if not rep.problems:
            continue
        t = Table(title=f"{name}: problems", show_lines=False)
        for col in ("severity", "kind", "node", "op", "message"):
            t.add_column(col, overflow="fold")
        for p in rep.problems[:max_problems]:
            sev = "[red]error[/]" if p.severity == "error" else "[yellow]warning[/]"
            t.add_row(sev, p.kind, p.node, p.op_type, p.message)
        if len(rep.problems) > max_problems:
            t.add_row("", "", "", "", f"... {len(rep.problems) - max_problems} more")
        console.print(t)


def cmd_check(args: argparse.Namespace) -> int:
    from exporter.trt.compat import CompatError, check_onnx  # noqa: PLC0415

    console = _console()
    targets: List[str] = []
    for group in args.target or [list(DEFAULT_TARGETS)]:
        targets.extend(t for t in group if t not in targets)
    try:
        reports = check_onnx(args.model, targets)
    except CompatError as exc:
        raise CliError(str(exc)) from exc
    render_reports(reports, console, args.max_problems)
    return 0 if all(r.ok for r in reports.values()) else 1


def _resolve(model: Path):
    """(manifest or None, model_dir, onnx file or None) from a directory or ONNX path."""
    from tokenline.manifest import Manifest  # noqa: PLC0415

    if model.is_dir():
        return Manifest.from_file(model), model, None
    if not model.is_file():
        raise FileNotFoundError(f"{model}: no such file or directory")
    mpath = model.parent / "manifest.json"
    manifest = Manifest.from_file(mpath) if mpath.is_file() else None
    return manifest, model.parent, model


def cmd_quantize(args: argparse.Namespace) -> int:
    from exporter.trt.compat import check_onnx  # noqa: PLC0415
    from exporter.trt.quantize import QuantizeError, QuantizeOptions, qdq_summary, quantize_from_folder  # noqa
    from tokenline.manifest import FileSpec, ManifestError, sha256_file  # noqa: PLC0415

    console = _console()
    try:
        manifest, model_dir, onnx_path = _resolve(args.model)
        if manifest is None:
            raise ManifestError(f"no manifest.json next to {args.model}: it defines the preprocessing")
        if onnx_path is None:
            onnx_path = model_dir / manifest.file("encoder", batch=args.batch).path
        out = args.out or onnx_path.with_name(onnx_path.stem + "_qdq.onnx")
        opts = QuantizeOptions(scope=args.scope, calibration=args.calibration, percentile=args.percentile,
                               count=args.count)
        with console.status("quantizing") as status:
            quantize_from_folder(onnx_path, out, args.calib, manifest.input, opts, progress=status.update)
    except (QuantizeError, ManifestError, FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    import onnx  # noqa: PLC0415

    counts = qdq_summary(onnx.load(str(out)))
    console.print(f"wrote {out}: {counts.get('QuantizeLinear', 0)} QuantizeLinear, "
                  f"{counts.get('DequantizeLinear', 0)} DequantizeLinear ({opts.scope} scope, {opts.calibration})")
    if not args.no_manifest_update and out.parent.resolve() == model_dir.resolve():
        src = next((f for f in manifest.files if f.path == onnx_path.name), None)
        files = [f for f in manifest.files if not (f.role == "encoder_qdq" and f.path == out.name)]
        files.append(FileSpec(path=out.name, sha256=sha256_file(out), role="encoder_qdq", precision="int8",
                              batch=src.batch if src else None))
        new = manifest.model_copy(update={"files": files})
        new.write(model_dir / "manifest.json")
        console.print(f"manifest updated (role encoder_qdq); its hash is now {new.hash()[:16]}")
    render_reports(check_onnx(out), console, 10)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from exporter.trt.engine import BuildOptions, EngineCache, EngineError  # noqa: PLC0415
    from tokenline.manifest import ManifestError  # noqa: PLC0415

    console = _console()
    try:
        manifest, model_dir, onnx_path = _resolve(args.model)
        out = args.out or model_dir
        jobs: List[Tuple[Path, Tuple[int, ...]]] = []
        role = "encoder_qdq" if args.precision == "int8" else "encoder"
        if onnx_path is not None:
            batches = args.batch or tuple(manifest.batch_sizes if manifest and manifest.batch_sizes else (1,))
            jobs.append((onnx_path, batches))
        else:
            files = [f for f in manifest.files if f.role == role]
            if not files:
                raise ManifestError(f"manifest {manifest.name!r} has no {role!r} file"
                                    + (" (run `tokenline-export quantize-int8` first)" if role == "encoder_qdq" else ""))
            for f in files:
                if f.batch is None:
                    jobs.append((model_dir / f.path, args.batch or (1,)))
                elif args.batch is None or f.batch in args.batch:
                    jobs.append((model_dir / f.path, (f.batch,)))
        name = args.name or (manifest.name if manifest else jobs[0][0].stem)
        cache = EngineCache(out, rebuild_on_mismatch=args.rebuild_on_mismatch)
        built = []
        for path, batches in jobs:
            opts = BuildOptions(precision=args.precision, batch_sizes=batches, workspace_mib=args.workspace_mib,
                                dla_core=args.dla_core, timing_cache=args.timing_cache or out / "timing.cache",
                                optimization_level=args.opt_level)
            with console.status(f"building {path.name}") as status:
                loaded = cache.ensure(name, path, opts, manifest.hash() if manifest else None,
                                      progress=lambda m: (status.update(m), log.info("%s", m)))
            built.append(loaded)
    except (EngineError, ManifestError, FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    from rich.table import Table  # noqa: PLC0415

    t = Table(title="TensorRT engines")
    for col in ("engine", "TensorRT", "GPU", "precision", "batch"):
        t.add_column(col)
    for e in built:
        sc = e.sidecar
        t.add_row(e.path.name, sc.trt_version, f"{sc.gpu_name} ({'.'.join(map(str, sc.compute_capability))})",
                  sc.precision, ",".join(map(str, sc.batch_sizes)))
    console.print(t)
    return 0
