"""Benchmark: how long central takes to build a reference set's bank, by set size, and that ingest keeps writing.

    python benchmarks/bench_refset_build.py            # writes BENCHMARKS.md section refset_build
    python benchmarks/bench_refset_build.py --runs 1 --sizes 100 700 --no-write
    python benchmarks/bench_refset_build.py --against 59cd1df   # also the two costly steps of that commit's code

A change of a reference set is committed at once and its bank built afterwards (central.anomaly.refsets.build_set;
the API's builder thread, the CLI inline). This times ``central.anomaly.bank.build_bank`` (whitened bank: whitening,
greedy coreset to ``max_bank_tokens`` = 10,000, inverted lists, leave-one-out threshold) on sets of 100 to 5,000
frames with the exports' token shapes (K=16, d=96: the default; K=48, d=64: the export for flagging; K=16, d=384:
an export without projection, ``--summary-dim 0``), median of
``--runs`` builds, with its two costly steps apart. The tokens are synthetic (unit vectors around 500 centres,
seeded): build time depends on the counts and the dimension, not on what the tokens show.

With ``--against REF`` the two costly steps of ``central/anomaly/bank.py`` as it was at git commit REF run side by
side with today's on the same inputs (the pool and the built bank of today's build), interleaved, each pair's ratio
taken within the pair; the agreement of their results is reported beside.

Then, through the product's path on SQLite (the embedded default, one writer at a time): a set of 200 frames of the
tests' 384-dim model created and built (``create_set`` committed, then ``build_set``) while another connection
commits a frame every 0.2 s, as an ingest worker does; its longest wait for the write lock is reported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import write_section  # noqa: E402
from benchmarks.bench_summary import md_table  # noqa: E402
from central.anomaly import bank as bank_module  # noqa: E402
from tokenline.anomaly import BankInfo  # noqa: E402

SECTION = "refset_build"
SHAPES = (("default export", 16, 96), ("export for flagging", 48, 64), ("no projection", 16, 384))
STEPS = ("greedy_coreset", "loo_whitened_scores")
INFO = BankInfo(set_id=1, set_version=1, name="bench", site="s", line="l", camera="c", manifest_hash="0" * 16,
                mode="tokens", metric="whitened", nprobe=8, min_token_size=1.0, created_us=0)


def synthetic_frames(f: int, k: int, d: int, seed: int = 0) -> bank_module.SetFrames:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((500, d)).astype(np.float32)
    t = centres[rng.integers(0, 500, (f, k))] + 0.7 * rng.standard_normal((f, k, d)).astype(np.float32)
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    return bank_module.SetFrames(t, np.full((f, k), 16.0, np.float32), np.zeros((f, 1), np.float32))


def instrumented_build(frames: bank_module.SetFrames) -> Tuple[Dict[str, float], Dict[str, Tuple[Any, ...]]]:
    """One build_bank with each of STEPS wrapped: (seconds in all and in each step, with the bank's size under
    "bank"; the arguments the build passed to each step)."""
    spent = {s: 0.0 for s in STEPS}
    seen: Dict[str, Tuple[Any, ...]] = {}
    originals = {s: getattr(bank_module, s) for s in STEPS}

    def wrap(name: str):
        def run(*a, **kw):
            seen[name] = a
            t = time.perf_counter()
            try:
                return originals[name](*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t
        return run

    for s in STEPS:
        setattr(bank_module, s, wrap(s))
    try:
        t0 = time.perf_counter()
        built = bank_module.build_bank(frames, INFO, 10_000, 0.99)
        spent["total"] = time.perf_counter() - t0
    finally:
        for s in STEPS:
            setattr(bank_module, s, originals[s])
    spent["bank"] = built.bank.size
    return spent, seen


def module_at(ref: str, path: str = "central/anomaly/bank.py") -> types.ModuleType:
    """The module in file ``path`` as it was at git commit ``ref`` (importing today's other modules)."""
    src = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType(f"{Path(path).stem}_at_{ref}")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src, f"{ref}:{path}", "exec"), mod.__dict__)
    return mod


def side_by_side(old: types.ModuleType, frames: bank_module.SetFrames, runs: int) -> Dict[str, Any]:
    """Each of STEPS, the old module's and today's on the same inputs, interleaved: medians, the median of the
    paired ratios (old / today) and how far their results agree."""
    inputs = instrumented_build(frames)[1]
    out: Dict[str, Any] = {}
    for name in STEPS:
        if name not in inputs:
            continue
        t_old, t_new, results = [], [], {}
        for r in range(runs):
            for which, mod, times in (("old", old, t_old), ("new", bank_module, t_new))[:: 1 if r % 2 == 0 else -1]:
                t = time.perf_counter()
                results[which] = getattr(mod, name)(*inputs[name])
                times.append(time.perf_counter() - t)
        out[name] = (statistics.median(t_old), statistics.median(t_new),
                     statistics.median(a / b for a, b in zip(t_old, t_new)))
        a, b = results["old"], results["new"]
        if name == "greedy_coreset":
            out[name + " agreement"] = f"{float(np.mean(a == b)):.1%} picks the same"
        else:
            out[name + " agreement"] = f"largest relative difference {float(np.max(np.abs(a - b) / np.abs(a))):.1e}"
    return out


