"""Contract: wire format version 1 round-trips, rejects every malformed input with its reason, meets its size targets.

Version 2 (sections, footprints, metadata) has its own file, test_wire_v2.py."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenline import frame_id, wire
from tokenline.frame_id import FrameIdError
from tokenline.summary import Summary
from tokenline.wire import TokenMessage, WireError, decode
from tokenline.wire import encode as encode_any

V2_ONLY_REASONS = {"bad_section", "bad_metadata"}  # covered in test_wire_v2.py


def encode(m: TokenMessage, mode=None) -> bytes:
    """Version 1: what edges not yet upgraded send."""
    return encode_any(m, mode, version=1)

K, D = 16, 384


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_msg(k: int = K, d: int = D, seed: int = 0, **over) -> TokenMessage:
    """A valid message; ``over`` replaces message fields and summary arrays (by their field names)."""
    rng = np.random.default_rng(seed)
    arrays = dict(global_embedding=unit(rng, d), tokens=unit(rng, k, d),
                  sizes=rng.integers(1, 40, size=k).astype(np.float32),
                  centroids=rng.uniform(0, 1, size=(k, 2)).astype(np.float32))
    fields = dict(
        frame_id=frame_id.new_frame_id(1_700_000_000_123_456), device="jetson-01", site="plant_a", line="line.3",
        camera="cam-7", capture_ts_us=1_700_000_000_123_456, seq=4_000_000_000, manifest_hash=bytes(range(16)),
        token_dtype="int8", flags=0,
    )
    for key, value in over.items():
        (arrays if key in arrays else fields)[key] = value
    return TokenMessage(summary=Summary(**arrays), **fields)


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def reseal(b: bytearray) -> bytes:
    """Recompute the CRC so a test reaches the checks behind it."""
    body = bytes(b[:-4])
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


@pytest.mark.parametrize("mode,min_cos", [("int8", 0.999), ("int4", 0.98), ("fp16", 0.99999)])
def test_round_trip_each_mode(mode: str, min_cos: float) -> None:
    m = make_msg(flags=wire.FLAG_REPLAYED)
    buf = encode(m, mode)
    back = decode(buf)
    assert back.token_dtype == mode and back.flags == wire.FLAG_REPLAYED and back.replayed
    for f in ("frame_id", "device", "site", "line", "camera", "capture_ts_us", "seq", "manifest_hash"):
        assert getattr(back, f) == getattr(m, f), f
    b, s = back.summary, m.summary
    assert b.global_embedding.dtype == np.float32 and b.tokens.shape == (K, D)
    assert cos(b.global_embedding, s.global_embedding) >= 0.999
    assert cos(b.tokens, s.tokens).min() >= min_cos
    np.testing.assert_array_equal(b.sizes, s.sizes)
    np.testing.assert_allclose(b.centroids, s.centroids, atol=1.0 / 65535)
    assert len(buf) == wire.message_size_v1(mode, K, D, (m.device, m.site, m.line, m.camera))


def test_global_embedding_cosine_at_least_0999_over_many_vectors() -> None:
    rng = np.random.default_rng(1)
    for i in range(200):
        g = unit(rng, D)
        if i % 2:  # heavy-tailed vectors: one dominant component is the hard case for per-vector scales
            g[rng.integers(D)] *= 20
            g /= np.linalg.norm(g)
        for mode in ("int8", "int4"):
            back = decode(encode(make_msg(global_embedding=g), mode))
            assert cos(back.summary.global_embedding, g) >= 0.999


def test_sizes_per_mode_for_k16_d384() -> None:
    names = ("jetson-01", "plant_a", "line.3", "cam-7")
    sizes = {mode: wire.message_size_v1(mode, K, D, names) for mode in ("int8", "int4", "fp16")}
    # 60 fixed + 4 strings (1+len) + sections + sizes 64 + centroids 64 + crc 4
    strings = sum(1 + len(s) for s in names)
    assert sizes["int8"] == 60 + strings + (4 + 384) + (64 + 16 * 384) + 64 + 64 + 4
    assert sizes["int4"] == 60 + strings + (4 + 384) + (64 + 16 * 192) + 64 + 64 + 4
    assert sizes["fp16"] == 60 + strings + 768 + 16 * 384 * 2 + 64 + 64 + 4
    assert sizes["int4"] <= 4096 < sizes["int8"]  # only packed int4 meets the 4 KB target at K=16, D=384
    longest = ("a" * 64,) * 4
    assert wire.message_size_v1("int4", K, D, longest) <= 4096 + 256  # worst-case names cost at most 256 bytes


def test_zero_vectors_and_odd_dims_round_trip() -> None:
    m = make_msg(k=3, d=7, global_embedding=np.zeros(7, np.float32), tokens=np.zeros((3, 7), np.float32))
    for mode in ("int8", "int4", "fp16"):
        back = decode(encode(m, mode)).summary
        assert not back.global_embedding.any() and not back.tokens.any() and back.tokens.shape == (3, 7)
    rng = np.random.default_rng(3)
    t = unit(rng, 5, 7)
    back = decode(encode(make_msg(k=5, d=7, tokens=t, global_embedding=unit(rng, 7)), "int4")).summary
    assert np.abs(back.tokens - t).max() <= np.abs(t).max(axis=1).max() / 14 + 1e-6


def test_int4_packing_is_exact_for_representable_values() -> None:
    q = np.array([[-7, -1, 0, 1, 7, 3, -3]], dtype=np.float32)
    q4, scale = wire.quantize(q, 4)
    packed = wire.pack_int4(q4)
    assert packed.shape == (1, 4) and scale[0] == pytest.approx(1.0)
    np.testing.assert_array_equal(wire.unpack_int4(packed, 7), q.astype(np.int8))
    assert packed[0, 0] == ((-7 & 0xF) | ((-1 & 0xF) << 4))


def test_one_symmetric_quantizer_for_8_and_4_bits() -> None:
    x = np.array([[-2.0, -1.0, 0.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    for bits, qmax in ((8, 127), (4, 7)):
        q, scale = wire.quantize(x, bits)
        assert q.dtype == np.int8 and q.min() == -qmax and q.max() == qmax  # symmetric: -qmax-1 never appears
        assert scale[0] == pytest.approx(2.0 / qmax) and scale[1] == 0 and not q[1].any()
        np.testing.assert_allclose(q * scale[:, None], x, atol=scale[0] / 2 + 1e-7)
    with pytest.raises(ValueError, match="bits"):
        wire.quantize(x, 2)


def test_header_offsets_come_from_the_layout() -> None:
    assert wire.v1.FIXED_SIZE == 60 == struct.calcsize("<" + "".join(code for _, code in wire.v1.HEADER))
    buf = encode(make_msg())
    assert struct.unpack_from("<I", buf, 36)[0] == 4_000_000_000 and buf[7] == 0  # seq at 36, flags at 7


def test_frame_ids_are_uuid7_time_ordered_and_parse() -> None:
    ids = [frame_id.new_frame_id(1_700_000_000_000_000 + i * 7) for i in range(500)]
    assert ids == sorted(ids) and len(set(ids)) == 500
    fid = ids[0]
    assert fid[6] >> 4 == 7 and fid[8] >> 6 == 0b10
    assert frame_id.frame_id_ts_ms(fid) == 1_700_000_000_000
    s = frame_id.frame_id_str(fid)
    assert len(s) == 32 and s == s.lower() and frame_id.parse_frame_id(s) == fid
    for bad in ("XYZ", s.upper(), "0" * 32):
        with pytest.raises(FrameIdError) as e:
            frame_id.parse_frame_id(bad)
        assert e.value.reason == "bad_frame_id"


def test_with_flags_marks_replay_without_requantizing() -> None:
    buf = encode(make_msg())
    re = wire.with_flags(buf, wire.FLAG_REPLAYED)
    assert decode(re).replayed and re[8:-4] == buf[8:-4]
    s = wire.with_header(buf, seq=7)
    assert decode(s).seq == 7 and s[:36] == buf[:36] and s[40:-4] == buf[40:-4]
    with pytest.raises(WireError):
        wire.with_header(buf, seq=2**32)


# -- rejection reasons ----------------------------------------------------------------------------------------
def _mut(offset: int, value: bytes):
    def f(b: bytearray) -> bytes:
        b[offset : offset + len(value)] = value
        return reseal(b)
    return f


GOOD = encode(make_msg())
NAMES_END = 60 + sum(1 + len(s) for s in ("jetson-01", "plant_a", "line.3", "cam-7"))


def _set_total(b: bytearray, n: int) -> None:
    b[8:12] = struct.pack("<I", n)


def _truncate_consistently(b: bytearray) -> bytes:
    b = b[:-100]  # drop 96 body bytes + the CRC, then fix the length and reseal
    _set_total(b, len(b) + 4)
    return reseal(b + b"\0\0\0\0")


def _bad_k(b: bytearray) -> bytes:
    b[56:58] = struct.pack("<H", 0)
    return reseal(b)


def _nan_scale(b: bytearray) -> bytes:
    b[NAMES_END : NAMES_END + 4] = struct.pack("<f", float("nan"))
    return reseal(b)


def _neg_size(b: bytearray) -> bytes:
    off = len(b) - 4 - 64 - 64
    b[off : off + 4] = struct.pack("<f", -1.0)
    return reseal(b)


def _inf_size(b: bytearray) -> bytes:
    off = len(b) - 4 - 64 - 64
    b[off : off + 4] = struct.pack("<f", float("inf"))
    return reseal(b)


def _min_int8(b: bytearray) -> bytes:
    b[NAMES_END + 4] = 0x80
    return reseal(b)


def _bad_name(b: bytearray) -> bytes:
    b[61:62] = b"/"  # first char of the device name
    return reseal(b)


def _non_ascii_name(b: bytearray) -> bytes:
    b[61:62] = b"\xff"
    return reseal(b)


def _ts_negative(b: bytearray) -> bytes:
    b[28:36] = struct.pack("<q", -5)
    return reseal(b)


CASES = {
    "not_bytes": lambda b: "a string",
    "too_large": lambda b: bytes(b) + b"\0" * 70000,
    "truncated": lambda b: bytes(b[:30]),
    "bad_magic": _mut(0, b"XXXX"),
    "bad_version": _mut(4, b"\x09"),
    "length_mismatch": lambda b: bytes(b) + b"\0",
    "bad_crc": lambda b: bytes(b[:-1]) + bytes([b[-1] ^ 1]),
    "bad_dtype": _mut(5, b"\x09"),
    "bad_flags": _mut(7, b"\x80"),
    "bad_frame_id": _mut(18, b"\x40"),
    "bad_string": _bad_name,
    "bad_timestamp": _ts_negative,
    "bad_dims": _bad_k,
    "non_finite": _nan_scale,
    "out_of_range": _neg_size,
}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_each_rejection_reason(reason: str) -> None:
    bad = CASES[reason](bytearray(GOOD))
    with pytest.raises(WireError) as e:
        decode(bad)
    assert e.value.reason == reason, str(e.value)
    assert str(e.value)  # human text


@pytest.mark.parametrize("mutate,reason", [
    (_truncate_consistently, "length_mismatch"),
    (_mut(6, b"\x03"), "bad_dtype"),  # fp16 global with int8 tokens
    (_non_ascii_name, "bad_string"),
    (_inf_size, "non_finite"),
    (_min_int8, "out_of_range"),
    (_mut(60, b"\x00"), "bad_string"),  # empty device name
])
def test_more_rejections(mutate, reason: str) -> None:
    with pytest.raises(WireError) as e:
        decode(mutate(bytearray(GOOD)))
    assert e.value.reason == reason, str(e.value)


def test_every_documented_reason_is_covered() -> None:
    covered = set(CASES) | {"bad_value"}  # bad_value is encode-only (manifest_hash length)
    assert covered | V2_ONLY_REASONS == set(wire.REASONS)


@pytest.mark.parametrize("over,reason", [
    ({"global_embedding": np.full(D, np.nan, np.float32)}, "non_finite"),
    ({"tokens": np.zeros((K, D + 1), np.float32)}, "bad_dims"),
    ({"sizes": np.zeros(K + 1, np.float32)}, "bad_dims"),
    ({"centroids": np.full((K, 2), 1.5, np.float32)}, "out_of_range"),
    ({"camera": "cam/1"}, "bad_string"),
    ({"site": "x" * 65}, "bad_string"),
    ({"seq": 2**32}, "out_of_range"),
    ({"capture_ts_us": -1}, "bad_timestamp"),
    ({"flags": 4}, "bad_flags"),
    ({"frame_id": b"\0" * 16}, "bad_frame_id"),
    ({"manifest_hash": b"short"}, "bad_value"),
    ({"token_dtype": "int2"}, "bad_dtype"),
    ({"tokens": np.full((K, D), 1e6, np.float32)}, None),  # fine in int8 (scaled) ...
])
def test_encode_rejects_invalid_messages(over, reason) -> None:
    m = make_msg(**over)
    if reason is None:
        decode(encode(m, "int8"))
        with pytest.raises(WireError) as e:  # ... but beyond the float16 range in fp16
            encode(m, "fp16")
        assert e.value.reason == "out_of_range"
        return
    with pytest.raises(WireError) as e:
        encode(m)
    assert e.value.reason == reason


# -- fuzzing: decode raises nothing but WireError ----------------------------------------------------------
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    for payload in (data, wire.MAGIC + data, GOOD[:60] + data):
        try:
            decode(payload)
        except WireError as e:
            assert e.reason in wire.REASONS


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([encode(make_msg(k=2, d=5), m) for m in ("int8", "int4", "fp16")]),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
       st.booleans())
def test_fuzz_mutated_messages(good: bytes, edits, seal: bool) -> None:
    assert_decodes_or_rejects(mutated(good, edits, seal))


def mutated(good: bytes, edits, seal: bool) -> bytes:
    b = bytearray(good)
    for pos, val in edits:
        b[pos % len(b)] = val
    return reseal(b) if seal else bytes(b)


def assert_decodes_or_rejects(payload: bytes) -> None:
    """Decode raises nothing but WireError with a documented reason; whatever gets through is valid and
    re-encodes in its own version."""
    try:
        m = decode(payload)
    except WireError as e:
        assert e.reason in wire.REASONS
    else:
        s = m.summary
        assert np.all(np.isfinite(s.tokens)) and np.all(np.isfinite(s.global_embedding))
        assert s.tokens.shape[0] == s.k and np.all(s.sizes >= 0)
        assert m.version == 2 or s.tokens.shape[1] == s.dim  # v1 tokens share the global dimension
        assert np.all((s.centroids >= 0) & (s.centroids <= 1))
        decode(encode_any(m, version=m.version))
