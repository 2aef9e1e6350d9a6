"""Contract: topic builders and parsers validate every level; commands parse strictly."""

from __future__ import annotations

import pytest

from tokenline import topics
from tokenline.topics import Command, TopicError, parse_command, parse_topic


def test_builders_and_parser_agree() -> None:
    t = topics.tokens_topic("plant_a", "jetson-01", "line.3", "cam-7")
    assert t == "tokenline/v2/plant_a/jetson-01/tokens/line.3/cam-7"
    p = parse_topic(t)
    assert (p.kind, p.site, p.device, p.line, p.camera, p.version) == ("tokens", "plant_a", "jetson-01", "line.3",
                                                                        "cam-7", 2)
    for build, kind in ((topics.status_topic, "status"), (topics.stats_topic, "stats"), (topics.cmd_topic, "cmd"),
                        (topics.ack_topic, "ack")):
        name = build("plant_a", "jetson-01")
        assert name == f"tokenline/v2/plant_a/jetson-01/{kind}"
        p = parse_topic(name)
        assert (p.kind, p.site, p.device, p.line, p.version) == (kind, "plant_a", "jetson-01", None, 2)
    assert topics.tokens_filter() == "tokenline/v2/+/+/tokens/+/+" == topics.TOKENS_FILTER
    assert topics.tokens_filter("s1") == "tokenline/v2/s1/+/tokens/+/+"
    assert topics.shared("central", topics.TOKENS_FILTER) == "$share/central/tokenline/v2/+/+/tokens/+/+"


def test_protocol_v1_layout_is_still_read_and_written() -> None:
    t = topics.tokens_topic("plant_a", "jetson-01", "line.3", "cam-7", version=1)
    assert t == "tokenline/v1/plant_a/line.3/cam-7/tokens"  # v1 token topics do not name the device
    p = parse_topic(t)
    assert (p.kind, p.site, p.device, p.line, p.camera, p.version) == ("tokens", "plant_a", None, "line.3", "cam-7", 1)
    for build, kind in ((topics.status_topic, "status"), (topics.stats_topic, "stats"), (topics.cmd_topic, "cmd")):
        name = build("plant_a", "jetson-01", 1)
        assert name == f"tokenline/v1/plant_a/jetson-01/{kind}"
        assert parse_topic(name) == topics.Topic(kind=kind, site="plant_a", device="jetson-01", version=1)
    with pytest.raises(TopicError, match="no 'ack' topic in protocol v1"):
        topics.device_topic("ack", "plant_a", "jetson-01", 1)
    with pytest.raises(TopicError, match="version"):
        topics.status_topic("plant_a", "jetson-01", 3)
    assert topics.V1_TOKENS_FILTER == "tokenline/v1/+/+/+/tokens"


@pytest.mark.parametrize("args,key", [
    (("pl/ant", "d", "l", "c"), "site"), (("p", "d", "+", "c"), "line"), (("p", "d", "l", "#"), "camera"),
    (("p", "d", "l", ""), "camera"), (("p", "d", "l", "x" * 65), "camera"), (("p", "d", "l", "caméra"), "camera"),
    (("p", "$SYS", "l", "c"), "device"), (("p", "", "l", "c"), "device"),
])
def test_builders_reject_bad_levels(args, key: str) -> None:
    with pytest.raises(TopicError, match=key):
        topics.tokens_topic(*args)


@pytest.mark.parametrize("topic,msg", [
    ("tokenline/v3/a/b/tokens/c/d", "does not start"),
    ("other/v2/a/b/tokens/c/d", "does not start"),
    ("tokenline/v2/a/b/c/tokens", "is not"),  # the v1 layout under the v2 prefix
    ("tokenline/v2/a/b/frames/c/d", "is not"),
    ("tokenline/v2/a/b/tokens/c", "is not"),
    ("tokenline/v2/a/+/tokens/c/d", "device"),
    ("tokenline/v2/a/b/tokens/$c/d", "line"),
    ("tokenline/v2/a/b/tokens/c/", "camera"),
    ("tokenline/v2/a/b/nack", "is not"),
    ("tokenline/v1/a/b/ack", "is not"),  # no acknowledgements in v1
    ("tokenline/v1/a/b/c/frames", "is not"),
    ("tokenline/v1/a/b/c/d/tokens", "is not"),
    ("tokenline/v1/a/$b/c/tokens", "line"),
    ("tokenline/v1/a//c/tokens", "line"),
    ("tokenline/v1/+/dev/status", "site"),
    ("tokenline/v1/a/b/tokens", "is not"),
])
def test_parser_rejects(topic: str, msg: str) -> None:
    with pytest.raises(TopicError, match=msg):
        parse_topic(topic)


def test_commands_round_trip() -> None:
    for c in (Command("trigger", camera="cam-1"), Command("pause"), Command("resume", request_id="r1"),
              Command("request_original", frame_id="0" * 12 + "7" + "0" * 19)):
        assert parse_command(c.to_json()) == c


@pytest.mark.parametrize("payload,msg", [
    (b"\xff\xfe", "UTF-8 JSON"), (b"[1]", "JSON object"), (b'{"action":"explode"}', "action"),
    (b'{"action":"trigger","extra":1}', "unknown keys"), (b'{"action":"trigger","camera":"a/b"}', "camera"),
    (b'{"action":"request_original"}', "frame_id"), (b'{"action":"pause","frame_id":"' + b"0" * 32 + b'"}', "only valid"),
    (b'{"action":"trigger","request_id":5}', "request_id"), (b"{" + b" " * 5000 + b"}", "limit"),
])
def test_bad_commands(payload: bytes, msg: str) -> None:
    with pytest.raises(TopicError, match=msg):
        parse_command(payload)


def test_relayout_moves_token_topics_between_the_layouts() -> None:
    v1 = topics.tokens_topic("s", "dev", "l", "c", version=1)
    v2 = topics.tokens_topic("s", "dev", "l", "c")
    assert topics.relayout(v1, "dev", 2) == v2 and topics.relayout(v2, "other", 1) == v1
    assert topics.relayout(v2, "dev", 2) == v2
    assert topics.relayout(topics.status_topic("s", "dev", 1), "dev", 2) == "tokenline/v1/s/dev/status"
