"""Contract: topic builders and parsers validate every level; commands parse strictly."""

from __future__ import annotations

import pytest

from tokenline import topics
from tokenline.topics import Command, TopicError, parse_command, parse_topic


def test_builders_and_parser_agree() -> None:
    t = topics.tokens_topic("plant_a", "line.3", "cam-7")
    assert t == "tokenline/v1/plant_a/line.3/cam-7/tokens"
    p = parse_topic(t)
    assert (p.kind, p.site, p.line, p.camera, p.device) == ("tokens", "plant_a", "line.3", "cam-7", None)
    for build, kind in ((topics.status_topic, "status"), (topics.stats_topic, "stats"), (topics.cmd_topic, "cmd")):
        name = build("plant_a", "jetson-01")
        assert name == f"tokenline/v1/plant_a/jetson-01/{kind}"
        p = parse_topic(name)
        assert (p.kind, p.site, p.device, p.line) == (kind, "plant_a", "jetson-01", None)
    assert topics.tokens_filter() == "tokenline/v1/+/+/+/tokens"
    assert topics.tokens_filter("s1") == "tokenline/v1/s1/+/+/tokens"


@pytest.mark.parametrize("args,key", [
    (("pl/ant", "l", "c"), "site"), (("p", "+", "c"), "line"), (("p", "l", "#"), "camera"),
    (("p", "l", ""), "camera"), (("p", "l", "x" * 65), "camera"), (("p", "l", "caméra"), "camera"),
])
def test_builders_reject_bad_levels(args, key: str) -> None:
    with pytest.raises(TopicError, match=key):
        topics.tokens_topic(*args)


@pytest.mark.parametrize("topic,msg", [
    ("tokenline/v2/a/b/c/tokens", "does not start"),
    ("other/v1/a/b/c/tokens", "does not start"),
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
