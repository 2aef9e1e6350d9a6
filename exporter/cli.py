"""`tokenline-export`: command line of the exporter (export a checkpoint; TensorRT subcommands).

The conventions of ``runtime.cli``: ``--log-level``/``-v``, ``--debug`` and ``--quiet`` anywhere on the line; an
expected error (bad checkpoint, options, export) is one line on stderr with exit code 2, the traceback only with
``--debug``. ``export`` shows its steps as a progress bar with elapsed time and ETA on a terminal (not with
``--quiet``, nor when stderr is not a terminal: then each step is an INFO log record); the result table goes to
stdout. The exporter reads no configuration file, so it has no ``--config``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, get_args

from pydantic import BaseModel, ValidationError

from exporter.errors import ExportError, OptionsError
from exporter.options import ExportOptions, MergeConfig
from exporter.trt.cli import register_cli
from runtime.cli import CliError, common_options, configure_logging, run_command, steps
from tokenline.documents import key_path
from tokenline.manifest import Family, ManifestError

log = logging.getLogger("exporter.cli")  # named, not __name__: the same under `python -m exporter.cli`

TURBO_ALPHA = 5.0  # the CLI merges with Turbo unless --alpha 0 (ToMe) is given
BUDGET_CALIB_COUNT = 256  # calibration images of a --budget search when --calib-count is not given


def _int_list(text: str) -> List[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _batches(text: str) -> List[int]:
    if text.strip().lower() in ("dynamic", "dyn"):
        return []
    vals = _int_list(text)
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError("batch must be 'dynamic' or positive integers, e.g. 1,4")
    return vals


def _image_size(text: str) -> tuple:
    vals = _int_list(text.replace("x", ","))
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 1:
        raise argparse.ArgumentTypeError("image size is N or HxW, e.g. 224 or 224x224")
    return tuple(vals)


def _help(model: Type[BaseModel], field: str, note: str = "") -> str:
    """A flag's help from the option's description and default in ``exporter.options`` (declared there once)."""
    info = model.model_fields[field]
    default = "" if info.default is None or info.is_required() else f" (default: {info.default})"
    return f"{info.description}{default}{note}"


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``export``. Flags of ExportOptions and MergeConfig have those fields as their ``dest`` and set them only
    when given, so the defaults are the models'; ``cmd_export`` names the flag of a field that does not validate."""
    unset = argparse.SUPPRESS
    p = sub.add_parser("export", help="convert a checkpoint into a token-merged ONNX encoder + manifest",
                       description="Convert a ViT checkpoint (local file or Hugging Face directory) into ONNX "
                                   "files with token merging and summary tokens, validate them and write a manifest.")
    p.add_argument("checkpoint", type=Path, help="checkpoint file (.safetensors/.pt/.pth/.bin/.onnx) or HF directory")
    p.add_argument("--family", default=None, help=f"{' | '.join(get_args(Family))} (default: detect)")
    p.add_argument("--image-size", type=_image_size, default=None, help="input size N or HxW (default: checkpoint's)")
    merge = p.add_mutually_exclusive_group()
    merge.add_argument("--r", dest="r", type=int, default=unset, help=_help(MergeConfig, "r"))
    merge.add_argument("--r-list", dest="r_list", type=_int_list, default=unset,
                       help=_help(MergeConfig, "r_list", ", comma-separated"))
    merge.add_argument("--target-tokens", dest="target", type=int, default=unset, help=_help(MergeConfig, "target"))
    merge.add_argument("--budget", dest="budget", type=float, default=unset,
                       help=_help(MergeConfig, "budget", f"; needs --calib, {BUDGET_CALIB_COUNT} images unless "
                                                         "--calib-count says otherwise"))
    p.add_argument("--summary-budget", dest="summary_budget", type=float, default=unset,
                   help=_help(MergeConfig, "summary_budget"))
    p.add_argument("--pre-r", dest="pre_r", type=int, default=unset, help=_help(MergeConfig, "pre_r"))
    p.add_argument("--alpha", dest="alpha", type=float, default=TURBO_ALPHA,
                   help=f"{MergeConfig.model_fields['alpha'].description} (default here: {TURBO_ALPHA:g}, Turbo)")
    p.add_argument("--floor", dest="floor", type=int, default=unset, help=_help(MergeConfig, "floor"))
    p.add_argument("--k", dest="k", type=int, default=unset, help=_help(MergeConfig, "k"))
    p.add_argument("--summary-layer", dest="summary_layer", type=int, default=unset,
                   help=_help(MergeConfig, "summary_layer"))
    p.add_argument("--summary-dim", dest="summary_dim", type=int, default=unset, help=_help(MergeConfig, "summary_dim"))
    p.add_argument("--summary-iters", dest="summary_iters", type=int, default=unset,
                   help=_help(MergeConfig, "summary_iters"))
    p.add_argument("--summary-lam", dest="summary_lam", type=float, default=unset,
                   help=_help(MergeConfig, "summary_lam"))
    p.add_argument("--precision", dest="precision", default=unset,
                   choices=get_args(ExportOptions.model_fields["precision"].annotation),
                   help=_help(ExportOptions, "precision"))
    p.add_argument("--batch", dest="batch_sizes", type=_batches, default=unset,
                   help=_help(ExportOptions, "batch_sizes", "; e.g. 1,4 or 'dynamic'"))
    p.add_argument("--cpu-int8", dest="cpu_int8", action="store_true", default=unset,
                   help=_help(ExportOptions, "cpu_int8"))
    p.add_argument("--cpu-int8-weight-bits", dest="cpu_int8_weight_bits", type=int, choices=[7, 8], default=unset,
                   help=_help(ExportOptions, "cpu_int8_weight_bits"))
    p.add_argument("--opset", dest="opset", type=int, default=unset, help=_help(ExportOptions, "opset"))
    p.add_argument("--no-simplify", dest="simplify", action="store_false", default=unset,
                   help="skip onnxslim (constant folding that makes fixed-batch graphs fully static)")
    p.add_argument("--calib", dest="calib_dir", type=Path, default=unset,
                   help=_help(ExportOptions, "calib_dir", "; use your own frames"))
    p.add_argument("--calib-count", dest="calib_count", type=int, default=unset,
                   help=_help(ExportOptions, "calib_count"))
    p.add_argument("--name", default=None, help="model name in the manifest (default: checkpoint name)")
    p.add_argument("--out", dest="out_dir", type=Path, required=True, help=_help(ExportOptions, "out_dir"))
    p.add_argument("--no-unmerged", dest="export_unmerged", action="store_false", default=unset,
                   help="skip exporting/measuring the unmerged reference")
    p.add_argument("--quick-gelu", action="store_true", help="open_clip checkpoints trained with QuickGELU")
    p.add_argument("--act", choices=["gelu", "quick_gelu", "gelu_tanh"], default=None,
                   help="MLP activation when the checkpoint has no config saying it")
    p.add_argument("--num-heads", type=int, default=None, help="image tower heads (default: config, else width/64)")
    p.add_argument("--text-num-heads", type=int, default=None, help="text tower heads (default: width/64)")
    p.add_argument("--ln-eps", type=float, default=None, help="LayerNorm epsilon (default: the family's)")
    p.add_argument("--no-trt-check", dest="check_trt", action="store_false", default=unset,
                   help="skip the TensorRT compatibility check")
    p.set_defaults(func=cmd_export, flags={a.dest: a.option_strings[0] for a in p._actions if a.option_strings})


