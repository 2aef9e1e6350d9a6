"""Property-based fuzzing of central's ingest path: whatever arrives, the batch is committed, every message is
accounted for (stored, duplicate or dead letter with a reason), every token message on a protocol 2 topic whose
frame id can be read gets exactly one acknowledgement for that topic's device, and nothing raises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from central.config import IngestConfig
from central.ingest import Incoming, Ingestor
from central.store import register_model
from sql.db import make_engine
from sql.migrate import upgrade
from tests.central.conftest import make_message, tx
from tokenline.wire import encode, peek_frame_id

TOPIC = "tokenline/v2/s1/d1/tokens/l1/c1"
_state: dict = {}


def _setup(tmp: Path, manifest, model_dir: Path):
    if "ingestor" not in _state:
        eng = make_engine(f"sqlite:///{tmp / 'fuzz.db'}")
        upgrade(eng)
        tx(eng, register_model, manifest, model_dir)
        _state.update(ingestor=Ingestor(eng, IngestConfig(), "fuzz"),
                      valid=encode(make_message(manifest, np.random.default_rng(0))))
    return _state["ingestor"], _state["valid"]


topics = st.one_of(st.just(TOPIC), st.just("tokenline/v2/s1/d1/status"), st.just("tokenline/v2/s1/d1/stats"),
                   st.just("tokenline/v2/s1/d2/tokens/l1/c1"), st.just("tokenline/v1/s1/l1/c1/tokens"),
                   st.just("tokenline/v1/s1/d1/status"), st.just("tokenline/v2/s1/d1/ack"),
                   st.text(max_size=80), st.just("tokenline/v2/s1/d1/tokens/l1/c1/extra"), st.just("$SYS/x"))


@st.composite
def payloads(draw):
    kind = draw(st.integers(0, 3))
    valid = _state["valid"]
    if kind == 0:
        return draw(st.binary(max_size=400))
    if kind == 1:  # a valid message with a few bytes flipped
        buf = bytearray(valid)
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] = draw(st.integers(0, 255))
        return bytes(buf)
    if kind == 2:  # truncated or extended
        n = draw(st.integers(0, len(valid) + 50))
        return (valid + b"\x00" * 50)[:n]
    return valid  # the same frame again: a duplicate after the first


def test_fuzzed_batches_never_raise_and_account_for_every_message(tmp_path_factory, tiny_manifest,
                                                                   tiny_model_dir) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    ingestor, _ = _setup(tmp, tiny_manifest, tiny_model_dir)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(topics, payloads()), min_size=1, max_size=8))
    def check(items) -> None:
        batch = [Incoming(mid=i, qos=1, topic=t, payload=p) for i, (t, p) in enumerate(items)]
        res = ingestor.process(batch)
        assert res.stored + res.duplicates + res.dead + res.status == len(batch)
        assert sum(res.reasons.values()) == res.dead
        expected: dict = {}
        for t, p in items:
            if t.startswith("tokenline/v2/s1/") and "/tokens/l1/c1" in t and not t.endswith("extra") \
                    and peek_frame_id(p) is not None:
                expected[("s1", t.split("/")[3])] = expected.get(("s1", t.split("/")[3]), 0) + 1
        assert {d: len(a) for d, a in res.acks.items()} == expected
        for a in (x for v in res.acks.values() for x in v):
            assert a.confirmed or a.reason  # every rejection names its reason
    check()
