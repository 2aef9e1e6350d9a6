"""What MaxSim re-ranking over summary tokens adds to global-embedding search, measured on NEU-DET.

    python benchmarks/bench_rerank_neu.py --model-dir out/demo/model      # a real exported model
    python benchmarks/bench_rerank_neu.py                                 # tiny random test encoder (meaningless)

Every NEU-DET image (1,200, six defect classes; the class is the file-name prefix) is encoded by the model's
ONNX encoder through central's query encoder (the edge's preprocessing), carried through the wire format
(quantized, encoded, decoded: what central stores), and stored in SQLite. Then each frame queries for its
neighbours (itself excluded): precision@10 and mAP@100 (AP normalized by min(relevant, 100)), for the global
embedding alone and for MaxSim re-ranking of the top 200 at several weights. Writes its BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from benchmarks._report import write_section  # noqa: E402
from central import store  # noqa: E402
from central.config import SearchConfig  # noqa: E402
from central.encoder import Encoder  # noqa: E402
from central.search import DEFAULT_RERANK_WEIGHT, Filters, Query, Searcher  # noqa: E402
from sql.db import make_engine  # noqa: E402
from sql.migrate import upgrade  # noqa: E402
from tokenline.frame_id import new_frame_id  # noqa: E402
from tokenline.manifest import Manifest  # noqa: E402
from tokenline.preprocess import read_image  # noqa: E402
from tokenline.wire import TokenMessage, decode, encode  # noqa: E402

console = Console(stderr=True)
NEU = ROOT.parent / "shared" / "datasets" / "neu-det" / "images"


def average_precision(rel: np.ndarray, n_relevant: int, depth: int) -> float:
    rel = rel[:depth].astype(np.float64)
    if rel.sum() == 0:
        return 0.0
    prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float((prec * rel).sum() / min(n_relevant, depth))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="exported model directory (manifest.json + ONNX)")
    ap.add_argument("--images", type=Path, default=NEU)
    ap.add_argument("--token-dtype", default="int8", choices=("int8", "int4", "fp16"))
    ap.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images (quick check)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="tokenline-neu-"))
    try:
        model_dir = args.model_dir
        tiny = model_dir is None
        if tiny:
            from tests.support.tiny_model import build_tiny_model

            model_dir = build_tiny_model(tmp / "tiny", size=224, patch=56, dim=384)  # K = 16
        manifest = Manifest.from_file(model_dir)
        engine = make_engine(f"sqlite:///{tmp / 'neu.db'}")
        upgrade(engine)
        with Session(engine) as s, s.begin():
            model = store.register_model(s, manifest, model_dir)
        enc = Encoder(model, ["CPUExecutionProvider"])
        files = sorted(p for p in args.images.glob("*.jpg"))
        if args.limit:
            files = files[:: max(1, len(files) // args.limit)][: args.limit]
        if not files:
            console.print(f"[red]no images in {args.images}[/]")
            return 2
        labels, rows = {}, []
        t0 = time.perf_counter()
        for i, p in enumerate(track(files, description="encoding", console=console)):
            out = enc.encode_frame(read_image(p))
            msg = TokenMessage(new_frame_id(), "bench", "neu", "det", "cam", 1_700_000_000_000_000 + i, i,
                               manifest.hash_bytes(), out)
            wire = decode(encode(msg, args.token_dtype))
            rows.append(store.frame_row(wire, model.id, 0))
            labels[wire.frame_id.hex()] = p.name.rsplit("_", 1)[0]
        enc_s = time.perf_counter() - t0
        with Session(engine) as s, s.begin():
            store.insert_frames(s, rows)
        searcher = Searcher(engine, SearchConfig(candidates=args.candidates, max_results=1000))
        n_rel = {c: sum(1 for v in labels.values() if v == c) - 1 for c in set(labels.values())}
        variants = [("global only", False, 0.0)] + [(f"MaxSim re-rank w={w:g}", True, w) for w in args.weights]
        res = {v[0]: ([], []) for v in variants}
        for fid in track(list(labels), description="querying", console=console):
            with Session(engine) as s:
                fr = store.get_frame(s, fid)
            q = Query.from_summary(model.id, fr.summary, exclude_frame_id=fid)
            # one real search returns every candidate with both scores; each variant re-sorts them
            hits = searcher.search(model, q, args.candidates, Filters(), rerank=True, rerank_weight=1.0)
            g = np.array([h.global_score for h in hits])
            ms = np.array([h.maxsim for h in hits])
            same = np.array([labels[h.frame_id] == labels[fid] for h in hits])
            for name, rr, w in variants:
                score = (1 - w) * g + w * ms if rr else g
                rel = same[np.argsort(-score, kind="stable")]
                res[name][0].append(rel[:10].mean())
                res[name][1].append(average_precision(rel, n_rel[labels[fid]], 100))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = []
    if tiny:
        lines += ["**Tiny random test encoder — these numbers say nothing about retrieval quality**; they only show the "
                  "script runs end to end. Re-run with `--model-dir` pointing at a real exported model.", ""]
    lines += [f"Model: `{manifest.name}` ({manifest.family}, merge {manifest.merge.method}, summary "
              f"{manifest.summary.method} K={manifest.summary.k} of d={manifest.summary.dim}, global "
              f"D={manifest.embedding_dim}); {len(labels)} NEU-DET images, {len(n_rel)} classes; tokens carried as "
              f"{args.token_dtype} on the wire; encoding took {enc_s:.1f} s on CPU. Each image queries the rest "
              f"(itself excluded); re-ranking re-scores the top {args.candidates} global candidates with "
              "score = (1-w)·cosine + w·MaxSim; central re-ranks by default (`search.rerank`) with "
              f"w = {DEFAULT_RERANK_WEIGHT[manifest.summary.method]:g} for this summary method "
              "(`central.search.DEFAULT_RERANK_WEIGHT`, or `search.rerank_weight`).", "",
              "| ranking | precision@10 | mAP@100 |", "|---|---:|---:|"]
    for name, _, _ in variants:
        p10, ap100 = res[name]
        lines.append(f"| {name} | {np.mean(p10):.4f} | {np.mean(ap100):.4f} |")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("central_rerank_neu", "Central: MaxSim re-ranking on NEU-DET", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