def _given(args: argparse.Namespace, model: Type[BaseModel]) -> Dict[str, Any]:
    """The fields of ``model`` that flags set (see ``add_export_parser``)."""
    return {f: getattr(args, f) for f in model.model_fields if hasattr(args, f)}


def _flag_errors(errors: Sequence[Dict[str, Any]], flags: Dict[str, str]) -> str:
    """pydantic errors on one line, each named by the flag that set the field (errors of the whole model by none)."""
    def where(loc: Sequence[Any]) -> str:
        return f"{flags.get(str(loc[0]), key_path(loc))}: " if loc else ""

    return "; ".join(f"{where(e['loc'])}{e['msg']}" for e in errors)


def cmd_export(args: argparse.Namespace) -> int:
    from rich.console import Console  # noqa: PLC0415

    from exporter.checkpoints import CheckpointError, ConversionOptions, load_encoder  # noqa: PLC0415
    from exporter.export import export_encoder, planned_steps  # noqa: PLC0415
    from exporter.report import render_result  # noqa: PLC0415
    from exporter.schedule import ScheduleError  # noqa: PLC0415

    try:
        merge = MergeConfig(**_given(args, MergeConfig))
        given = _given(args, ExportOptions)
        if merge.budget is not None:
            given.setdefault("calib_count", BUDGET_CALIB_COUNT)
        opts = ExportOptions(**{**given, "name": args.name or args.checkpoint.stem})
    except OptionsError as exc:
        raise CliError(_flag_errors(exc.errors, args.flags)) from exc
    except ValidationError as exc:
        raise CliError(_flag_errors(exc.errors(), args.flags)) from exc
    try:
        # one bar over loading and the export's steps (a text tower, known only once loaded, adds one)
        with steps(1 + planned_steps(merge, opts), show=not args.quiet, log=log) as step:
            step(f"loading {args.checkpoint.name}")
            options = ConversionOptions(num_heads=args.num_heads, text_num_heads=args.text_num_heads,
                                        act=args.act, ln_eps=args.ln_eps)
            loaded = load_encoder(args.checkpoint, family=args.family, image_size=args.image_size,
                                  options=options, quick_gelu=args.quick_gelu)
            result = export_encoder(
                loaded.vit, merge, opts, family=loaded.family, source_path=str(args.checkpoint),
                source_sha256=loaded.source_sha256, text=loaded.text, progress=step,
            )
    except OptionsError as exc:
        raise CliError(_flag_errors(exc.errors, args.flags)) from exc
    except (CheckpointError, ExportError, ScheduleError, ManifestError) as exc:
        raise CliError(str(exc)) from exc
    render_result(result, Console())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole ``tokenline-export`` command line: ``export`` and the TensorRT subcommands of ``exporter.trt.cli``."""
    parser = argparse.ArgumentParser(prog="tokenline-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_parser(sub)
    register_cli(sub)
    common_options(parser, config=False, more=[("--quiet", {
        "action": "store_true", "default": False, "help": "no progress display (it is off anyway when stderr "
                                                           "is not a terminal)"})])
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
