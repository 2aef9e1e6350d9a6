"""Contract: anomaly scoring (tokenline.anomaly), the bank file, the wire's ANOMALY section, the alert topic."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest

from tests.contract.test_wire import make_msg
from tokenline import anomaly, topics, wire
from tokenline.anomaly import (AnomalyScore, Bank, BankError, BankInfo, bank_path, footprint_regions, pack_mask,
                               pack_masks, token_region, unpack_mask)
from tokenline.summary import Summary, boxes_from_footprint
from tokenline.wire import v2


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_bank(m: int = 3000, d: int = 32, lists: int = 30, nprobe: int = 4, mode: str = "tokens",
              seed: int = 0, threshold: float = 0.5) -> Bank:
    """A bank of m tokens around 30 cluster centres, grouped by cluster (as central's builder groups them)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((lists, d)))
    which = np.sort(rng.integers(0, lists, m))
    tokens = unit(centres[which] + 0.2 * unit(rng.standard_normal((m, d))))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(which, minlength=lists))])
    info = BankInfo(set_id=3, set_version=2, name="good", site="s1", line="l1", camera="c1", manifest_hash="ab" * 16,
                    mode=mode, threshold=threshold, nprobe=nprobe, min_token_size=1.0, frames=m // 16,
                    token_stats=(0.1, 0.02), global_stats=(0.2, 0.05))
    globals_ = unit(rng.standard_normal((m // 16, 24))) if mode != "tokens" else np.zeros((0, 24), np.float32)
    return Bank(tokens.astype(np.float16), offsets, centres, np.arange(m) // 16, globals_.astype(np.float16), info)


def exact_distances(bank: Bank, q: np.ndarray) -> np.ndarray:
    return 1.0 - (q @ bank.tokens.T).max(axis=1)


def test_ivf_search_finds_the_exact_neighbour_of_tokens_like_the_bank_and_is_exact_when_probing_all(
        monkeypatch) -> None:
    monkeypatch.setattr(anomaly, "EXHAUSTIVE_UP_TO", 0)  # search this small bank by its lists
    bank = make_bank()
    rng = np.random.default_rng(1)
    q = unit(bank.tokens[rng.integers(0, bank.size, 200)] + 0.05 * rng.standard_normal((200, bank.dim)))
    got = 1.0 - bank.nn_similarity(q)
    want = exact_distances(bank, q)
    assert np.all(got >= want - 1e-6)  # a probed subset can only be farther
    assert np.mean(np.isclose(got, want, atol=1e-6)) >= 0.95
    everything = dataclasses.replace(bank, info=dataclasses.replace(bank.info, nprobe=bank.lists))
    np.testing.assert_allclose(1.0 - everything.nn_similarity(q), want, atol=1e-6)


def test_banks_up_to_the_exhaustive_size_are_searched_exhaustively_whatever_their_lists() -> None:
    bank = make_bank(nprobe=1)  # 30 lists, one probed: were it used, many tokens would miss their neighbour
    assert bank.size <= anomaly.EXHAUSTIVE_UP_TO and bank.lists == 30
    rng = np.random.default_rng(4)
    q = unit(rng.standard_normal((300, bank.dim)))
    np.testing.assert_allclose(1.0 - bank.nn_similarity(q), exact_distances(bank, q), atol=1e-6)
    ex = rng.integers(0, bank.size // 16, 300)
    want = np.array([(q[i] @ bank.tokens[bank.src != ex[i]].T).max() for i in range(300)], np.float32)
    np.testing.assert_allclose(bank.nn_similarity(q, exclude=ex), want, atol=1e-6)
    # a batch of frames scores as each frame alone
    frames = unit(rng.standard_normal((5, 16, bank.dim)))
    fs = bank.score_arrays(frames, np.ones((5, 16), np.float32))
    for i in range(5):
        one = bank.score_arrays(frames[i:i + 1], np.ones((1, 16), np.float32))
        np.testing.assert_allclose(one.distances[0], fs.distances[i], atol=1e-6)
        assert one.token[0] == fs.token[i]


def test_leave_one_frame_out_ignores_the_frames_own_tokens() -> None:
    bank = make_bank(nprobe=30)
    q = bank.tokens[:16]  # frame 0's own tokens: distance 0 unless excluded
    assert np.allclose(1.0 - bank.nn_similarity(q), 0.0, atol=1e-3)  # float16 tokens: not exactly unit
    loo = 1.0 - bank.nn_similarity(q, exclude=np.zeros(16, np.int64))
    keep = bank.src != 0
    want = 1.0 - (q @ bank.tokens[keep].T).max(axis=1)
    np.testing.assert_allclose(loo, want, atol=1e-6)
    assert np.all(loo > 0.001)


def test_frame_score_is_the_most_distant_qualifying_token_and_points_at_it() -> None:
    bank = make_bank()
    rng = np.random.default_rng(2)
    normal = unit(bank.tokens[rng.integers(0, bank.size, (4, 16))] + 0.02 * rng.standard_normal((4, 16, bank.dim)))
    odd = normal.copy()
    odd[1, 9] = unit(rng.standard_normal(bank.dim))  # one unusual region in frame 1
    sizes = np.ones((4, 16), np.float32)
    fs = bank.score_arrays(odd, sizes)
    assert fs.token[1] == 9 and fs.score[1] > 0.5 > fs.score[0]
    np.testing.assert_allclose(fs.score, fs.distances.max(axis=1))
    # a token standing for no patch (size 0) is never scored, however unusual its stale feature
    sizes[1, 9] = 0
    fs2 = bank.score_arrays(odd, sizes)
    assert fs2.token[1] != 9 and fs2.score[1] < 0.5 and fs2.distances[1, 9] == 0
    a = bank.score(Summary(np.ones(24, np.float32), odd[1], np.ones(16, np.float32), np.full((16, 2), 0.5, np.float32)))
    assert (a.token, a.flagged, a.set_id, a.set_version, a.threshold) == (9, True, 3, 2, 0.5)


def test_bound_and_refine_scores_as_the_search_of_every_token_and_searches_few_of_them(monkeypatch) -> None:
    bank = make_bank(m=6000)
    assert bank.size <= anomaly.EXHAUSTIVE_UP_TO and bank.lists > 1  # exhaustive search, bound by the lists
    rng = np.random.default_rng(7)
    f = 60
    noise = rng.uniform(0.02, 0.4, (f, 16, 1))  # tokens from close to the bank to far from it
    frames = unit(bank.tokens[rng.integers(0, bank.size, (f, 16))] + noise * rng.standard_normal((f, 16, bank.dim)))
    frames[5, 7] = unit(rng.standard_normal(bank.dim))  # odd regions
    frames[9, 3] = frames[9, 11] = unit(rng.standard_normal(bank.dim))  # two farthest tokens tie: the first wins
    sizes = np.ones((f, 16), np.float32)
    sizes[5, 7] = 0  # not scored, however odd
    sizes[12] = 0  # a frame with no qualifying token
    full = bank.score_arrays(frames, sizes, every_token=True)
    fast = bank.score_arrays(frames, sizes)
    np.testing.assert_allclose(fast.score, full.score, atol=1e-6)
    np.testing.assert_array_equal(fast.token, full.token)
    assert fast.token[9] == 3 and fast.token[12] == -1 and fast.token[5] != 7
    ok = sizes >= 1
    dist, searched = bank.frame_distances(frames, ok)
    np.testing.assert_allclose(dist[searched], full.distances[searched], atol=1e-6)
    rest = ok & ~searched
    score = np.broadcast_to(full.score[:, None], (f, 16))
    assert np.all(dist[rest] >= full.distances[rest] - 1e-6)  # a bound, never below the distance
    assert np.all(dist[rest] < score[rest] - anomaly.TIE)  # and clear of the frame's farthest token
    assert searched.sum() < 0.5 * ok.sum()  # most tokens never reach the bank search
    # a batch scores as each frame alone
    for i in (0, 5, 9):
        one = bank.score_arrays(frames[i:i + 1], sizes[i:i + 1])
        assert one.token[0] == fast.token[i] and one.score[0] == pytest.approx(fast.score[i], abs=1e-6)
    # inverted lists: the nearest list is among those probed, so the bound holds there too
    monkeypatch.setattr(anomaly, "EXHAUSTIVE_UP_TO", 0)
    ivf_full = bank.score_arrays(frames, sizes, every_token=True)
    ivf_fast = bank.score_arrays(frames, sizes)
    np.testing.assert_allclose(ivf_fast.score, ivf_full.score, atol=1e-6)
    np.testing.assert_array_equal(ivf_fast.token, ivf_full.token)
    assert np.all(ivf_full.score >= full.score - 1e-6)  # probing lists can only find farther neighbours


def test_modes_global_and_both() -> None:
    bank = make_bank(mode="both")
    rng = np.random.default_rng(3)
    toks = unit(bank.tokens[rng.integers(0, bank.size, (2, 16))])
    g = np.stack([bank.globals[5], unit(rng.standard_normal(24))])
    fs = bank.score_arrays(toks, np.ones((2, 16)), g)
    want = (fs.token_score - 0.1) / 0.02 + (fs.global_score - 0.2) / 0.05
    np.testing.assert_allclose(fs.score, want, rtol=1e-5)
    assert fs.global_score[0] == pytest.approx(0.0, abs=1e-3) and fs.global_score[1] > 0.5
    glob = dataclasses.replace(bank, info=dataclasses.replace(bank.info, mode="global"))
    fg = glob.score_arrays(toks, np.ones((2, 16)), g)
    np.testing.assert_allclose(fg.score, fs.global_score)
    assert np.isnan(fg.token_score).all() and (fg.token >= 0).all()  # the region still comes from the tokens
    with pytest.raises(BankError, match="global embeddings"):
        bank.score_arrays(toks, np.ones((2, 16)))


def test_bank_file_round_trip_and_verification(tmp_path) -> None:
    bank = make_bank(mode="both")
    p = bank.save(bank_path(tmp_path / "model", "s1", "l1", "c1"))
    assert p == tmp_path / "model" / "anomaly" / "s1" / "l1" / "c1.npz"
    back = Bank.load(p, manifest_hash="ab" * 16, camera=("s1", "l1", "c1"))
    np.testing.assert_array_equal(back.tokens, bank.tokens)
    np.testing.assert_array_equal(back.offsets, bank.offsets)
    assert back.info == dataclasses.replace(bank.info, content_sha256=back.info.content_sha256)
    q = unit(np.random.default_rng(4).standard_normal((5, 16, bank.dim)))
    g = unit(np.random.default_rng(5).standard_normal((5, 24)))
    np.testing.assert_array_equal(back.score_arrays(q, np.ones((5, 16)), g).score,
                                  bank.score_arrays(q, np.ones((5, 16)), g).score)
    with pytest.raises(BankError, match="for model"):
        Bank.load(p, manifest_hash="cd" * 16)
    with pytest.raises(BankError, match="for camera s1/l1/c1, not s1/l1/c2"):
        Bank.load(p, camera=("s1", "l1", "c2"))
    with pytest.raises(BankError, match="cannot read"):
        Bank.load(tmp_path / "missing.npz")
    raw = bytearray(p.read_bytes())
    # a flipped byte in the stored tokens: the zip's own CRC or the content checksum refuses it
    at = raw.find(b"tokens.npy") + 400
    raw[at] ^= 0x01
    with pytest.raises(BankError):
        Bank.from_bytes(bytes(raw))
    with pytest.raises(BankError, match="not a readable bank"):
        Bank.from_bytes(b"PK\x03\x04 not a zip")
    # an edited array with a recomputed zip but the old checksum
    arrays = bank.arrays()
    arrays = dict(arrays, tokens=arrays["tokens"].copy())
    arrays["tokens"][0, 0] += np.float16(0.5)
    meta = json.loads(np.load(p)["meta"].tobytes())
    import io
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    with pytest.raises(BankError, match="checksum"):
        Bank.from_bytes(buf.getvalue())
    meta["schema"] = "tokenline.anomaly-bank/9"
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **bank.arrays())
    with pytest.raises(BankError, match="schema"):
        Bank.from_bytes(buf.getvalue())


def test_regions_from_a_footprint_and_from_centroid_and_size() -> None:
    fp = np.zeros((8, 8), np.uint8)
    fp[2:4, 5:8] = 3
    sizes, cents = boxes_from_footprint(fp, 4)
    s = Summary(np.ones(4, np.float32), unit(np.ones((4, 4), np.float32)), sizes, cents, fp)
    r = token_region(s, 3, (8, 8))
    assert r.box == (5 / 8, 2 / 8, 1.0, 4 / 8)
    np.testing.assert_array_equal(r.mask, fp == 3)
    assert r.public()["mask"]["rows"][2] == "00000111"
    np.testing.assert_array_equal(unpack_mask(pack_mask(r.mask), (8, 8)), r.mask)
    no_fp = Summary(s.global_embedding, s.tokens, np.array([1, 1, 1, 4], np.float32),
                    np.array([[0.5, 0.5]] * 3 + [[0.5, 0.25]], np.float32))
    r2 = token_region(no_fp, 3, (4, 4))  # 4 of 16 patches: a square of side 0.5 around its centroid
    assert r2.mask is None and r2.box == pytest.approx((0.25, 0.0, 0.75, 0.5))


def test_regions_of_many_frames_at_once_match_each_frames_own() -> None:
    """footprint_regions / pack_masks (central scores a batch at once) = the box and mask from the cells one by
    one, including a token that stands for no cell (box all 0) and regions touching the grid's edges."""
    rng = np.random.default_rng(3)
    fps = rng.integers(0, 6, (40, 6, 9)).astype(np.uint8)
    fps[0] = 0  # token 0 everywhere: the box is the whole input
    tokens = rng.integers(0, 7, 40)  # 6 stands for no cell
    tokens[0] = 0
    boxes, masks = footprint_regions(fps, tokens)
    for f in range(40):
        ys, xs = np.nonzero(fps[f] == tokens[f])
        want = (0, 0, 0, 0) if ys.size == 0 else (xs.min() / 9, ys.min() / 6, (xs.max() + 1) / 9, (ys.max() + 1) / 6)
        assert tuple(boxes[f]) == pytest.approx(want)
        np.testing.assert_array_equal(masks[f], fps[f] == tokens[f])
    assert tuple(boxes[0]) == (0, 0, 1, 1) and not masks[np.flatnonzero(tokens == 6)[0]].any()
    packed = pack_masks(masks)
    assert all(len(b) == 7 for b in packed)  # 54 cells in 7 bytes
    np.testing.assert_array_equal(np.stack([unpack_mask(b, (6, 9)) for b in packed]), masks)


@pytest.mark.parametrize("mode", ["int8", "int4", "fp16"])
def test_as_decoded_is_exactly_what_a_reader_gets(mode: str) -> None:
    m = make_msg()
    back = wire.decode(wire.encode(m, mode))
    np.testing.assert_array_equal(wire.as_decoded(m.summary.tokens, mode), back.summary.tokens)
    gmode = "fp16" if mode == "fp16" else "int8"
    np.testing.assert_array_equal(wire.as_decoded(m.summary.global_embedding, gmode), back.summary.global_embedding)


def test_anomaly_section_round_trip_and_older_readers_skip_it(monkeypatch) -> None:
    a = AnomalyScore(score=0.8125, threshold=0.5, token=9, flagged=True, set_id=3, set_version=2)
    m = dataclasses.replace(make_msg(), anomaly=a)
    buf = wire.encode(m, "int8")
    assert len(buf) == len(wire.encode(make_msg(), "int8")) + v2.SECTION_HEAD + v2.ANOMALY_SIZE
    assert len(buf) == wire.message_size("int8", 16, 384, ("jetson-01", "plant_a", "line.3", "cam-7"), anomaly=True)
    assert wire.decode(buf).anomaly == a
    assert wire.decode(wire.encode(make_msg(), "int8")).anomaly is None
    with pytest.raises(wire.WireError) as e:
        wire.encode(m, "int8", version=1)
    assert e.value.reason == "bad_section"
    with pytest.raises(wire.WireError) as e:
        wire.encode(dataclasses.replace(m, anomaly=dataclasses.replace(a, token=16)), "int8")
    assert e.value.reason == "out_of_range"
    # an older central that does not know the section type: it is optional (< 0x80), so skipped
    assert v2.ANOMALY < v2.CRITICAL
    monkeypatch.delitem(v2.SECTION_NAMES, v2.ANOMALY)
    old = wire.decode(buf)
    assert old.anomaly is None and old.frame_id == m.frame_id


def test_alert_topic_and_payload() -> None:
    al = topics.Alert(frame_id="0" * 12 + "7" + "0" * 19, site="s1", device="d_1", line="l.1", camera="c-1",
                      capture_us=5,
                      score=0.9, threshold=0.5, reference_set=3, set_version=2, token=9, box=(0.5, 0.25, 0.75, 0.5),
                      source="central", model="ab" * 16)
    assert al.topic == "tokenline/v2/s1/d_1/alert/l.1/c-1"  # the v2 layout: the device whose camera it is
    t = topics.parse_topic(al.topic)
    assert (t.kind, t.site, t.device, t.line, t.camera) == ("alert", "s1", "d_1", "l.1", "c-1")
    assert topics.ALERTS_FILTER == "tokenline/v2/+/+/alert/+/+"
    assert topics.parse_alert(al.to_json()) == al
    good = json.loads(al.to_json())
    for key, bad in (("score", "x"), ("box", [0, 0, 2, 1]), ("source", "nobody"), ("frame_id", "xyz"),
                     ("token", -2), ("model", "AB" * 16), ("site", "a/b"), ("device", "+")):
        with pytest.raises(topics.TopicError):
            topics.parse_alert(json.dumps(dict(good, **{key: bad})).encode())
    with pytest.raises(topics.TopicError, match="unknown"):
        topics.parse_alert(json.dumps(dict(good, extra=1)).encode())
    with pytest.raises(topics.TopicError):
        topics.parse_alert(b"\xff")


def make_whitened_bank(m: int = 3000, d: int = 16, lists: int = 30, seed: int = 0, gain: float = 1.0) -> Bank:
    """A bank of metric whitened: unit tokens around 30 centres, whitened by a fixed mean and matrix (any
    whitening: the bank does not care how central fitted it), grouped by centre."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((lists, d)))
    which = np.sort(rng.integers(0, lists, m))
    raw = unit(centres[which] + 0.2 * unit(rng.standard_normal((m, d))) * np.linspace(0.1, 1.5, d))
    whiten = np.concatenate([raw.mean(0, keepdims=True),
                             gain * (rng.standard_normal((d, d)) / np.sqrt(d) + 2 * np.eye(d))])
    z = ((raw - whiten[0]) @ whiten[1:]).astype(np.float16).astype(np.float32)
    cent = np.stack([z[which == c].mean(0) for c in range(lists)])
    offsets = np.concatenate([[0], np.cumsum(np.bincount(which, minlength=lists))])
    info = BankInfo(set_id=3, set_version=2, name="good", site="s1", line="l1", camera="c1", manifest_hash="ab" * 16,
                    metric="whitened", threshold=4.0, nprobe=4, frames=m // 16)
    return Bank(z, offsets, cent, np.arange(m) // 16, np.zeros((0, 24), np.float32), info, whiten.astype(np.float32))


def whitened_distances(bank: Bank, q: np.ndarray, exclude=None) -> np.ndarray:
    """Brute force: each unit token's Euclidean distance, after the bank's whitening, to its nearest bank token."""
    assert bank.whiten is not None
    z = (q.reshape(-1, q.shape[-1]) - bank.whiten[0]) @ bank.whiten[1:]
    d = np.sqrt(((z[:, None, :] - bank.tokens[None]) ** 2).sum(-1))
    if exclude is not None:
        d[np.repeat(exclude, q.shape[-2] if q.ndim == 3 else 1)[:, None] == bank.src[None, :]] = np.inf
    return d.min(axis=1).reshape(q.shape[:-1])


def test_whitened_bank_scores_euclidean_distances_after_its_whitening_in_every_search(monkeypatch) -> None:
    bank = make_whitened_bank()
    assert bank.whitened and bank.lists == 30 and bank.size <= anomaly.EXHAUSTIVE_UP_TO
    # one copy of the tokens in memory: they are the first d columns of what the search multiplies
    assert np.shares_memory(bank.tokens, bank._search_tokens) and bank.tokens.shape == (3000, 16)
    np.testing.assert_array_equal(bank._search_tokens[:, -1], -0.5 * np.einsum("ij,ij->i", bank.tokens, bank.tokens))
    rng = np.random.default_rng(3)
    f = 40
    noise = rng.uniform(0.02, 0.5, (f, 16, 1))
    frames = unit(bank.tokens[rng.integers(0, bank.size, (f, 16))] @ np.linalg.inv(bank.whiten[1:]) + bank.whiten[0]
                  + noise * rng.standard_normal((f, 16, bank.dim)))
    frames[7, 4] = unit(rng.standard_normal(bank.dim))  # an odd region
    sizes = np.ones((f, 16), np.float32)
    want = whitened_distances(bank, frames)
    full = bank.score_arrays(frames, sizes, every_token=True)
    np.testing.assert_allclose(full.distances, want, rtol=1e-4, atol=1e-4)
    fast = bank.score_arrays(frames, sizes)  # bound and refine by the lists
    np.testing.assert_allclose(fast.score, want.max(axis=1), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(fast.token, full.token)
    assert fast.token[7] == 4 and fast.score[7] > np.delete(fast.score, 7).max()
    # leave one frame out, as the builder calibrates thresholds
    ex = rng.integers(0, bank.size // 16, f)
    loo = bank.score_arrays(frames, sizes, exclude=ex)
    np.testing.assert_allclose(loo.distances, whitened_distances(bank, frames, ex), rtol=1e-4, atol=1e-4)
    # inverted lists probed by the nearest (Euclidean) centroids: exact when every list is probed
    monkeypatch.setattr(anomaly, "EXHAUSTIVE_UP_TO", 0)
    probed = bank.score_arrays(frames, sizes, every_token=True)
    assert np.all(probed.distances >= want - 1e-4) and np.mean(np.isclose(probed.distances, want, atol=1e-4)) >= 0.9
    everything = dataclasses.replace(bank, info=dataclasses.replace(bank.info, nprobe=bank.lists))
    np.testing.assert_allclose(everything.score_arrays(frames, sizes).score, want.max(axis=1), rtol=1e-4, atol=1e-4)
    # the file keeps the whitening; edge and central score the same bytes alike
    back = Bank.from_bytes(bank.to_bytes())
    assert back.info.metric == "whitened" and np.array_equal(back.whiten, bank.whiten)
    held = [v for v in vars(back).values() if isinstance(v, np.ndarray)]
    assert not any(v.dtype == np.float16 for v in held)  # no float16 copy of the file held
    assert back.to_bytes() == bank.to_bytes()  # the same file again
    np.testing.assert_array_equal(back.score_arrays(frames, sizes).score, bank.score_arrays(frames, sizes).score)


def test_whitened_distances_next_to_a_bank_token_are_not_rounding(monkeypatch) -> None:
    """Frames next to bank frames (as far as the file's float16 storage puts them) score their true whitened distance
    in every search, not the float32 rounding of |z|^2 - 2 z.z_b + |z_b|^2 (large whitened norms, as in real banks:
    |z| ~ 10 in 96 dims), which was up to the bank's rounding floor; leave-one-out calibration likewise."""
    bank = make_whitened_bank(gain=8.0)
    rng = np.random.default_rng(5)
    f = 12
    w64 = bank.whiten.astype(np.float64)
    near = bank.tokens[rng.integers(0, bank.size, (f, 16))].astype(np.float64) @ np.linalg.inv(w64[1:]) + w64[0]
    frames = unit(near + 1e-6 * rng.standard_normal(near.shape))  # the same cells, a hair apart

    def truth(exclude=None):  # float64 brute force
        z = (frames.reshape(-1, bank.dim).astype(np.float64) - w64[0]) @ w64[1:]
        d2 = ((z[:, None, :] - bank.tokens[None].astype(np.float64)) ** 2).sum(-1)
        if exclude is not None:
            d2[np.repeat(exclude, 16)[:, None] == bank.src[None, :]] = np.inf
        return np.sqrt(d2.min(axis=1)).reshape(f, 16)

    want = truth()
    assert np.einsum("ij,ij->i", bank.tokens, bank.tokens).max() > 100 and want.max() < 0.05
    sizes = np.ones((f, 16), np.float32)
    for searched in (bank.score_arrays(frames, sizes, every_token=True).distances,
                     bank.score_arrays(frames, sizes).score[:, None] * np.ones((1, 16))):
        np.testing.assert_allclose(searched.max(axis=1), want.max(axis=1), atol=2e-4)
    np.testing.assert_allclose(bank.score_arrays(frames, sizes, every_token=True).distances, want, atol=2e-4)
    ex = rng.integers(0, bank.size // 16, f)
    np.testing.assert_allclose(bank.score_arrays(frames, sizes, exclude=ex).distances, truth(ex), atol=2e-4)
    monkeypatch.setattr(anomaly, "EXHAUSTIVE_UP_TO", 0)  # by the inverted lists
    probed = bank.score_arrays(frames, sizes, every_token=True).distances
    assert np.all(probed >= want - 2e-4) and np.mean(np.abs(probed - want) < 2e-4) >= 0.9


def test_bank_metric_is_checked_and_cosine_files_stay_as_they_were() -> None:
    bank = make_whitened_bank(m=320, lists=2)
    with pytest.raises(BankError, match="needs a whitening"):
        dataclasses.replace(bank, whiten=None)
    with pytest.raises(BankError, match="'cosine' cannot have a whitening"):
        dataclasses.replace(bank, info=dataclasses.replace(bank.info, metric="cosine"))
    with pytest.raises(BankError, match=r"whitening must be \[17, 16\]"):
        dataclasses.replace(bank, whiten=bank.whiten[:-1])
    with pytest.raises(BankError, match="metric must be one of"):
        dataclasses.replace(bank, info=dataclasses.replace(bank.info, metric="euclid"))
    # a cosine bank's file has neither a whitening nor a metric key: builds from before the metric read it
    data = make_bank(m=320, lists=2).to_bytes()
    with np.load(io.BytesIO(data)) as z:
        assert "whiten" not in z.files and "metric" not in json.loads(bytes(z["meta"]).decode())
    assert Bank.from_bytes(data).info.metric == "cosine"
