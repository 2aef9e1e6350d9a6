"""Contract: commit acknowledgements encode, decode and refuse malformed payloads with a reason."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenline import acks, wire
from tokenline.acks import COMMITTED, DUPLICATE, REJECTED, Ack, AckError
from tokenline.frame_id import new_frame_id
from tokenline.summary import Summary


def test_round_trip_and_layout() -> None:
    a, b, c = new_frame_id(), new_frame_id(), new_frame_id()
    entries = [Ack(a, COMMITTED), Ack(b, DUPLICATE), Ack(c, REJECTED, "identity_mismatch")]
    buf = acks.encode(entries)
    assert acks.decode(buf) == entries
    assert buf[:8] == b"TKLA" + bytes([1, 0]) + struct.pack("<H", 3)
    assert buf[8:26] == a + bytes([COMMITTED, 0])
    assert len(buf) == 8 + 3 * 18 + len("identity_mismatch") + 4
    assert struct.unpack("<I", buf[-4:])[0] == zlib.crc32(buf[:-4])
    assert [x.confirmed for x in entries] == [True, True, False]
    assert [x.status_name for x in entries] == ["committed", "duplicate", "rejected"]


def test_batches_split_long_lists() -> None:
    ids = [new_frame_id() for _ in range(2500)]
    payloads = list(acks.batches(Ack(i, COMMITTED) for i in ids))
    assert [len(acks.decode(p)) for p in payloads] == [acks.MAX_ENTRIES, acks.MAX_ENTRIES, 2500 - 2 * acks.MAX_ENTRIES]
    assert [x.frame_id for p in payloads for x in acks.decode(p)] == ids
    assert max(len(p) for p in payloads) <= 12 + acks.MAX_ENTRIES * 82


@pytest.mark.parametrize("entries,msg", [
    ([], "1..1024"),
    ([Ack(b"short", COMMITTED)], "16 bytes"),
    ([Ack(bytes(16), 9)], "status"),
    ([Ack(bytes(16), REJECTED)], "needs a reason"),
    ([Ack(bytes(16), REJECTED, "Not Allowed")], "needs a reason"),
    ([Ack(bytes(16), REJECTED, "x" * 65)], "needs a reason"),
    ([Ack(bytes(16), COMMITTED, "why")], "only rejected"),
])
def test_encode_refuses_what_the_format_cannot_carry(entries, msg: str) -> None:
    with pytest.raises(AckError, match=msg):
        acks.encode(entries)


def _seal(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


GOOD = acks.encode([Ack(bytes(range(16)), REJECTED, "bad_crc")])


@pytest.mark.parametrize("payload,msg", [
    ("text", "must be bytes"),
    (b"", "shorter"),
    (b"XXXX" + GOOD[4:], "magic"),
    (GOOD[:4] + b"\x02" + GOOD[5:], "version"),
    (GOOD[:5] + b"\x01" + GOOD[6:], "flag"),
    (GOOD[:-1] + bytes([GOOD[-1] ^ 1]), "CRC"),
    (_seal(GOOD[:6] + struct.pack("<H", 0) + GOOD[8:-4]), "entry count"),
    (_seal(GOOD[:6] + struct.pack("<H", 2) + GOOD[8:-4]), "entry 1 is truncated"),
    (_seal(GOOD[:-4] + b"zz"), "after the last entry"),
    (_seal(GOOD[:25] + bytes([60]) + GOOD[26:-4]), "reason is truncated"),
    (_seal(GOOD[:26] + b"\xff" + GOOD[27:-4]), "not ASCII"),
    (_seal(GOOD[:26] + b"B" + GOOD[27:-4]), "needs a reason"),
])
def test_decode_refuses_malformed_payloads(payload, msg: str) -> None:
    with pytest.raises(AckError, match=msg):
        acks.decode(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decode_never_raises_anything_else(data: bytes) -> None:
    for candidate in (data, _seal(data), _seal(b"TKLA\x01\x00" + data)):
        try:
            acks.decode(candidate)
        except AckError:
            pass


def test_peek_frame_id_reads_only_what_starts_like_a_token_message() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    msg = wire.TokenMessage(frame_id=new_frame_id(), device="d", site="s", line="l", camera="c", capture_ts_us=1,
                            seq=3, manifest_hash=bytes(16),
                            summary=Summary(x[0], x[1:], np.ones(4, np.float32), np.full((4, 2), 0.5, np.float32)))
    for version in wire.VERSIONS:
        assert wire.peek_frame_id(wire.encode(msg, version=version)) == msg.frame_id
    fid = new_frame_id()
    head = b"TKLN" + bytes(8) + fid
    assert wire.peek_frame_id(head) == fid and wire.peek_frame_id(head + b"garbage") == fid
    assert wire.peek_frame_id(head[:-1]) is None and wire.peek_frame_id(b"XXXX" + head[4:]) is None
    assert wire.peek_frame_id("TKLN") is None
