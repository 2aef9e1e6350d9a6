"""ONNX Runtime checks of an exported encoder: run it in batches, compare it with torch, measure its throughput."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tokenline import manifest as mf


def ort_session(path: Path, threads: int = 0):
    """A CPU ONNX Runtime session of ``path`` (``threads`` 0: ONNX Runtime's default), warnings silenced."""
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


def throughput_side_by_side(sessions: Sequence, x: np.ndarray, rounds: int, runs: int = 2) -> List[float]:
    """Median images/s of each session over ``rounds`` rounds of ``throughput(session, x, runs)``, the sessions
    interleaved within every round so that all see the same machine state."""
    rates: List[List[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for session, r in zip(sessions, rates):
            r.append(throughput(session, x, runs))
    return [statistics.median(r) for r in rates]


def token_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image: worst (1 - cosine) between a token of ``a`` and its best match in ``b`` (order-free). A zero
    token (a summary cluster that never had members) matches a zero token of ``b`` exactly."""
    sim = np.einsum("bkd,bjd->bkj", a, b)
    zero_a, zero_b = np.linalg.norm(a, axis=-1) < 0.5, np.linalg.norm(b, axis=-1) < 0.5
    sim = np.where(zero_a[:, :, None] & zero_b[:, None, :], 1.0, sim)
    return 1.0 - sim.max(axis=-1).min(axis=-1)


SELF_NOISE = 1e-6  # torch's own rounding sensitivity: its input moved by this fraction of its mean magnitude
HARD_FLOOR = 0.9  # no image of a merged graph may fall below this cosine to torch, whatever torch does to itself


def self_baseline(run, x: np.ndarray) -> List[np.ndarray]:
    """The outputs of ``run`` (torch) on ``x`` moved by ``SELF_NOISE`` of its mean magnitude (seeded): how far
    torch differs from itself when its arithmetic rounds a little differently (``compare``'s ``baseline``)."""
    noise = np.random.default_rng(0).standard_normal(x.shape)
    return run((x + SELF_NOISE * float(np.abs(x).mean()) * noise).astype(np.float32))


def compare(torch_out: Sequence[np.ndarray], ort_out: Sequence[np.ndarray], tol: float, merged: bool,
            precision: str, baseline: Optional[Sequence[np.ndarray]] = None) -> Tuple[Dict[str, float], List[str]]:
    """ONNX Runtime vs torch on the same images (outputs in ``tokenline.summary.OUTPUTS["slic"]`` order: global,
    tokens, footprint, patch mean): statistics and the list of failed checks (empty = pass).

    Unmerged graphs must match everywhere within ``tol``. Merged graphs take discrete decisions (TopK, ArgMax) on
    float scores: a near-tie that rounds differently in ONNX Runtime merges another token, which moves that image's
    embedding by ~1e-3. So for them, most images (>= half) must match within ``tol``, and every image must keep
    cosine >= 0.999 (0.99 in fp16) to torch; the patch mean, which pools every token of the summary layer, moves
    more with a flipped merge than the [CLS] embedding (0.9986 measured with ToMe r=16 at 224 px on NEU-DET), so on
    merged graphs it must keep >= 0.995 (0.98 in fp16; unmerged: as the embedding). The summary head's clustering
    (ArgMin) has the same kind of near-ties: a patch whose two nearest clusters tie may join the other one, and the
    next iterations follow it. So on the images whose global embedding matches within ``tol`` (the merges agreed)
    footprints must agree on >= 90% of the cells (85% in fp16; a wrong graph agrees on about 1/K), and the tokens
    must match within 10 x ``tol`` on the images whose global embedding and footprint both match exactly.

    With many decisions per image (448 px: about 350 merges) nearly every image has a near-tie, and torch itself
    flips them when its input moves by one part in a million. ``baseline`` (``self_baseline``: torch's outputs on
    that moved input) measures this: a merged graph that matches fewer than half of the images still passes when
    it matches at least half as many as torch matches itself, its median error stays within 3x of torch's own,
    and its token error within 3x of torch's own (ONNX Runtime differs from torch no more than torch from itself).
    The cosine floors are judged the same way: with heavy merging on many real images a flipped near-tie can move
    an image's embedding far (ToMe r = 18 on 200 NEU-DET images: torch against itself down to cosine 0.977, 9 images
    under 0.999), so a merged graph may have as many images under a floor as torch has against itself (2x, at
    least one), never one under ``HARD_FLOOR``.
    """
    g_t, g_o = torch_out[0], ort_out[0]
    err = np.abs(g_t - g_o).max(axis=-1)  # per image
    cos = (g_t * g_o).sum(-1)
    fp_t, fp_o = np.asarray(torch_out[2]), np.asarray(ort_out[2])
    same_cells = (fp_t == fp_o).reshape(len(fp_t), -1).mean(-1)  # per image
    tok = token_error(ort_out[1], torch_out[1])
    pm_cos = (np.asarray(torch_out[3]) * np.asarray(ort_out[3])).sum(-1)
    exact = err <= tol
    both = exact & (same_cells == 1.0)
    k = np.asarray(ort_out[1]).shape[1]
    stats = {
        "max_abs_err": float(err.max()),
        "max_rel_err": float(err.max() / max(float(np.abs(g_t).max()), 1e-12)),
        "median_err": float(np.median(err)),
        "matched_fraction": float(exact.mean()),
        "global_cos_min": float(cos.min()),
        "token_err": float(tok[both].max()) if both.any() else float(tok.max()),
        "footprint_agreement": float(same_cells[exact].mean() if exact.any() else same_cells.mean()),
        "patch_mean_cos_min": float(pm_cos.min()),
    }
    tok_limit = max(10 * tol, 1e-3)
    self_ok = False  # merged, and as close to torch as torch is to itself
    own_cos = own_pm = None  # torch against itself: per-image cosines (merged graphs with a baseline)
    if merged and baseline is not None:
        own, _ = compare(torch_out, baseline, tol, merged=True, precision=precision)
        own_cos, own_pm = (g_t * baseline[0]).sum(-1), (np.asarray(torch_out[3]) * np.asarray(baseline[3])).sum(-1)
        stats["self_matched_fraction"] = own["matched_fraction"]
        self_ok = (stats["matched_fraction"] >= own["matched_fraction"] / 2
                   and stats["median_err"] <= max(tol, 3 * own["median_err"]))
        if self_ok:
            tok_limit = max(tok_limit, 3 * own["token_err"])
    problems = []
    near_tie = []  # what flipped merge decisions alone can cause (merged graphs)
    if fp_o.size and (fp_o.min() < 0 or fp_o.max() >= k):
        problems.append(f"the footprint names tokens outside 0..{k - 1}")
    if not merged and not exact.all():
        problems.append(f"max abs error {stats['max_abs_err']:.3g} of the global embedding > tolerance {tol:g}")
    if merged and stats["matched_fraction"] < 0.5 and not self_ok:
        itself = (f"; torch itself, its input moved by {SELF_NOISE:g}, matches {stats['self_matched_fraction']:.0%}"
                  if "self_matched_fraction" in stats else "")
        near_tie.append(f"only {stats['matched_fraction']:.0%} of the images match within {tol:g} "
                        f"(need >= 50%{itself})")
    floor = 0.99 if precision == "fp16" else 0.999
    pm_floor = (0.98 if precision == "fp16" else 0.995) if merged else floor
    for what, values, lowest, own_values in (("global embedding", cos, floor, own_cos),
                                             ("patch mean", pm_cos, pm_floor, own_pm)):
        under = int((values < lowest).sum())
        if not under:
            continue
        if own_values is None:
            problems.append(f"{what} cosine {float(values.min()):.5f} < {lowest}")
            continue
        own_under = int((own_values < lowest).sum())
        if values.min() < HARD_FLOOR or under > max(1, 2 * own_under):
            problems.append(f"{what} cosine under {lowest} on {under} image(s), down to {float(values.min()):.5f} "
                            f"(torch itself, its input moved by {SELF_NOISE:g}: {own_under}, down to "
                            f"{float(own_values.min()):.5f}; never below {HARD_FLOOR})")
    fp_floor = 0.85 if precision == "fp16" else 0.9
    if stats["footprint_agreement"] < fp_floor:
        problems.append(f"footprints agree on {stats['footprint_agreement']:.1%} of the cells (need >= {fp_floor:.0%})")
    if stats["token_err"] > tok_limit:
        (near_tie if merged else problems).append(f"summary token error {stats['token_err']:.3g} > {tok_limit:.3g}")
    if near_tie and not problems:  # everything else agrees: say what that means and what to do
        near_tie.append(f"the global embeddings agree (cosine >= {stats['global_cos_min']:.5f}) and so do "
                        f"{stats['footprint_agreement']:.1%} of the footprint cells, so the graph computes the same "
                        "thing, but near-ties among its many merge decisions round differently in ONNX Runtime on "
                        "most images; merge fewer tokens, or none, at this input size (docs/choosing-a-schedule.md)")
    return stats, problems + near_tie


def worst(stats: Dict[str, float], new: Dict[str, float]) -> Dict[str, float]:
    """``compare`` statistics of several files combined: the worst of each (lowest cosine and match fraction)."""
    out = dict(stats)
    for k, v in new.items():
        pick = min if k in ("global_cos_min", "matched_fraction", "footprint_agreement", "patch_mean_cos_min",
                            "self_matched_fraction") else max
        out[k] = pick(out.get(k, v), v)
    return out