def writer_wait(tmp: Path, frames: int = 200) -> Dict[str, float]:
    """Create and build a set of ``frames`` frames on SQLite while another connection commits a frame every 0.2 s:
    (build seconds, the other writer's commits, its longest wait, its failed commits)."""
    from sqlalchemy.orm import Session

    from central import store
    from central.anomaly import refsets
    from central.config import AnomalyConfig
    from sql.db import make_engine
    from sql.migrate import upgrade
    from tests.central.conftest import make_message
    from tests.support.tiny_model import build_tiny_model
    from tokenline.manifest import Manifest

    engine = make_engine(f"sqlite:///{tmp / 'central.db'}")
    upgrade(engine)
    mdir = build_tiny_model(tmp / "model", size=32, patch=8, dim=384)
    man = Manifest.from_file(mdir)
    with Session(engine) as s, s.begin():
        model = store.register_model(s, man, mdir)
    rng = np.random.default_rng(0)
    ref = [make_message(man, rng, seq=i, ts_us=10**15 + i) for i in range(frames)]
    other = [make_message(man, rng, seq=10**4 + i, ts_us=2 * 10**15 + i, camera="c2") for i in range(10**4)]
    with Session(engine) as s, s.begin():
        store.insert_frames(s, [store.frame_row(m, model.id, store.now_us()) for m in ref])
    waits: List[float] = []
    failed = 0
    done = threading.Event()

    def ingest() -> None:
        nonlocal failed
        for m in other:
            if done.is_set():
                return
            t = time.perf_counter()
            try:
                with Session(engine) as s, s.begin():
                    store.insert_frames(s, [store.frame_row(m, model.id, store.now_us())])
                waits.append(time.perf_counter() - t)
            except Exception:  # noqa: BLE001 - "database is locked": counted
                failed += 1
            time.sleep(0.2)

    th = threading.Thread(target=ingest)
    th.start()
    cfg = AnomalyConfig()
    t0 = time.perf_counter()
    with Session(engine) as s, s.begin():
        set_id = refsets.create_set(s, cfg, name="bench", frame_ids=[m.frame_id.hex() for m in ref]).id
    info = refsets.build_set(engine, cfg, set_id)
    took = time.perf_counter() - t0
    done.set()
    th.join()
    engine.dispose()
    assert info.state == "ready"
    return {"build": took, "commits": len(waits), "longest": max(waits), "failed": failed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="builds per set (median)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 700, 2000, 5000], help="set sizes in frames")
    ap.add_argument("--against", metavar="REF", help="git commit whose bank code runs side by side with today's")
    ap.add_argument("--against-sizes", type=int, nargs="+", default=[100, 700, 2000],
                    help="set sizes for --against (the older code is slower)")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("builds", total=len(SHAPES) * len(args.sizes) * args.runs)
        for label, k, d in SHAPES:
            for f in args.sizes:
                frames = synthetic_frames(f, k, d)
                runs = []
                for _ in range(args.runs):
                    runs.append(instrumented_build(frames)[0])
                    progress.advance(task)
                med = {key: statistics.median(r[key] for r in runs) for key in ("total", *STEPS)}
                rows.append({"shape": f"{label} (K={k}, d={d})", "frames": f, "pool": f * k,
                             "bank": int(runs[0]["bank"]), "total": med["total"],
                             "coreset": med["greedy_coreset"], "loo": med["loo_whitened_scores"],
                             "all": " ".join(f"{r['total']:.1f}" for r in runs)})
                console.print(f"{label} {f} frames: {med['total']:.1f} s")
        pairs = []
        if args.against:
            old = module_at(args.against)
            task2 = progress.add_task(f"side by side with {args.against}", total=len(SHAPES) * len(args.against_sizes))
            for label, k, d in SHAPES:
                for f in args.against_sizes:
                    sbs = side_by_side(old, synthetic_frames(f, k, d), args.runs)
                    for name, what in (("greedy_coreset", "coreset"), ("loo_whitened_scores", "leave-one-out threshold")):
                        if name in sbs:
                            o, n, ratio = sbs[name]
                            pairs.append({"shape": f"{label} (K={k}, d={d})", "frames": f, "step": what, "old": o,
                                          "new": n, "ratio": ratio, "agree": sbs[name + " agreement"]})
                    progress.advance(task2)
        with tempfile.TemporaryDirectory() as tmp:
            w = writer_wait(Path(tmp))
    table = md_table(rows, [("shape", "tokens", ""), ("frames", "set frames", ",d"), ("pool", "tokens in the set", ",d"),
                            ("bank", "bank tokens", ",d"), ("total", "build (s, median)", ".1f"),
                            ("coreset", "of which coreset", ".1f"), ("loo", "of which leave-one-out threshold", ".1f"),
                            ("all", "each build (s)", "")])
    console.print(table)
    if pairs:
        against = md_table(pairs, [("shape", "tokens", ""), ("frames", "set frames", ",d"), ("step", "step", ""),
                                   ("old", f"{args.against} (s, median)", ".2f"), ("new", "today (s, median)", ".2f"),
                                   ("ratio", "speed-up (median of paired ratios)", ".1f"), ("agree", "results", "")])
        console.print(against)
    console.print(w)
    biggest = {r["shape"]: r for r in rows if r["frames"] == max(args.sizes)}
    body = (__doc__.split("\n\n", 2)[2].strip() + "\n\n" + table + "\n\n"
            + "- Largest sets (" + f"{max(args.sizes):,} frames, central's `anomaly.max_set_frames`): "
            + "; ".join(f"{name} {r['total']:.0f} s" for name, r in biggest.items())
            + ": longer than a request should wait, hence the build after the change.\n"
            + f"- On SQLite, while a {200}-frame set of 384-dim tokens was created and built ({w['build']:.1f} s), "
            f"the other connection committed {w['commits']} frames, the longest waiting {w['longest'] * 1000:.0f} ms "
            f"for the write lock, {w['failed']} failed (the build holds no transaction).\n")
    if pairs:
        body += (f"\nSide by side with the code of commit {args.against} (`--against {args.against}`; the same inputs, "
                 f"{args.runs} interleaved runs each):\n\n" + against + "\n")
    if args.write:
        write_section(SECTION, "Reference sets: building the bank, by set size", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
