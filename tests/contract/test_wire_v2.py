"""Contract: wire format version 2 (typed sections): round trips, footprints, metadata, projected tokens,
forward compatibility (optional sections skipped, required ones refused), every v2 rejection with its reason."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.contract.test_wire import assert_decodes_or_rejects, cos, make_msg, mutated, reseal, unit
from tokenline import wire
from tokenline.summary import Summary, boxes_from_footprint
from tokenline.wire import v2
from tokenline.wire import WireError, decode, encode

NAMES = ("jetson-01", "plant_a", "line.3", "cam-7")
NAMES_END = v2.FIXED_SIZE + sum(1 + len(s) for s in NAMES)


def footprint(k: int = 16, grid=(16, 16), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, size=grid).astype(np.uint8)


def fp_msg(k: int = 16, d: int = 384, token_dim: int = 384, grid=(16, 16), **over) -> wire.TokenMessage:
    rng = np.random.default_rng(5)
    fp = footprint(k, grid)
    sizes, cents = boxes_from_footprint(fp, k)
    s = Summary(unit(rng, d), unit(rng, k, token_dim), sizes, cents, fp)
    base = make_msg(k=k, d=d)
    fields = {f: getattr(base, f) for f in ("frame_id", "device", "site", "line", "camera", "capture_ts_us", "seq",
                                             "manifest_hash", "flags")}
    fields.update(over)
    return wire.TokenMessage(summary=s, **fields)


def sections(buf: bytes):
    """[(type, codec, offset of body, length)] of an encoded v2 message."""
    out, pos = [], NAMES_END
    for _ in range(buf[5]):
        kind, codec, length = struct.unpack_from("<BBI", buf, pos)
        out.append((kind, codec, pos + 6, length))
        pos += 6 + length
    return out


@pytest.mark.parametrize("mode,min_cos", [("int8", 0.999), ("int4", 0.98), ("fp16", 0.99999)])
def test_round_trip_with_boxes(mode: str, min_cos: float) -> None:
    m = make_msg(flags=wire.FLAG_REPLAYED)
    buf = encode(m, mode)
    assert buf[4] == 2
    back = decode(buf)
    assert back.version == 2 and back.token_dtype == mode and back.replayed and back.metadata is None
    for f in ("frame_id", "device", "site", "line", "camera", "capture_ts_us", "seq", "manifest_hash"):
        assert getattr(back, f) == getattr(m, f), f
    assert cos(back.summary.tokens, m.summary.tokens).min() >= min_cos
    np.testing.assert_array_equal(back.summary.sizes, m.summary.sizes)
    np.testing.assert_allclose(back.summary.centroids, m.summary.centroids, atol=1.0 / 65535)
    assert back.summary.footprint is None
    assert len(buf) == wire.message_size(mode, 16, 384, NAMES)


@pytest.mark.parametrize("k,grid", [(16, (16, 16)), (16, (15, 17)), (3, (4, 4)), (40, (32, 32))])
def test_footprint_replaces_boxes_and_derives_them(k: int, grid) -> None:
    m = fp_msg(k=k, d=32, token_dim=32, grid=grid)
    buf = encode(m, "int8")
    kinds = [s[0] for s in sections(buf)]
    assert v2.FOOTPRINT in kinds and v2.BOXES not in kinds
    assert [s[1] for s in sections(buf) if s[0] == v2.FOOTPRINT] == [4 if k <= 16 else 8]
    back = decode(buf).summary
    np.testing.assert_array_equal(back.footprint, m.summary.footprint)
    np.testing.assert_array_equal(back.sizes, m.summary.sizes)
    np.testing.assert_allclose(back.centroids, m.summary.centroids, atol=1e-6)
    assert back.sizes.sum() == grid[0] * grid[1]
    assert len(buf) == wire.message_size("int8", k, 32, NAMES, footprint_grid=grid)


def test_boxes_from_footprint_counts_and_centres() -> None:
    fp = np.array([[0, 0, 1], [0, 2, 1]], np.uint8)
    sizes, cents = boxes_from_footprint(fp, 4)
    np.testing.assert_array_equal(sizes, [3, 2, 1, 0])
    np.testing.assert_allclose(cents[0], [(0.5 + 1.5 + 0.5) / 3 / 3, (0.5 + 0.5 + 1.5) / 3 / 2])
    np.testing.assert_allclose(cents[1], [2.5 / 3, 0.5])
    np.testing.assert_allclose(cents[3], [0.5, 0.5])  # a token with no patch


def test_projected_tokens_and_the_size_target() -> None:
    """K=16, D=384 global, tokens projected to 192 dims in int4, a 16x16 footprint: under 2.5 KB."""
    m = fp_msg(token_dim=192)
    buf = encode(m, "int4")
    back = decode(buf)
    assert back.summary.tokens.shape == (16, 192) and back.summary.global_embedding.shape == (384,)
    assert cos(back.summary.global_embedding, m.summary.global_embedding) >= 0.999
    assert len(buf) == wire.message_size("int4", 16, 384, NAMES, token_dim=192, footprint_grid=(16, 16))
    assert len(buf) <= 2560


def test_metadata_round_trip_and_limits() -> None:
    meta = {"source": "lot 7/img_0001.JPG", "labels": {"lot": "7", "shift": "night", "operator.id": "ä-12"}}
    back = decode(encode(fp_msg(metadata=meta)))
    assert back.metadata == {"source": meta["source"], "labels": dict(sorted(meta["labels"].items()))}
    raw = json.dumps(back.metadata, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    assert len(encode(fp_msg(metadata=meta))) == wire.message_size(
        "int8", 16, 384, NAMES, footprint_grid=(16, 16), metadata_bytes=len(raw))
    for bad in ({"color": "red"}, {"source": ""}, {"source": "a\nb"}, {"labels": {"bad key": "x"}},
                {"labels": {"k": 5}}, {"labels": {f"k{i}": "v" for i in range(33)}}, {"labels": {"k": "x" * 129}},
                {"source": "x" * 256}, "not an object"):
        with pytest.raises(WireError) as e:
            encode(fp_msg(metadata=bad))
        assert e.value.reason == "bad_metadata", bad
    with pytest.raises(WireError) as e:  # version 1 has no place for it
        encode(fp_msg(metadata=meta), version=1)
    assert e.value.reason == "bad_metadata"


def test_frame_geometry_metadata_and_the_product_message_size() -> None:
    """The edge's message: K=16, D=384 global, d=96 int8 tokens, 16x16 footprint, the frame's geometry: <= 2.5 KB."""
    frame = {"width": 1920, "height": 1080, "roi": [400, 100, 1200, 900]}
    m = fp_msg(token_dim=96, metadata={"frame": frame})
    buf = encode(m, "int8")
    assert decode(buf).metadata == {"frame": frame}
    raw = json.dumps({"frame": frame}, separators=(",", ":"), sort_keys=True).encode()
    assert len(buf) == wire.message_size("int8", 16, 384, NAMES, token_dim=96, footprint_grid=(16, 16),
                                         metadata_bytes=len(raw)) <= 2560
    assert decode(encode(fp_msg(metadata={"frame": {"width": 640, "height": 480}}))).metadata["frame"] == {
        "width": 640, "height": 480}
    for bad in ({"width": 0, "height": 10}, {"width": 10}, {"width": 10, "height": 10, "roi": [0, 0, 11, 5]},
                {"width": 10, "height": 10, "roi": [0, 0, 0, 5]}, {"width": 10, "height": 10, "roi": [0, 0, 5]},
                {"width": True, "height": 10}, {"width": 10, "height": 10, "dpi": 72}, [10, 10]):
        with pytest.raises(WireError) as e:
            encode(fp_msg(metadata={"frame": bad}))
        assert e.value.reason == "bad_metadata", bad


def test_optional_unknown_sections_are_skipped_required_ones_refused() -> None:
    buf = bytearray(encode(fp_msg())[:-4])

    def add(kind: int) -> bytes:
        b = bytearray(buf) + struct.pack("<BBI", kind, 0, 3) + b"xyz"
        b[5] += 1
        b[8:12] = struct.pack("<I", len(b) + 4)
        return reseal(b + b"\0\0\0\0")

    assert decode(add(0x42)).summary.tokens.shape == (16, 384)  # a newer writer's optional section
    with pytest.raises(WireError) as e:
        decode(add(0x90))
    assert e.value.reason == "bad_section"
    with pytest.raises(WireError) as e:
        decode(add(v2.METADATA + 0))  # metadata 'xyz' with codec 0: not JSON
    assert e.value.reason == "bad_metadata"
    with pytest.raises(WireError) as e:
        decode(add(v2.GLOBAL))  # twice
    assert e.value.reason == "bad_section"


def _drop_section(kind: int):
    def f(b: bytearray) -> bytes:
        secs = sections(bytes(b))
        _, _, off, length = next(s for s in secs if s[0] == kind)
        out = b[: off - 6] + b[off + length:]
        out[5] -= 1
        out[8:12] = struct.pack("<I", len(out))
        return reseal(out)
    return f


def _patch(kind: int, rel: int, value: bytes):
    def f(b: bytearray) -> bytes:
        _, _, off, _ = next(s for s in sections(bytes(b)) if s[0] == kind)
        b[off + rel : off + rel + len(value)] = value
        return reseal(b)
    return f


def _codec(kind: int, codec: int):
    def f(b: bytearray) -> bytes:
        _, _, off, _ = next(s for s in sections(bytes(b)) if s[0] == kind)
        b[off - 5] = codec
        return reseal(b)
    return f


GOOD = encode(fp_msg(k=16, d=64, token_dim=64, grid=(8, 8)))


def _token_beyond_k() -> bytes:
    """A footprint whose first patch names token 15 in a message of K=12 tokens."""
    b = bytearray(encode(fp_msg(k=12, d=64, token_dim=64, grid=(8, 8))))
    _, _, off, _ = next(s for s in sections(bytes(b)) if s[0] == v2.FOOTPRINT)
    b[off + 4] = 0x0F
    return reseal(b)


@pytest.mark.parametrize("mutate,reason", [
    (_drop_section(v2.TOKENS), "bad_section"),
    (_drop_section(v2.GLOBAL), "bad_section"),
    (_drop_section(v2.FOOTPRINT), "bad_section"),
    (lambda b: _token_beyond_k(), "out_of_range"),
    (_patch(v2.FOOTPRINT, 0, struct.pack("<H", 9)), "length_mismatch"),
    (_patch(v2.FOOTPRINT, 0, struct.pack("<H", 0)), "bad_dims"),
    (_patch(v2.TOKENS, 0, struct.pack("<H", 0)), "bad_dims"),
    (_patch(v2.TOKENS, 2, struct.pack("<H", 63)), "length_mismatch"),
    (_patch(v2.TOKENS, 4, struct.pack("<f", float("nan"))), "non_finite"),
    (_patch(v2.GLOBAL, 4, b"\x80"), "out_of_range"),
    (_codec(v2.GLOBAL, 9), "bad_dtype"),
    (_codec(v2.TOKENS, 9), "bad_dtype"),
    (_codec(v2.FOOTPRINT, 5), "bad_dtype"),
    (lambda b: reseal(bytearray(b[:6]) + b"\x07" + b[7:]), "bad_value"),  # reserved byte
    (lambda b: reseal(bytearray(b[:5]) + bytes([b[5] + 1]) + b[6:]), "length_mismatch"),  # one section too many
    (lambda b: reseal(bytearray(b[:5]) + bytes([b[5] - 1]) + b[6:]), "length_mismatch"),  # trailing bytes
])
def test_v2_rejections(mutate, reason: str) -> None:
    bad = mutate(bytearray(GOOD))
    with pytest.raises(WireError) as e:
        decode(bad)
    assert e.value.reason == reason, str(e.value)


def test_encode_refuses_a_bad_footprint() -> None:
    m = fp_msg(k=4, d=8, token_dim=8, grid=(2, 2))
    bad = Summary(m.summary.global_embedding, m.summary.tokens, m.summary.sizes, m.summary.centroids,
                  np.full((2, 2), 4, np.uint8))
    with pytest.raises(WireError) as e:
        encode(wire.TokenMessage(**{**m.__dict__, "summary": bad}))
    assert e.value.reason == "out_of_range"


def test_both_versions_decode_and_restamp() -> None:
    m = fp_msg(k=4, d=8, token_dim=8, grid=(2, 2))
    for version in (1, 2):
        buf = encode(m, version=version)
        assert decode(buf).version == version
        re = wire.with_header(buf, flags=wire.FLAG_REPLAYED, seq=9)
        back = decode(re)
        assert back.replayed and back.seq == 9 and re[40:-4] == buf[40:-4]
    with pytest.raises(WireError) as e:
        encode(m, version=3)
    assert e.value.reason == "bad_version"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([encode(fp_msg(k=3, d=5, token_dim=4, grid=(3, 2), metadata={"labels": {"a": "b"}}), m)
                        for m in ("int8", "int4", "fp16")]),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
       st.booleans())
def test_fuzz_mutated_v2_messages(good: bytes, edits, seal: bool) -> None:
    assert_decodes_or_rejects(mutated(good, edits, seal))
